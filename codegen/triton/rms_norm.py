"""RMSNorm, one program per row: ``w * (x * rsqrt(mean(x²) + eps)).to(dtype)`` with the statistics in f32; with a
residual input, of ``x + residual`` (rounded to the dtype, as torch adds), which it also stores: the new residual
stream, in the same pass (prefill's add + norm in one launch)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton import as_rows


@triton.jit
def rms_scale(x, inv, w):
    """transformers' RMSNorm of ``x`` (in the activation dtype) given its ``inv`` = 1/rms (f32) and the weight ``w``:
    x·inv rounded to the activation dtype, times the weight in f32, rounded once (what a multiply in that dtype
    gives). Every kernel that normalises applies the norm through this (broadcast ``inv`` and ``w`` to x's
    shape)."""
    dt = x.dtype
    return (w.to(tl.float32) * (x.to(tl.float32) * inv).to(dt).to(tl.float32)).to(dt)


@triton.jit
def row_inv_rms(row_ptr, K, eps, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x²) + eps) of the row of K elements at ``row_ptr``, in f32, in blocks of BLOCK_K."""
    sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(row_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        sumsq += x * x
    return 1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / K + eps)


@triton.jit
def rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, r_out_ptr,  # pointers
    K,  # sizes
    stride_xm, stride_om, stride_rm, stride_rom,  # strides
    eps,
    RES_IN: tl.constexpr, BLOCK_K: tl.constexpr,  # meta-parameters: BLOCK_K >= K, one pass
):
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    mask = offs_k < K
    x = tl.load(x_ptr + pid * stride_xm + offs_k, mask=mask, other=0.0)
    if RES_IN:
        res = tl.load(res_ptr + pid * stride_rm + offs_k, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(r_out_ptr + pid * stride_rom + offs_k, x, mask=mask)
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / K + eps)
    tl.store(out_ptr + pid * stride_om + offs_k, rms_scale(x, inv, tl.load(w_ptr + offs_k, mask=mask, other=0.0)),
             mask=mask)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [..., K], w [K]: the normalised x; with ``residual`` (shaped like x), (normalised x + residual,
    x + residual)."""
    if w.shape != (x.shape[-1],) or w.dtype != x.dtype:
        raise ValueError(f"rms_norm weight {tuple(w.shape)} {w.dtype} does not fit input {tuple(x.shape)} {x.dtype}")
    x2 = as_rows(x)
    out = torch.empty_like(x2)
    res2 = as_rows(residual) if residual is not None else x2
    r_out = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0]:
        rms_norm_kernel[(x2.shape[0],)](x2, w, out, res2, r_out, x2.shape[1], x2.stride(0), out.stride(0),
                                        res2.stride(0), r_out.stride(0), eps, RES_IN=residual is not None,
                                        BLOCK_K=triton.next_power_of_2(x2.shape[1]))
    if residual is None:
        return out.reshape(x.shape)
    return out.reshape(x.shape), r_out.reshape(x.shape)
