"""Embedding: out[t, :] = table[ids[t], :], one program per token and block of columns."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def embedding_kernel(
    ids_ptr, table_ptr, out_ptr,  # pointers
    H,  # sizes
    stride_table, stride_col, stride_out,  # strides (the table's rows and columns, the output's rows)
    BLOCK_H: tl.constexpr,  # meta-parameters
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    token = tl.load(ids_ptr + pid_t)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs_h < H
    row = tl.load(table_ptr + token * stride_table + offs_h * stride_col, mask=mask)
    tl.store(out_ptr + pid_t * stride_out + offs_h, row, mask=mask)


def embedding(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table: [V, H], any strides (a weight's are row-major; rows picked from activations, as index_select's
    constant spread, need not be); ids: integer [...] -> [..., H]."""
    assert table.dim() == 2, "embedding table must be a [V, H] matrix"
    flat = ids.reshape(-1).contiguous()
    h = table.shape[1]
    out = torch.empty(flat.numel(), h, dtype=table.dtype, device=table.device)
    if flat.numel():
        block = min(1024, triton.next_power_of_2(h))
        grid = (flat.numel(), triton.cdiv(h, block))
        embedding_kernel[grid](flat, table, out, h, table.stride(0), table.stride(1), out.stride(0),
                               BLOCK_H=block)
    return out.reshape(*ids.shape, h)
