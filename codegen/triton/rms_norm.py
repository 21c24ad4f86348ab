"""RMSNorm, one program per row: ``w * (x * rsqrt(mean(x²) + eps)).to(dtype)`` with the statistics in f32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr, w_ptr, out_ptr,  # pointers
    K,  # sizes
    stride_xm, stride_om,  # strides
    eps,
    BLOCK_K: tl.constexpr,  # meta-parameters: BLOCK_K >= K, one pass
):
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    mask = offs_k < K
    x = tl.load(x_ptr + pid * stride_xm + offs_k, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / K + eps)
    # w * normed, with normed rounded to the activation dtype first (as transformers does); the product is
    # formed in f32 and rounded once, which is what a bf16 multiply gives
    normed = (x32 * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs_k, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid * stride_om + offs_k, (w * normed).to(x.dtype), mask=mask)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., K], w [K]."""
    if w.shape != (x.shape[-1],) or w.dtype != x.dtype:
        raise ValueError(f"rms_norm weight {tuple(w.shape)} {w.dtype} does not fit input {tuple(x.shape)} {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    if x2.shape[0]:
        rms_norm_kernel[(x2.shape[0],)](x2, w, out, x2.shape[1], x2.stride(0), out.stride(0), eps,
                                        BLOCK_K=triton.next_power_of_2(x2.shape[1]))
    return out.reshape(x.shape)
