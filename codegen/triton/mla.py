"""Multi-head latent attention (DeepSeek-V2/V3, Kimi Linear) over the latent cache: the ``cached_mla_attention`` op.

Decode (one query per sequence) runs the absorbed form, as FlashMLA does: W_UK is folded into the query
(``q_lat_h = q_nope_h @ W_UK_h``, one batched matmul over the heads), the kernel attends over the latents c [T, L]
and the shared rotary keys k_pe [T, R] -- ``score_t = scale * (q_lat_h . c_t + q_pe_h . k_pe_t)``, an online
softmax in f32, ``o_lat_h = sum_t p_t c_t`` -- and W_UV is applied after it (``out_h = o_lat_h @ W_UV_h.T``, one
more batched matmul). No key or value is expanded; the cache is read as L + R numbers per token.

Programs (sequence · block of BLOCK_H heads, split): every head reads the same latents, so a program takes a block
of heads and each c tile it loads serves all of them (the score and the output are [BLOCK_H, BLOCK_N] x
[BLOCK_N, L] dots on the one tile); programs of the same split and sequence run side by side, so the other blocks
of heads find the tile in L2. The sequence's visible slots, ``t < min(seq_lens[b], positions[b] + 1)`` read on the
device, are cut into SPLITS chunks of whole key blocks (split-K, "flash decoding"), so the grid depends only on the
batch and the cache's size and a captured graph serves every length; nothing at or past the row's visible length
is read. Each program writes its partial softmax sums (f32: the un-normalised latent output and the running
max and sum); a second, small launch merges them per (sequence, head, slice of L) and writes o_lat in q's dtype --
a [H, B, L] layout, so the W_UV matmul reads it without a copy. (decode_attention.py merges inside its one launch,
by the last program to finish; here a head block's partials are L = 512 wide, too much for one program to merge
in series, so the merge is its own parallel launch.) A query that sees no slot gets zeros.

Several queries per sequence (prefill, chunked prefill) take the naive form: keys and values expanded from the
cache's valid slots (``mla_expand``: one torch matmul, a GEMM worth its cost when many queries share it) and the
flash attention kernel of attention.py over them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton import interpreted, sm_count
from lowerlm.codegen.triton.attention import cached_attention, online_softmax_step
from lowerlm.ir import compute

MAX_SPLITS = 64  # enough programs to fill an H100 at batch 1 with few blocks of heads (Kimi: 32 heads, 2 blocks)


@triton.jit
def mla_decode_kernel(
    qlat_ptr, q_ptr, c_ptr, kpe_ptr, pos_ptr, lens_ptr, part_ptr, stat_ptr,  # pointers
    H, P, L, R, T, SPLITS,  # sizes: heads, nope dims (q_pe's offset in a head), latent, rotary, cache slots, splits
    stride_lh, stride_lb, stride_qb, stride_qh, stride_cb, stride_ct, stride_kb, stride_kt,  # strides
    scale,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_PE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_hb = tl.cdiv(H, BLOCK_H)
    b = (pid // n_hb).to(tl.int64)  # b * stride_cb may pass 2^31 (a long cache at a large batch)
    heads = (pid % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = heads < H
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    q_lat = tl.load(qlat_ptr + heads[:, None] * stride_lh + b * stride_lb + offs_l[None, :],
                    mask=mask_h[:, None] & mask_l[None, :], other=0.0)
    if UPCAST:
        q_lat = q_lat.to(tl.float32)
    if HAS_PE:
        q_pe = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + P + offs_r[None, :],
                       mask=mask_h[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:
            q_pe = q_pe.to(tl.float32)
    # slot t is visible iff t < seq_lens[b] and t <= positions[b]; never past the cache
    n_keys = tl.minimum(tl.minimum(tl.load(lens_ptr + b).to(tl.int64), tl.load(pos_ptr + b).to(tl.int64) + 1), T)
    n_keys = tl.maximum(n_keys, 0)
    chunk = tl.cdiv(tl.cdiv(n_keys, SPLITS), BLOCK_N) * BLOCK_N  # whole key blocks per split
    start = split * chunk
    stop = tl.minimum(start + chunk, n_keys)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
    c_row = c_ptr + b * stride_cb
    kpe_row = kpe_ptr + b * stride_kb
    for j0 in range(start, stop, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        c = tl.load(c_row + offs_n[:, None] * stride_ct + offs_l[None, :], mask=mask_n[:, None] & mask_l[None, :],
                    other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
        scores = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
        if HAS_PE:
            kpe = tl.load(kpe_row + offs_n[:, None] * stride_kt + offs_r[None, :],
                          mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            if UPCAST:
                kpe = kpe.to(tl.float32)
            scores += tl.dot(q_pe, tl.trans(kpe), input_precision=PRECISION)
        visible = mask_h[:, None] & mask_n[None, :]
        scores = tl.where(visible, scores * scale, -1.0e30)
        m_i, l_i, acc = online_softmax_step(scores, visible, c, m_i, l_i, acc, True, PRECISION)  # the value is c
    # partials: acc [B, H, SPLITS, L] and (m, l) [B, H, SPLITS, 2]
    row = (b * H + heads) * SPLITS + split
    tl.store(part_ptr + row[:, None] * L + offs_l[None, :], acc, mask=mask_h[:, None] & mask_l[None, :])
    tl.store(stat_ptr + row * 2, m_i, mask=mask_h)
    tl.store(stat_ptr + row * 2 + 1, l_i, mask=mask_h)


@triton.jit
def mla_combine_kernel(
    part_ptr, stat_ptr, out_ptr, H, L, SPLITS, stride_oh, stride_ob,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program per (sequence · head, slice of L): the splits' partial sums merged, o_lat written."""
    bh = tl.program_id(0)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < SPLITS
    rows = bh * SPLITS + offs_s
    m = tl.load(stat_ptr + rows * 2, mask=mask_s, other=-1.0e30)
    denom = tl.load(stat_ptr + rows * 2 + 1, mask=mask_s, other=0.0)
    w = tl.where(denom > 0, tl.exp(m - tl.max(m, axis=0)), 0.0)
    total = tl.sum(denom * w, axis=0)
    parts = tl.load(part_ptr + rows[:, None] * L + offs_l[None, :], mask=mask_s[:, None] & mask_l[None, :],
                    other=0.0)
    out = tl.sum(parts * w[:, None], axis=0)
    out = tl.where(total > 0, out / tl.where(total > 0, total, 1.0), 0.0)  # total = 0: no slot visible
    b = bh // H
    h = bh % H
    tl.store(out_ptr + h * stride_oh + b * stride_ob + offs_l, out.to(out_ptr.dtype.element_ty), mask=mask_l)


def num_splits(batch: int, head_blocks: int, slots: int, block_n: int, sms: int) -> int:
    """Splits per (sequence, block of heads): about two programs per SM, at most MAX_SPLITS, no more than the cache
    has blocks of slots."""
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * sms, batch * head_blocks), triton.cdiv(slots, block_n)))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def mla_decode(q, c_cache, k_pe_cache, w, positions, seq_lens, heads: int, nope: int, scale: float, splits=None,
               block_h=None):
    """The absorbed form for one query per sequence: q [B, 1, H*(P+R)] over c [B, 1, T, L] and k_pe [B, 1, T, R]
    with kv_b's weight w [H*(P+V), L] -> [B, 1, H*V] in q's dtype."""
    b, s, width = q.shape
    assert s == 1, "mla_decode takes one query per sequence"
    _, _, t, lat = c_cache.shape
    r = k_pe_cache.shape[-1]
    h, p = heads, nope
    assert width == h * (p + r), (q.shape, heads, nope, r)
    wh = w.to(q.dtype).view(h, -1, lat)
    w_uk, w_uv = wh[:, :p], wh[:, p:]  # [H, P, L], [H, V, L]: views
    dv = w_uv.shape[1]
    q = _unit_last(q)
    q3 = q.reshape(b, h, p + r)  # a view: S = 1, unit last stride
    q_lat = torch.bmm(q3[:, :, :p].transpose(0, 1), w_uk)  # [H, B, L]: W_UK absorbed into the query
    c_cache, k_pe_cache = _unit_last(c_cache), _unit_last(k_pe_cache)
    on_cpu = interpreted(q.device)
    if on_cpu:  # the interpreter: small tiles, f32 dots
        block_h, block_n, options = block_h or 16, 16, {}
    else:  # SGLang's Triton MLA decode tiles (16 heads x 32 slots x the whole latent): chosen, not tuned here
        block_h, block_n, options = block_h or 16, 32, {"num_warps": 4, "num_stages": 2}
    head_blocks = triton.cdiv(h, block_h)
    splits = splits or num_splits(b, head_blocks, t, block_n, sm_count(q.device))
    part = torch.empty(b * h * splits, lat, dtype=torch.float32, device=q.device)
    stat = torch.empty(b * h * splits, 2, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 or on_cpu else None
    mla_decode_kernel[(b * head_blocks, splits)](
        q_lat, q3, c_cache, k_pe_cache, positions.reshape(-1).contiguous(), seq_lens.contiguous(), part, stat,
        h, p, lat, r, t, splits,
        q_lat.stride(0), q_lat.stride(1), q3.stride(0), q3.stride(1), c_cache.stride(0), c_cache.stride(2),
        k_pe_cache.stride(0), k_pe_cache.stride(2), scale,
        PRECISION=precision, UPCAST=on_cpu, HAS_PE=r > 0,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_L=max(16, triton.next_power_of_2(lat)),
        BLOCK_R=max(16, triton.next_power_of_2(r)), **options)
    o_lat = torch.empty(h, b, lat, dtype=q.dtype, device=q.device)
    block_lc = min(128, max(16, triton.next_power_of_2(lat)))
    mla_combine_kernel[(b * h, triton.cdiv(lat, block_lc))](
        part, stat, o_lat, h, lat, splits, o_lat.stride(0), o_lat.stride(1),
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_L=block_lc)
    out = torch.empty(b, 1, h * dv, dtype=q.dtype, device=q.device)
    # through W_UV, straight into [B, H, V] (the result a strided [H, B, V] view: no copy after the matmul)
    torch.bmm(o_lat, w_uv.transpose(1, 2), out=out.view(b, h, dv).transpose(0, 1))
    return out


def cached_mla_attention(q, c_cache, k_pe_cache, w, positions, seq_lens, heads: int, nope: int, scale: float,
                         splits=None):
    """The ``cached_mla_attention`` op: q [B, S, H*(P+R)] over the latent caches c [B, 1, T, L] and k_pe
    [B, 1, T, R] -> [B, S, H*V]. One query per sequence: ``mla_decode``; more: keys and values expanded from the
    valid slots (torch) and attention.py's flash kernel over them."""
    if q.shape[1] == 1:
        return mla_decode(q, c_cache, k_pe_cache, w, positions, seq_lens, heads, nope, scale, splits)
    k, v = compute.mla_expand_cache(c_cache, k_pe_cache, w, seq_lens, heads, nope)  # [B, H, t, D] views
    return cached_attention(q, k, v, positions, seq_lens, scale, causal=True)
