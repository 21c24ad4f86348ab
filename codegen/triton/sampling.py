"""On-device sampling: greedy argmax, or a draw from softmax(logits / T) restricted to the top-k tokens and then to
the top-p nucleus of what top-k kept (the order of ``runtime/sampler.py``). On a GPU an unfiltered row's vocabulary
is split over several programs, the last to finish taking the best of their bests (codegen/triton/splits.py);
top-k/top-p rows take one program each.

No sort: the top-k threshold (the k-th largest logit) and the top-p threshold (the smallest logit whose nucleus
reaches p) are found by bisection on the logit value, each step one pass over the row. A bisection stops as soon as
the set it keeps can no longer change (exactly k tokens at or above the midpoint; one token between the bounds of
the top-p search), which keeps the same set as all 32 steps would. On SmolLM2's logits (65 positions of a greedy
continuation, one-off) top-k 50 took 10 steps (median; at most 18) and top-p 0.9 took 6 (at most 15).

The draw is the Gumbel-max trick, ``argmax(l / T - log(-log U))``, which samples softmax(l / T) exactly; U comes
from Triton's Philox generator keyed by a seed and the position of the token being drawn, both read from device
memory: a CUDA graph replays with fresh randomness as positions advance, and a row's draw depends on its logits,
the seed and the position only, not on the batch around it (batched projections may still round the logits
differently). Ties at a threshold keep every tied token.

With ``advance`` the kernel also moves the decode loop on (runtime/decode_loop.py): it writes each row's token
into the next step's input ids and advances its position (clamped to ``limit``) and valid length, all on the
device, so generation needs the host only to read tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton import interpreted, sm_count
from lowerlm.codegen.triton.splits import counters, last_to_finish

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
    logits_ptr, out_ptr, seed_ptr, pos_ptr, lens_ptr, part_val_ptr, part_idx_ptr, count_ptr,  # pointers
    V, CHUNK, SPLITS, stride_row, stride_out, stride_pos,  # sizes (vocabulary, per program, programs), strides
    inv_temp, top_k, top_p, limit,
    GREEDY: tl.constexpr, FILTER: tl.constexpr, ADVANCE: tl.constexpr, STEPS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * stride_row
    pos = tl.load(pos_ptr + row * stride_pos)  # the position of the token these logits follow
    threshold = float("-inf")
    if FILTER:  # (one program per row: the thresholds need the whole row at every step)
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
        # top-k: the largest t still keeping top_k tokens (invariant: a keeps enough, b does not); each bisection
        # runs only when its filter is on (one pass over the row per step)
        a = floor
        b = m
        if top_k < V:
            left = tl.full([], STEPS, tl.int32)
            while left > 0:
                mid = 0.5 * (a + b)
                count, _ = _count_and_mass(row_ptr, V, mid, m, inv_temp, BLOCK_V)
                a = tl.where(count >= top_k, mid, a)
                b = tl.where(count >= top_k, b, mid)
                # exactly top_k tokens at or above mid: they are the set, more steps would not change it
                left = tl.where(count == top_k, 0, left - 1)
        # top-p over what top-k kept: the largest t whose tokens hold top_p of that mass
        if top_p < 1.0:
            count_a, total = _count_and_mass(row_ptr, V, a, m, inv_temp, BLOCK_V)
            b = m
            count_b = tl.zeros([], tl.float32)  # tokens at or above a bound holding less than top_p (+inf first)
            left = tl.where(count_a <= 1.0, 0, STEPS)  # top-k kept one token: nothing to search
            while left > 0:
                mid = 0.5 * (a + b)
                count, mass = _count_and_mass(row_ptr, V, mid, m, inv_temp, BLOCK_V)
                enough = mass >= top_p * total
                a = tl.where(enough, mid, a)
                b = tl.where(enough, b, mid)
                count_a = tl.where(enough, count, count_a)
                count_b = tl.where(enough, count_b, count)
                # one token in [a, b): a stays at or below it whatever the next steps, so the set is final
                left = tl.where(count_a - count_b <= 1.0, 0, left - 1)
        threshold = a
    if not GREEDY:
        seed = tl.load(seed_ptr)
        key = (pos + 1) * V  # the drawn token's position: one stream of V uniforms per position
    best = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_V], dtype=tl.int32)
    for v0 in range(split * CHUNK, tl.minimum(split * CHUNK + CHUNK, V), BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        valid = offs < V
        x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
        if GREEDY:
            score = x
        else:
            u = tl.rand(seed, key + offs)
            u = tl.minimum(tl.maximum(u, 1e-12), 1.0 - 1e-7)
            score = tl.where(x >= threshold, x * inv_temp - tl.log(-tl.log(u)), float("-inf"))
        score = tl.where(valid, score, float("-inf"))
        better = score > best  # strict: the first index wins a tie, as torch.argmax
        best_idx = tl.where(better, offs, best_idx)
        best = tl.where(better, score, best)
    top = tl.max(best, axis=0)
    idx = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
    last = split == 0
    if SPLITS > 1:  # the row's chunks in several programs: the last to finish takes the best of their bests
        tl.store(part_val_ptr + row * SPLITS + split, top)
        tl.store(part_idx_ptr + row * SPLITS + split, idx)
        last = last_to_finish(count_ptr + row, SPLITS)
        offs_s = tl.arange(0, BLOCK_S)
        tops = tl.load(part_val_ptr + row * SPLITS + offs_s, mask=offs_s < SPLITS, other=float("-inf"),
                       cache_modifier=".cg")
        idxs = tl.load(part_idx_ptr + row * SPLITS + offs_s, mask=offs_s < SPLITS, other=2147483647,
                       cache_modifier=".cg")
        top = tl.max(tops, axis=0)
        idx = tl.min(tl.where(tops == top, idxs, 2147483647), axis=0)  # chunks in order: the first index wins
    tl.store(out_ptr + row * stride_out, idx.to(tl.int64), mask=last)
    if ADVANCE:  # the next decode step: this token at the next position (its slot in the cache)
        nxt = tl.minimum(pos + 1, limit)
        tl.store(pos_ptr + row * stride_pos, nxt, mask=last)
        tl.store(lens_ptr + row, (nxt + 1).to(lens_ptr.dtype.element_ty), mask=last)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           seed: torch.Tensor | None = None, positions: torch.Tensor | None = None, out: torch.Tensor | None = None,
           seq_lens: torch.Tensor | None = None, limit: int = 0) -> torch.Tensor:
    """Next tokens [B] (int64, on the logits' device) from logits [B, V] (any float dtype). ``seed``: an int64
    device tensor of one element; ``positions`` [B]: int64, the position of the token each row's logits follow
    (the draw is keyed by the next one). With ``out`` and ``seq_lens`` the step also advances the decode loop in
    place: ``out[r]`` = the token, ``positions[r]`` = min(positions[r] + 1, limit), ``seq_lens[r]`` = that + 1."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be a row-major [B, V] matrix, got {tuple(logits.shape)}")
    b, v = logits.shape
    dev = logits.device
    greedy = temperature == 0.0
    if not greedy and (seed is None or positions is None):
        raise ValueError("sampling needs seed and positions tensors on the device")
    advance = out is not None
    if advance and (positions is None or seq_lens is None):
        raise ValueError("advancing the decode loop needs positions and seq_lens")
    for name, t in (("positions", positions), ("out", out), ("seq_lens", seq_lens)):
        if t is not None and (t.dim() != 1 or t.shape[0] != b or t.device != dev):
            raise ValueError(f"{name} must be a vector of {b} (one per row of logits) on {dev}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if seed is not None and (seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != dev):
        raise ValueError(f"seed must be one int64 on {dev}, got {tuple(seed.shape)} {seed.dtype} on {seed.device}")
    if out is None:
        out = torch.empty(b, dtype=torch.int64, device=dev)
    if positions is None:
        positions = torch.zeros(b, dtype=torch.int64, device=dev)
    filtered = not greedy and (0 < top_k < v or top_p < 1.0)
    block_v = min(1024, triton.next_power_of_2(v))
    blocks = triton.cdiv(v, block_v)
    # on a GPU a row's vocabulary is split over programs (one would read 256 KB and draw 128K Philox numbers
    # alone); top-k/top-p keep one program per row
    splits = 1 if filtered or interpreted(dev) else max(1, min(blocks, triton.cdiv(2 * sm_count(dev), b), 64))
    chunk = block_v * triton.cdiv(blocks, splits)
    splits = triton.cdiv(v, chunk)  # no program without a chunk
    split = splits > 1
    part_val = torch.empty(b * splits if split else 1, dtype=torch.float32, device=dev)
    part_idx = torch.empty(b * splits if split else 1, dtype=torch.int32, device=dev)
    count = counters(b, dev) if split else part_idx
    sample_kernel[(b, splits)](
        logits, out, seed if seed is not None else positions, positions, seq_lens if advance else positions,
        part_val, part_idx, count,
        v, chunk, splits, logits.stride(0), out.stride(0), positions.stride(0),
        1.0 / temperature if not greedy else 1.0, float(min(top_k, v) if top_k else v), float(top_p), limit,
        GREEDY=greedy, FILTER=filtered, ADVANCE=advance, STEPS=BISECT_STEPS, BLOCK_V=block_v,
        BLOCK_S=triton.next_power_of_2(splits))
    return out
