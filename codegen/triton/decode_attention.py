"""Decode attention (one query per sequence) over the KV cache, split-K ("flash decoding"): the cache's valid
length is cut into SPLITS chunks processed by separate programs, each for one kv head and all the query heads of
its GQA group (the K/V tile is loaded once for the group); a second kernel merges the chunks' partial softmax
sums. One program per (sequence, query head) would leave most of a GPU idle at batch 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, lens_ptr, part_ptr, stat_ptr,  # pointers
    HK, GROUP, D, DV, SPLITS, CHUNK,  # sizes: kv heads, query heads per kv head, head dims, splits, keys per split
    stride_qb, stride_kb, stride_kh, stride_kj, stride_vb, stride_vh, stride_vj,  # strides
    scale, window,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bk // HK
    kvh = pid_bk % HK
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    heads = kvh * GROUP + offs_g  # the query heads of this kv head
    mask_g = offs_g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * D + offs_d[None, :],
                mask=mask_g[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = tl.load(pos_ptr + b)
    n_keys = tl.load(lens_ptr + b)
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, n_keys)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for j0 in range(start, stop, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        k = tl.load(k_ptr + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kj + offs_d[None, :],
                    mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vj + offs_dv[None, :],
                    mask=mask_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = mask_g[:, None] & mask_n[None, :]
        if CAUSAL:
            diff = qpos - offs_n
            visible = visible & (diff >= 0)[None, :]
            if window > 0:
                visible = visible & (diff < window)[None, :]
        scores = tl.where(visible, scores, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(visible, tl.exp(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # partials: acc [B, Hq, SPLITS, DV] and (m, l) [B, Hq, SPLITS, 2]
    row = (b * HK * GROUP + heads) * SPLITS + split
    tl.store(part_ptr + row[:, None] * DV + offs_dv[None, :], acc, mask=mask_g[:, None] & (offs_dv[None, :] < DV))
    tl.store(stat_ptr + row * 2, m_i, mask=mask_g)
    tl.store(stat_ptr + row * 2 + 1, l_i, mask=mask_g)


@triton.jit
def merge_splits_kernel(
    part_ptr, stat_ptr, out_ptr,  # pointers
    HQ, DV, SPLITS,  # sizes
    stride_ob,  # strides
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)  # b * HQ + h
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_s = offs_s < SPLITS
    m = tl.load(stat_ptr + (pid * SPLITS + offs_s) * 2, mask=mask_s, other=-1.0e30)
    denom = tl.load(stat_ptr + (pid * SPLITS + offs_s) * 2 + 1, mask=mask_s, other=0.0)
    acc = tl.load(part_ptr + (pid * SPLITS + offs_s)[:, None] * DV + offs_dv[None, :],
                  mask=mask_s[:, None] & (offs_dv[None, :] < DV), other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(denom > 0, tl.exp(m - m_all), 0.0)
    total = tl.sum(denom * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0)
    out = tl.where(total > 0, out / tl.where(total > 0, total, 1.0), 0.0)
    tl.store(out_ptr + b * stride_ob + h * DV + offs_dv, out.to(out_ptr.dtype.element_ty), mask=offs_dv < DV)


def decode_attention(q, k_cache, v_cache, positions, seq_lens, scale, causal=True, window=0, splits=None):
    """``cached_attention`` for one query per sequence: q [B, 1, Hq*D], caches [B, Hk, T, D] -> [B, 1, Hq*Dv]."""
    b, s, width = q.shape
    assert s == 1, "decode_attention takes one query per sequence"
    _, hk, t, d = k_cache.shape
    dv = v_cache.shape[-1]
    hq = width // d
    group = hq // hk
    if splits is None:  # enough programs to fill the GPU, at least 64 keys each
        splits = max(1, min(triton.cdiv(t, 64), triton.cdiv(132 * 4, b * hk)))
    chunk = triton.cdiv(t, splits)
    q = q.reshape(b, width).contiguous()
    part = torch.empty(b * hq * splits, dv, dtype=torch.float32, device=q.device)
    stat = torch.empty(b * hq * splits, 2, dtype=torch.float32, device=q.device)
    on_cpu = q.device.type == "cpu"
    decode_attention_kernel[(b * hk, splits)](
        q, k_cache, v_cache, positions.reshape(-1).contiguous(), seq_lens.contiguous(), part, stat,
        hk, group, d, dv, splits, chunk,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), scale, window,
        CAUSAL=causal, PRECISION="ieee" if q.dtype == torch.float32 or on_cpu else None, UPCAST=on_cpu,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=16 if on_cpu else 64,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)))
    out = torch.empty(b, 1, hq * dv, dtype=q.dtype, device=q.device)
    merge_splits_kernel[(b * hq,)](part, stat, out, hq, dv, splits, out.stride(0),
                                   BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=triton.next_power_of_2(dv))
    return out
