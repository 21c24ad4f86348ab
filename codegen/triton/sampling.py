"""On-device sampling, one program per row of logits: greedy argmax, or a draw from softmax(logits / T) restricted
to the top-k tokens and then to the top-p nucleus of what top-k kept (the order of ``runtime/sampler.py``).

No sort: the top-k threshold (the k-th largest logit) and the top-p threshold (the smallest logit whose nucleus
reaches p) are found by bisection on the logit value, each step one pass over the row. The draw is the Gumbel-max
trick, ``argmax(l / T - log(-log U))``, which samples softmax(l / T) exactly; U comes from Triton's Philox
generator keyed by a seed and an offset read from device memory, so a CUDA graph replays with fresh randomness
when the runtime advances the offset on the device. Ties at a threshold keep every tied token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BISECT_STEPS = 32


@triton.jit
def _count_and_mass(row_ptr, V, t, m, inv_temp, BLOCK_V: tl.constexpr):
    """(number of logits >= t, sum of exp((l - m) / T) over them)."""
    count = tl.zeros([BLOCK_V], dtype=tl.float32)
    mass = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        keep = x >= t
        count += tl.where(keep, 1.0, 0.0)
        mass += tl.where(keep, tl.exp((x - m) * inv_temp), 0.0)
    return tl.sum(count, axis=0), tl.sum(mass, axis=0)


@triton.jit
def sample_kernel(
    logits_ptr, out_ptr, seed_ptr, offset_ptr,  # pointers
    V, stride_row,  # sizes, strides
    inv_temp, top_k, top_p,
    GREEDY: tl.constexpr, FILTER: tl.constexpr, STEPS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row * stride_row
    # the row's maximum and minimum
    hi = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    lo = tl.full([BLOCK_V], float("inf"), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        hi = tl.maximum(hi, x)
        lo = tl.minimum(lo, tl.where(offs < V, x, float("inf")))
    m = tl.max(hi, axis=0)
    floor = tl.min(lo, axis=0)
    threshold = floor
    if FILTER:
        # top-k: the largest t still keeping top_k tokens (invariant: a keeps enough, b does not)
        a = floor
        b = m
        for _ in range(STEPS):
            mid = 0.5 * (a + b)
            count, _ = _count_and_mass(row_ptr, V, mid, m, inv_temp, BLOCK_V)
            a = tl.where(count >= top_k, mid, a)
            b = tl.where(count >= top_k, b, mid)
        # top-p over what top-k kept: the largest t whose tokens hold top_p of that mass
        _, total = _count_and_mass(row_ptr, V, a, m, inv_temp, BLOCK_V)
        b = m
        for _ in range(STEPS):
            mid = 0.5 * (a + b)
            _, mass = _count_and_mass(row_ptr, V, mid, m, inv_temp, BLOCK_V)
            a = tl.where(mass >= top_p * total, mid, a)
            b = tl.where(mass >= top_p * total, b, mid)
        threshold = a
    if not GREEDY:
        seed = tl.load(seed_ptr)
        offset = tl.load(offset_ptr)
    best = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_V], dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        valid = offs < V
        x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
        if GREEDY:
            score = x
        else:
            u = tl.rand(seed, (offset * tl.num_programs(0) + row) * V + offs)
            u = tl.minimum(tl.maximum(u, 1e-12), 1.0 - 1e-7)
            score = tl.where(x >= threshold, x * inv_temp - tl.log(-tl.log(u)), float("-inf"))
        score = tl.where(valid, score, float("-inf"))
        better = score > best  # strict: the first index wins a tie, as torch.argmax
        best_idx = tl.where(better, offs, best_idx)
        best = tl.where(better, score, best)
    top = tl.max(best, axis=0)
    idx = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
    tl.store(out_ptr + row, idx.to(tl.int64))


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           seed: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens [B] (int64, on the logits' device) from logits [B, V]. ``seed`` and ``offset`` are int64
    device scalars (tensors of one element); the caller advances ``offset`` after each call."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be a row-major [B, V] matrix, got {tuple(logits.shape)}")
    b, v = logits.shape
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    greedy = temperature == 0.0
    if not greedy and (seed is None or offset is None):
        raise ValueError("sampling needs seed and offset tensors on the device")
    zero = torch.zeros(1, dtype=torch.int64, device=logits.device)
    sample_kernel[(b,)](
        logits, out, seed if seed is not None else zero, offset if offset is not None else zero,
        v, logits.stride(0), 1.0 / temperature if not greedy else 1.0, float(min(top_k, v) if top_k else v),
        float(top_p), GREEDY=greedy, FILTER=not greedy and (0 < top_k < v or top_p < 1.0), STEPS=BISECT_STEPS,
        BLOCK_V=min(1024, triton.next_power_of_2(v)))
    return out
