"""Standalone SwiGLU: out = act(gate) * up, element-wise over flat blocks (when no norm precedes the MLP), and over
the two halves of a fused gate|up projection's rows (prefill, after cuBLAS), read in place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton.gemv import ACTS, _act


@triton.jit
def swiglu_kernel(
    gate_ptr, up_ptr, out_ptr,  # pointers
    N,  # sizes
    ACT: tl.constexpr, BLOCK: tl.constexpr,  # meta-parameters
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0)
    a = _act(g.to(tl.float32), ACT).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + offs, (a * u.to(tl.float32)).to(g.dtype), mask=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        swiglu_kernel[(triton.cdiv(n, 1024),)](gate, up, out, n, ACT=ACTS[act], BLOCK=1024)
    return out


@triton.jit
def swiglu_halves_kernel(
    y_ptr, out_ptr,  # pointers
    N,  # sizes: outputs per row (half of y's row)
    stride_ym, stride_om,  # strides
    ACT: tl.constexpr, BLOCK: tl.constexpr,  # meta-parameters
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(y_ptr + row * stride_ym + offs, mask=mask, other=0.0)
    u = tl.load(y_ptr + row * stride_ym + N + offs, mask=mask, other=0.0)
    a = _act(g.to(tl.float32), ACT).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs, (a * u.to(tl.float32)).to(g.dtype), mask=mask)


def swiglu_halves(y: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """y [M, 2N] = [gate | up] -> act(gate) * up [M, N]."""
    m, n2 = y.shape
    n = n2 // 2
    if y.stride(-1) != 1:
        y = y.contiguous()
    out = torch.empty(m, n, dtype=y.dtype, device=y.device)
    if m and n:
        block = min(1024, triton.next_power_of_2(n))
        swiglu_halves_kernel[(m, triton.cdiv(n, block))](y, out, n, y.stride(0), out.stride(0), ACT=ACTS[act],
                                                         BLOCK=block)
    return out
