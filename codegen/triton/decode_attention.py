"""Decode attention (one query per sequence) over the KV cache, split-K ("flash decoding"), in one launch.

Programs (sequence · kv head, split): each takes all the query heads of its GQA group (the K/V tile is loaded
once for the group) over one chunk of the sequence's valid keys — chunks are cut from the valid length read on
the device, so the grid depends only on the batch and a captured graph serves every length. Each program writes
its partial softmax sums; the last program of a (sequence, kv head) to finish — counted with an atomic — merges
them and writes the output, so no second kernel runs. One program per (sequence, query head) would leave most of
a GPU idle at batch 1.

With ``new_k``/``new_v`` given (the decode step's rope and cache writes fused in): q is rotated in the prologue
(after its per-head RMSNorm, for Qwen3's q/k norms), and the program whose chunk holds the step's own slot
attends to that key from registers while split 0 writes k and v into the caches; the other programs skip the
slot. The decode step's attention is then one launch.

Scores are soft-capped (``softcap * tanh(score / softcap)``, Gemma-2) when ``softcap`` > 0, before the masks, and
``sinks`` [Hq] adds one logit per query head to its softmax that takes weight but no value (gpt-oss): the
splits' partial sums leave it out and the merge counts it, once. Both are compile-time switches, as in
attention.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton import interpreted, sm_count
from lowerlm.codegen.triton.attention import online_softmax_step, soft_cap
from lowerlm.codegen.triton.rope import rope_rows
from lowerlm.codegen.triton.splits import counters, last_to_finish

MAX_SPLITS = 16  # enough programs to fill an H100 at batch 1 with few kv heads; the merge loads one tile


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, lens_ptr, sinks_ptr, part_ptr, stat_ptr, count_ptr, out_ptr,  # pointers
    new_k_ptr, new_v_ptr, inv_ptr, qn_ptr, kn_ptr,  # the step's own k, v rows, RoPE frequencies, q/k norm weights
    HK, GROUP, D, DV, T, SPLITS,  # sizes: kv heads, query heads per kv head, head dims, cache slots, splits
    stride_qb, stride_kb, stride_kh, stride_kj, stride_vb, stride_vh, stride_vj, stride_ob,  # strides
    stride_nkb, stride_nvb,
    scale, window, scaling, norm_eps,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
    ROPE_APPEND: tl.constexpr, HALF: tl.constexpr, HALF_R: tl.constexpr, QK_NORM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MERGE_G: tl.constexpr, BLOCK_S: tl.constexpr,
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
    mask_q = mask_g[:, None] & (offs_d[None, :] < D)
    qpos = tl.load(pos_ptr + b)
    n_keys = tl.minimum(tl.load(lens_ptr + b), T)  # never past the cache, whatever the lengths say
    q_rows = q_ptr + b * stride_qb + heads[:, None] * D
    if ROPE_APPEND:
        q = rope_rows(q_rows, offs_d[None, :], mask_q, qpos, inv_ptr, scaling, qn_ptr, norm_eps, D, HALF, HALF_R,
                      QK_NORM)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=mask_q, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lo = qpos * 0
    if CAUSAL:  # keys before a sliding window are never visible: split only the window
        lo = tl.where(window > 0, tl.maximum(qpos - window + 1, 0), lo)
    chunk = tl.cdiv(tl.maximum(n_keys - lo, 0), SPLITS)
    start = lo + split * chunk
    stop = tl.minimum(start + chunk, n_keys)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    k_head = k_ptr + b * stride_kb + kvh * stride_kh
    v_head = v_ptr + b * stride_vb + kvh * stride_vh
    for j0 in range(start, stop, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        if ROPE_APPEND:
            mask_n = mask_n & (offs_n != qpos)  # the step's own slot is attended from registers below
        k = tl.load(k_head + offs_n[:, None] * stride_kj + offs_d[None, :],
                    mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_head + offs_n[:, None] * stride_vj + offs_dv[None, :],
                    mask=mask_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = soft_cap(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, SOFTCAP)
        visible = mask_g[:, None] & mask_n[None, :]
        if CAUSAL:
            diff = qpos - offs_n
            visible = visible & (diff >= 0)[None, :]
            if window > 0:
                visible = visible & (diff < window)[None, :]
        scores = tl.where(visible, scores, -1.0e30)
        m_i, l_i, acc = online_softmax_step(scores, visible, v, m_i, l_i, acc, True, PRECISION)
    if ROPE_APPEND:
        mask_d = offs_d < D
        mask_dv = offs_dv < DV
        k_new = rope_rows(new_k_ptr + b * stride_nkb + kvh * D, offs_d, mask_d, qpos, inv_ptr, scaling, kn_ptr,
                          norm_eps, D, HALF, HALF_R, QK_NORM)
        v_new = tl.load(new_v_ptr + b * stride_nvb + kvh * DV + offs_dv, mask=mask_dv, other=0.0)
        if split == 0:  # the cache write, whether or not the slot is within the valid length
            slot = tl.zeros([BLOCK_D], dtype=tl.int64) + qpos
            tl.store(k_head + slot * stride_kj + offs_d, k_new, mask=mask_d & (slot >= 0) & (slot < T))
            slot_v = tl.zeros([BLOCK_DV], dtype=tl.int64) + qpos
            tl.store(v_head + slot_v * stride_vj + offs_dv, v_new, mask=mask_dv & (slot_v >= 0) & (slot_v < T))
        if (qpos >= start) & (qpos < stop) & (qpos < T):  # this chunk holds the step's own key
            # online_softmax_step for one key (a dot product needs 16): the same update as vectors
            s_new = soft_cap(tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale, SOFTCAP)
            s_new = tl.where(mask_g, s_new, -1.0e30)
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp(m_i - m_new)
            p_new = tl.where(mask_g, tl.exp(s_new - m_new), 0.0)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new
    # partials: acc [B, Hq, SPLITS, DV] and (m, l) [B, Hq, SPLITS, 2]
    row = (b * HK * GROUP + heads) * SPLITS + split
    tl.store(part_ptr + row[:, None] * DV + offs_dv[None, :], acc, mask=mask_g[:, None] & (offs_dv[None, :] < DV))
    tl.store(stat_ptr + row * 2, m_i, mask=mask_g)
    tl.store(stat_ptr + row * 2 + 1, l_i, mask=mask_g)
    if last_to_finish(count_ptr + pid_bk, SPLITS):  # the last split of this (sequence, kv head) merges
        offs_mg = tl.arange(0, MERGE_G)
        offs_s = tl.arange(0, BLOCK_S)
        mask_gs = (offs_mg < GROUP)[:, None] & (offs_s < SPLITS)[None, :]
        rows = (b * HK * GROUP + kvh * GROUP + offs_mg)[:, None] * SPLITS + offs_s[None, :]  # [MERGE_G, BLOCK_S]
        # .cg: read the other programs' partials from L2, past this SM's L1
        m = tl.load(stat_ptr + rows * 2, mask=mask_gs, other=-1.0e30, cache_modifier=".cg")
        denom = tl.load(stat_ptr + rows * 2 + 1, mask=mask_gs, other=0.0, cache_modifier=".cg")
        parts = tl.load(part_ptr + rows[:, :, None] * DV + offs_dv[None, None, :],
                        mask=mask_gs[:, :, None] & (offs_dv < DV)[None, None, :], other=0.0, cache_modifier=".cg")
        m_all = tl.max(m, axis=1)
        if SINKS:  # the sink's logit joins the merged softmax here, once: e^(sink) in the sum, no value
            sink = tl.load(sinks_ptr + kvh * GROUP + offs_mg, mask=offs_mg < GROUP, other=0.0).to(tl.float32)
            m_all = tl.maximum(m_all, sink)
        w = tl.where(denom > 0, tl.exp(m - m_all[:, None]), 0.0)
        total = tl.sum(denom * w, axis=1)
        if SINKS:
            total += tl.exp(sink - m_all)
        out = tl.sum(parts * w[:, :, None], axis=1)
        # total = 0: the query saw no key and there is no sink (with one, out is 0 already)
        out = tl.where(total[:, None] > 0, out / tl.where(total > 0, total, 1.0)[:, None], 0.0)
        out_heads = kvh * GROUP + offs_mg
        tl.store(out_ptr + b * stride_ob + out_heads[:, None] * DV + offs_dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(offs_mg < GROUP)[:, None] & (offs_dv < DV)[None, :])


def _rows(x, b: int) -> torch.Tensor:
    """[B, 1, W] -> [B, W] as a view when its last dimension is contiguous (q, k and v are views into the qkv
    projection's one output), so no copy launches."""
    x2 = x.reshape(b, -1)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def num_splits(batch: int, kv_heads: int, slots: int, block_n: int, sms: int) -> int:
    """Splits per (sequence, kv head): about two programs per SM, at most MAX_SPLITS, no more than the cache has
    blocks of keys."""
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * sms, batch * kv_heads), triton.cdiv(slots, block_n)))


def decode_attention(q, k_cache, v_cache, positions, seq_lens, scale, causal=True, window=0, splits=None,
                     new_k=None, new_v=None, inv_freq=None, scaling=1.0, layout="half", qk_norm=None, softcap=0.0,
                     sinks=None):
    """``cached_attention`` for one query per sequence: q [B, 1, Hq*D], caches [B, Hk, T, D] -> [B, 1, Hq*Dv];
    scores soft-capped when ``softcap`` > 0, ``sinks`` [Hq] (any float dtype, read in f32) or None.

    With ``new_k``/``new_v`` [B, 1, Hk*D] and ``inv_freq``, q and new_k are rotated first and new_k/new_v written
    into the caches at ``positions`` (in place): ``rope`` + both ``kv_cache_write`` + this, in one launch. With
    ``qk_norm`` = (q weight [D], k weight [D], eps) too, q and new_k are RMS-normalised per head before RoPE."""
    b, s, width = q.shape
    assert s == 1, "decode_attention takes one query per sequence"
    _, hk, t, d = k_cache.shape
    dv = v_cache.shape[-1]
    hq = width // d
    group = hq // hk
    on_cpu = interpreted(q.device)
    block_n = 16 if on_cpu else 64
    splits = splits or num_splits(b, hk, t, block_n, sm_count(q.device))
    q = _rows(q, b)
    part = torch.empty(b * hq * splits, dv, dtype=torch.float32, device=q.device)
    stat = torch.empty(b * hq * splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, 1, hq * dv, dtype=q.dtype, device=q.device)
    append = new_k is not None
    if append:
        new_k, new_v = _rows(new_k, b), _rows(new_v, b)
    else:
        new_k, new_v, inv_freq = q, q, part  # never read
    qn, kn, eps = qk_norm if qk_norm is not None else (inv_freq, inv_freq, 0.0)  # weights never read without it
    sinks_arg = sinks.contiguous() if sinks is not None else part  # never read without sinks
    decode_attention_kernel[(b * hk, splits)](
        q, k_cache, v_cache, positions.reshape(-1).contiguous(), seq_lens.contiguous(), sinks_arg, part, stat,
        counters(b * hk, q.device), out, new_k, new_v, inv_freq, qn, kn,
        hk, group, d, dv, t, splits,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), new_k.stride(0), new_v.stride(0), scale, window, scaling, eps,
        CAUSAL=causal, PRECISION="ieee" if q.dtype == torch.float32 or on_cpu else None, UPCAST=on_cpu,
        SOFTCAP=float(softcap), SINKS=sinks is not None,
        ROPE_APPEND=append, HALF=layout == "half", HALF_R=max(1, inv_freq.numel()) if append else 1,
        QK_NORM=append and qk_norm is not None,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        MERGE_G=triton.next_power_of_2(group), BLOCK_S=triton.next_power_of_2(splits))
    return out
