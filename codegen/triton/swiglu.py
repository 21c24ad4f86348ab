"""Standalone SwiGLU: out = act(gate) * up, element-wise over flat blocks (when no norm precedes the MLP)."""

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
