"""ARM's gated MLP in decode: the norm and ``[W_g; M]`` in one GEMV (gemv.py), then ``arm_up_kernel`` computes
``z = mask(â) ⊙ (W_u h)`` reading only the W_u rows of channels that survive the mask (it normalises x itself,
like the GEMV's prologue: h is never written), and the down projection ``W_d·diag(s) z + m (+ residual)`` reads
only the W_d columns of those channels (``arm_down_kernel``): three launches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton.gemv import ACTS, _act, rms_norm_linear
from lowerlm.codegen.triton.rms_norm import rms_scale, row_inv_rms

DECODE_MAX_ROWS = 16  # rows the per-row decode kernels take; more (prefill) go through the dense math


@triton.jit
def arm_up_kernel(
    x_ptr, nw_ptr, g_ptr, wu_ptr, mu_ptr, scale_ptr, z_ptr,  # pointers
    C, K,  # sizes: channels (the intermediate size), hidden
    stride_xm, stride_gm, stride_wu, stride_zm,  # strides
    tau, eps,
    ACT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    x_row = x_ptr + pid_m * stride_xm
    inv = row_inv_rms(x_row, K, eps, BLOCK_K)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    g = tl.load(g_ptr + pid_m * stride_gm + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_i, mask=mask_i, other=1.0).to(tl.float32)
    a_hat = (_act(g, ACT) - mu) / scale
    keep = mask_i & (tl.abs(a_hat) >= tau)
    acc = tl.zeros([BLOCK_I], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = tl.load(x_row + offs_k, mask=mask_k, other=0.0)
        h = rms_scale(xk, inv, tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0)).to(tl.float32)
        w = tl.load(wu_ptr + offs_i[:, None] * stride_wu + offs_k[None, :], mask=keep[:, None] & mask_k[None, :],
                    other=0.0)  # rows of dropped channels are never read
        acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    z = tl.where(keep, a_hat * acc, 0.0)
    tl.store(z_ptr + pid_m * stride_zm + offs_i, z.to(z_ptr.dtype.element_ty), mask=mask_i)


@triton.jit
def arm_down_kernel(
    z_ptr, wd_ptr, m_ptr, res_ptr, out_ptr,  # pointers
    N, C,  # sizes: hidden outputs, channels
    stride_zm, stride_wd, stride_mm, stride_rm, stride_om,  # strides
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i0 in range(0, C, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        z = tl.load(z_ptr + pid_m * stride_zm + offs_i, mask=offs_i < C, other=0.0).to(tl.float32)
        live = z != 0.0
        w = tl.load(wd_ptr + offs_n[:, None] * stride_wd + offs_i[None, :], mask=mask_n[:, None] & live[None, :],
                    other=0.0)  # columns of dropped channels are never read
        acc += tl.sum(w.to(tl.float32) * z[None, :], axis=1)
    dt = out_ptr.dtype.element_ty
    out = (acc.to(dt).to(tl.float32) + tl.load(m_ptr + pid_m * stride_mm + offs_n, mask=mask_n, other=0.0)
           .to(tl.float32)).to(dt)
    if HAS_RES:
        out = (out.to(tl.float32) + tl.load(res_ptr + pid_m * stride_rm + offs_n, mask=mask_n, other=0.0)
               .to(tl.float32)).to(dt)
    tl.store(out_ptr + pid_m * stride_om + offs_n, out, mask=mask_n)


def arm_mlp(x, norm_weight, gate_m, up, down_scaled, mu, scale, residual=None, eps=1e-6, tau=0.0, act="silu"):
    """The ``arm_mlp`` op: x [..., H] -> [..., H]."""
    from lowerlm.ir.compute import arm_mlp as reference_arm_mlp

    lead, hidden = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, hidden).contiguous()
    inter = up.shape[0]
    if x2.shape[0] > DECODE_MAX_ROWS:  # prefill: dense math, the mask still applies
        return reference_arm_mlp(x, norm_weight, gate_m, up, down_scaled, mu, scale, residual, eps, tau, act)
    (gm,) = rms_norm_linear(x2, norm_weight, gate_m, eps=eps)
    m_rows = x2.shape[0]
    z = torch.empty(m_rows, inter, dtype=x.dtype, device=x.device)
    block_i = min(64, triton.next_power_of_2(inter))
    arm_up_kernel[(m_rows, triton.cdiv(inter, block_i))](
        x2, norm_weight, gm, up, mu, scale, z, inter, hidden, x2.stride(0), gm.stride(0), up.stride(0), z.stride(0),
        tau, eps, ACT=ACTS[act], BLOCK_I=block_i, BLOCK_K=min(128, triton.next_power_of_2(hidden)))
    out = torch.empty(m_rows, hidden, dtype=x.dtype, device=x.device)
    m = gm[:, inter:]
    res = residual.reshape(-1, hidden).contiguous() if residual is not None else out
    block_n = min(64, triton.next_power_of_2(hidden))
    arm_down_kernel[(m_rows, triton.cdiv(hidden, block_n))](
        z, down_scaled, m, res, out, hidden, inter, z.stride(0), down_scaled.stride(0), m.stride(0), res.stride(0),
        out.stride(0), HAS_RES=residual is not None, BLOCK_N=block_n,
        BLOCK_I=min(128, triton.next_power_of_2(inter)))
    return out.reshape(*lead, hidden)
