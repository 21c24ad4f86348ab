"""Standalone SwiGLU: out = act(gate) * up, one program per row and block of columns, over two tensors (when no
norm precedes the MLP) or the two halves of a fused gate|up projection's rows (prefill, after cuBLAS), read in
place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton import as_rows
from lowerlm.codegen.triton.gemv import ACTS, _act


@triton.jit
def swiglu_kernel(
    gate_ptr, up_ptr, out_ptr,  # pointers
    N,  # sizes: outputs per row
    stride_gm, stride_um, stride_om,  # row strides
    ACT: tl.constexpr, BLOCK: tl.constexpr,  # meta-parameters
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(gate_ptr + row * stride_gm + offs, mask=mask, other=0.0)
    u = tl.load(up_ptr + row * stride_um + offs, mask=mask, other=0.0)
    a = _act(g.to(tl.float32), ACT).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs, (a * u.to(tl.float32)).to(g.dtype), mask=mask)


def _launch(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """gate, up: [M, N] with unit column stride -> act(gate) * up [M, N]."""
    m, n = gate.shape
    out = torch.empty(m, n, dtype=gate.dtype, device=gate.device)
    if m and n:
        block = min(1024, triton.next_power_of_2(n))
        swiglu_kernel[(m, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0),
                                                  ACT=ACTS[act], BLOCK=block)
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return _launch(as_rows(gate), as_rows(up), act).reshape(gate.shape)


def swiglu_halves(y: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """y [M, 2N] = [gate | up] -> act(gate) * up [M, N], the halves read in place."""
    y = as_rows(y)
    n = y.shape[1] // 2
    return _launch(y[:, :n], y[:, n:], act)
