"""Projections for decode: ``linear`` (bias and residual epilogues) and ``rms_norm_linear`` (the RMSNorm in the
prologue, the residual add before it, a SwiGLU epilogue), two kernels serving both.

``gemv_kernel`` (one row: batch-1 decode): one program computes BLOCK_N outputs of the row: a first pass over K gets
the row's sum of squares (and, with a residual input, writes the new residual stream), a second pass accumulates
``W[n, :] · h`` in f32 where ``h = (x · rsqrt(mean(x²) + eps)).to(dtype) · w_norm``, as transformers' RMSNorm
computes it. With a SwiGLU epilogue the program also accumulates the matching ``up`` row (n + I) and stores
``act(gate) · up``.

``rows_gemm_kernel`` (2 to DOT_MAX_ROWS rows: batched decode, short prompts): the same prologue and epilogues over a
BLOCK_M × BLOCK_N tile with ``tl.dot``, so W is read once per BLOCK_M rows instead of once per row.

More rows (prefill) go through torch's matmul (cuBLAS on a GPU): the residual add and the norm before it are one
launch (rms_norm.py), the SwiGLU after it one more (swiglu.py), and a residual output is added by the GEMM itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton import as_rows, interpreted, tile_for_sms
from lowerlm.codegen.triton.rms_norm import rms_norm, rms_scale
from lowerlm.ir.abi import GELU, GELU_TANH, SILU

DOT_MAX_ROWS = 64  # rows_gemm_kernel takes up to this many rows; more go to torch's matmul
ACTS = {"none": 0, SILU: 1, GELU: 2, GELU_TANH: 3}  # the kernels' ACT flag per activation


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:
        x = x * tl.sigmoid(x)
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    return x


@triton.jit
def gemv_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, r_out_ptr,  # pointers
    N, K, UP_OFFSET,  # sizes: outputs per row, reduction length, row offset of `up` in W for SwiGLU
    stride_xm, stride_resm, stride_wn, stride_om, stride_rom,  # strides (the last dimension is contiguous)
    eps,
    NORM: tl.constexpr, RES_IN: tl.constexpr, RES_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    x_row = x_ptr + pid_m * stride_xm
    res_row = res_ptr + pid_m * stride_resm
    inv = 1.0
    if NORM:
        sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xk = tl.load(x_row + offs_k, mask=mask_k, other=0.0)
            if RES_IN:
                res = tl.load(res_row + offs_k, mask=mask_k, other=0.0)
                xk = (xk.to(tl.float32) + res.to(tl.float32)).to(res.dtype)
                if pid_n == 0:
                    tl.store(r_out_ptr + pid_m * stride_rom + offs_k, xk, mask=mask_k)
            xk = xk.to(tl.float32)
            sumsq += xk * xk
        inv = 1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / K + eps)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = tl.load(x_row + offs_k, mask=mask_k, other=0.0)
        if RES_IN:
            xk = (xk.to(tl.float32) + tl.load(res_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)).to(xk.dtype)
        if NORM:
            xk = rms_scale(xk, inv, tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0))
        h = xk.to(tl.float32)
        w_tile = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
        mask_w = mask_n[:, None] & mask_k[None, :]
        acc += tl.sum(tl.load(w_tile, mask=mask_w, other=0.0).to(tl.float32) * h[None, :], axis=1)
        if ACT != 0:
            up_tile = w_tile + UP_OFFSET * stride_wn
            acc_up += tl.sum(tl.load(up_tile, mask=mask_w, other=0.0).to(tl.float32) * h[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if ACT != 0:
            acc_up += tl.load(b_ptr + UP_OFFSET + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    if ACT != 0:
        # gate and up rounded as separate projections would be, then act(gate) rounded, then the product
        gate = _act(acc.to(dt).to(tl.float32), ACT).to(dt).to(tl.float32)
        acc = gate * acc_up.to(dt).to(tl.float32)
    out = acc.to(dt)
    if RES_OUT:
        out = (out.to(tl.float32) + tl.load(res_row + offs_n, mask=mask_n, other=0.0).to(tl.float32)).to(dt)
    tl.store(out_ptr + pid_m * stride_om + offs_n, out, mask=mask_n)


@triton.jit
def rows_gemm_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, r_out_ptr,  # pointers
    M, N, K, UP_OFFSET,  # sizes: rows, outputs per row, reduction length, row offset of `up` in W for SwiGLU
    stride_xm, stride_resm, stride_wn, stride_om, stride_rom,  # strides (the last dimension is contiguous)
    eps,
    NORM: tl.constexpr, RES_IN: tl.constexpr, RES_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    res_rows = res_ptr + offs_m[:, None] * stride_resm
    inv = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if NORM:  # first pass: each row's sum of squares (and the new residual stream, written by column block 0)
        sumsq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & (offs_k < K)[None, :]
            xk = tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0)
            if RES_IN:
                res = tl.load(res_rows + offs_k[None, :], mask=mask, other=0.0)
                xk = (xk.to(tl.float32) + res.to(tl.float32)).to(res.dtype)
                if pid_n == 0:
                    tl.store(r_out_ptr + offs_m[:, None] * stride_rom + offs_k[None, :], xk, mask=mask)
            xk = xk.to(tl.float32)
            sumsq += xk * xk
        inv = 1.0 / tl.sqrt(tl.sum(sumsq, axis=1) / K + eps)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_m[:, None] & mask_k[None, :]
        a = tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0)
        dt = a.dtype
        if RES_IN:
            a = (a.to(tl.float32) + tl.load(res_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)).to(dt)
        if NORM:
            a = rms_scale(a, inv[:, None], tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0)[None, :])
        w_tile = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        mask_w = mask_k[:, None] & mask_n[None, :]
        b = tl.load(w_tile, mask=mask_w, other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
        if ACT != 0:
            b_up = tl.load(w_tile + UP_OFFSET * stride_wn, mask=mask_w, other=0.0)
            if UPCAST:
                b_up = b_up.to(tl.float32)
            acc_up += tl.dot(a, b_up, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if ACT != 0:
            acc_up += tl.load(b_ptr + UP_OFFSET + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    dt = out_ptr.dtype.element_ty
    if ACT != 0:
        gate = _act(acc.to(dt).to(tl.float32), ACT).to(dt).to(tl.float32)
        acc = gate * acc_up.to(dt).to(tl.float32)
    out = acc.to(dt)
    mask = mask_m[:, None] & mask_n[None, :]
    if RES_OUT:
        res = tl.load(res_rows + offs_n[None, :], mask=mask, other=0.0)
        out = (out.to(tl.float32) + res.to(tl.float32)).to(dt)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=mask)


def blocks(n_out: int, k: int, device) -> tuple:
    """(BLOCK_N, BLOCK_K) of gemv_kernel. On a GPU a decode GEMV is bound by reading W, which takes every SM
    streaming: rows per program are cut until there are two programs per SM (o_proj of Llama-3.2-1B: 256 programs
    of 8 rows, not 32 of 64), and the K tile grows as the row tile shrinks so each load stays ~16 KB. The
    interpreter keeps big tiles (few programs run faster there)."""
    if interpreted(device):
        return min(64, triton.next_power_of_2(n_out)), min(128, triton.next_power_of_2(k))
    block_n = tile_for_sms(n_out, device, 4)
    return block_n, min(triton.next_power_of_2(k), max(128, 8192 // block_n))


def dot_blocks(m: int, n_out: int, k: int, device) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of rows_gemm_kernel. BLOCK_M covers the rows (16 at least, ``tl.dot``'s
    minimum); on a GPU BLOCK_N is cut towards two programs per SM as in ``blocks``, and BLOCK_K keeps each operand
    tile at 8K elements (16 KB in bf16)."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    if interpreted(device):
        return block_m, min(64, max(16, triton.next_power_of_2(n_out))), min(128, max(16, triton.next_power_of_2(k)))
    programs_m = triton.cdiv(m, block_m)
    block_n = tile_for_sms(programs_m * n_out, device, 16)
    return block_m, block_n, min(max(16, triton.next_power_of_2(k)), 8192 // max(block_m, block_n))


def _launch(x2, w, bias, res2, norm_w, eps, n_out, up_offset, act, res_in, res_out):
    m, k = x2.shape
    out = torch.empty(m, n_out, dtype=x2.dtype, device=x2.device)
    r_out = torch.empty_like(x2) if res_in else out
    dummy = x2
    args = (x2, res2 if res2 is not None else dummy, norm_w if norm_w is not None else dummy, w,
            bias if bias is not None else dummy, out, r_out)
    strides = (x2.stride(0), res2.stride(0) if res2 is not None else 0, w.stride(0), out.stride(0), r_out.stride(0))
    flags = dict(NORM=norm_w is not None, RES_IN=res_in, RES_OUT=res_out, HAS_BIAS=bias is not None, ACT=ACTS[act])
    if m == 1:
        block_n, block_k = blocks(n_out, k, x2.device)
        gemv_kernel[(1, triton.cdiv(n_out, block_n))](
            *args, n_out, k, up_offset, *strides, eps, **flags, BLOCK_N=block_n, BLOCK_K=block_k)
    else:
        block_m, block_n, block_k = dot_blocks(m, n_out, k, x2.device)
        on_cpu = interpreted(x2.device)
        rows_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n_out, block_n))](
            *args, m, n_out, k, up_offset, *strides, eps, **flags,
            PRECISION="ieee" if x2.dtype == torch.float32 or on_cpu else None, UPCAST=on_cpu,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out, (r_out if res_in else None)


def _check(x, w, what):
    if w.dim() != 2 or w.stride(1) != 1 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype:
        raise ValueError(f"{what}: input {tuple(x.shape)} {x.dtype} does not fit weight {tuple(w.shape)} {w.dtype}")


def linear(x, w, bias=None, residual=None):
    """x @ w.T (+ bias) (+ residual): x [..., K], w [N, K]."""
    _check(x, w, "linear")
    x2 = as_rows(x)
    n = w.shape[0]
    if x2.shape[0] > DOT_MAX_ROWS:  # cuBLAS, the residual added by its epilogue (beta = 1)
        if residual is not None and bias is None:
            out = torch.addmm(as_rows(residual), x2, w.t())
        else:
            out = torch.nn.functional.linear(x2, w, bias)
            if residual is not None:
                out = out + as_rows(residual)
        return out.reshape(*x.shape[:-1], n)
    res2 = as_rows(residual) if residual is not None else None
    out, _ = _launch(x2, w, bias, res2, None, 0.0, n, 0, "none", False, residual is not None)
    return out.reshape(*x.shape[:-1], n)


def rms_norm_linear(x, norm_weight, w, bias=None, residual=None, eps=1e-6, splits=None, act="none"):
    """The ``rms_norm_linear`` op: pieces of ``rms_norm(x (+ residual)) @ w.T (+ bias)`` split by ``splits`` (or
    ``act(gate) * up`` with a SwiGLU act), then the new residual stream when ``residual`` is given."""
    _check(x, w, "rms_norm_linear")
    splits = list(splits or [w.shape[0]])
    x2 = as_rows(x)
    res2 = as_rows(residual) if residual is not None else None
    lead = x.shape[:-1]
    if x2.shape[0] > DOT_MAX_ROWS:  # prefill: the residual add and the norm in one launch, cuBLAS, the SwiGLU
        h, r = rms_norm(x2, norm_weight, eps, res2) if res2 is not None else (rms_norm(x2, norm_weight, eps), x2)
        y = torch.nn.functional.linear(h, w, bias)
        pieces = [swiglu_halves(y, act)] if act != "none" else list(torch.split(y, splits, dim=-1))
        out = [p.reshape(*lead, p.shape[-1]) for p in pieces]
        return tuple(out + ([r.reshape(x.shape)] if res2 is not None else []))
    if act != "none":
        y, r = _launch(x2, w, bias, res2, norm_weight, eps, splits[0], splits[0], act, res2 is not None, False)
        pieces = [y]
    else:
        y, r = _launch(x2, w, bias, res2, norm_weight, eps, w.shape[0], 0, "none", res2 is not None, False)
        pieces = list(torch.split(y, splits, dim=-1))
    out = [p.reshape(*lead, p.shape[-1]) for p in pieces]
    return tuple(out + ([r.reshape(x.shape)] if r is not None else []))


from lowerlm.codegen.triton.swiglu import swiglu_halves  # noqa: E402  (the prefill's epilogue; swiglu.py imports _act)
