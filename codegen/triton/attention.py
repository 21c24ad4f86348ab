"""Attention, flash style: one program per (batch·query head, block of queries), an online softmax over blocks
of keys, GQA by reading kv head ``h // (Hq / Hkv)``.

Keys come from a cache ``[B, Hkv, T, D]`` (key j sits at position j) or, for the ``attention`` op, from the
call's own token-major ``[B, S, Hkv*D]`` tensors (key j at ``positions[b, j]``). Key j is visible to query i when
``j < seq_lens[b]``, and, when causal, ``pos_j <= pos_i`` (and ``pos_i - pos_j < window``). The loop over keys
stops at ``seq_lens[b]``, so the cost follows the valid length, not the cache's; over a cache with causal masking a
block of queries also skips the key blocks past its last query and before its window (half the work of a causal
prefill), and runs the key blocks all its queries see without computing masks. A query that sees no key gets
zeros. f32 inputs use IEEE dot products (no TF32), so they match the reference closely.

Scores are ``q·k * scale``; with ``softcap`` > 0 they are soft-capped to ``softcap * tanh(score / softcap)``
(Gemma-2) before the masks. With ``sinks`` [Hq] each query head's softmax has one more logit, ``sinks[h]``, that
takes probability mass but adds no value (gpt-oss): out = sum_j e^(s_j) v_j / (sum_j e^(s_j) + e^(sink)). Both
are compile-time switches (SOFTCAP = 0, SINKS = False: the kernels without them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton import interpreted


@triton.jit
def soft_cap(scores, SOFTCAP: tl.constexpr):
    """``SOFTCAP * tanh(scores / SOFTCAP)`` (Gemma-2's logit soft-capping) for SOFTCAP > 0, else ``scores``. tanh as
    2·sigmoid(2x) - 1: not every Triton has tl.tanh (elementwise.py's TANH does the same)."""
    if SOFTCAP > 0:
        scores = SOFTCAP * (2.0 * tl.sigmoid(scores * (2.0 / SOFTCAP)) - 1.0)
    return scores


@triton.jit
def online_softmax_step(scores, visible, v, m_i, l_i, acc, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one block of keys into a running softmax: ``scores`` [M, N] (-1e30 where not ``visible``), their
    values ``v`` [N, DV], the running max ``m_i`` and sum ``l_i`` [M] and output ``acc`` [M, DV]. With MASK, keys
    that are not visible weigh exactly 0, so a row that sees nothing yet keeps l = 0. Returns (m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    if MASK:
        p = tl.where(visible, p, 0.0)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_block(q, k_base, v_base, kpos_base, qpos, mask_m, j0, n_keys, window, scale, m_i, l_i, acc,
                  stride_kj, stride_vj, D, DV,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, KEY_POS: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    """One block of keys into the online softmax (scores soft-capped when SOFTCAP > 0). MASK=False: the caller
    knows every key of the block is visible to every query of the block (no masks computed)."""
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < n_keys
    if MASK:
        k = tl.load(k_base + offs_n[:, None] * stride_kj + offs_d[None, :],
                    mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0)
    else:
        k = tl.load(k_base + offs_n[:, None] * stride_kj + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    scores = soft_cap(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, SOFTCAP)  # masks after the cap
    if MASK:
        if KEY_POS:
            kpos = tl.load(kpos_base + offs_n, mask=mask_n, other=0)
        else:
            kpos = offs_n.to(tl.int64)
        visible = mask_m[:, None] & mask_n[None, :]
        if CAUSAL:
            diff = qpos[:, None] - kpos[None, :]
            visible = visible & (diff >= 0) & ((window <= 0) | (diff < window))
        scores = tl.where(visible, scores, -1.0e30)
        v = tl.load(v_base + offs_n[:, None] * stride_vj + offs_dv[None, :],
                    mask=mask_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
    else:
        visible = scores  # (unread: no mask)
        v = tl.load(v_base + offs_n[:, None] * stride_vj + offs_dv[None, :], mask=offs_dv[None, :] < DV, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    return online_softmax_step(scores, visible, v, m_i, l_i, acc, MASK, PRECISION)


@triton.jit
def attention_kernel(
    q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, lens_ptr, sinks_ptr, out_ptr,  # pointers (sinks: read with SINKS)
    S, HQ, GROUP, D, DV,  # sizes: queries per sequence, query heads, query heads per kv head, head dims
    stride_qb, stride_qs, stride_kb, stride_kh, stride_kj, stride_vb, stride_vh, stride_vj,  # strides
    stride_ob, stride_os, stride_pb, stride_kpb,
    scale, window,
    CAUSAL: tl.constexpr, KEY_POS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # causal: the longest query blocks start first
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < S
    q = tl.load(q_ptr + b * stride_qb + offs_m[:, None] * stride_qs + h * D + offs_d[None, :],
                mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = tl.load(qpos_ptr + b * stride_pb + offs_m, mask=mask_m, other=0)
    n_keys = tl.load(lens_ptr + b).to(tl.int64)
    # Blocks of keys [lo, hi) hold every key a query of this block can see; those in [full_lo, full_hi) are seen
    # by all of them, so they skip the masks. Keys given by position (KEY_POS) are all masked.
    lo = n_keys * 0
    hi = n_keys
    full_lo = lo
    full_hi = lo
    if CAUSAL:
        if not KEY_POS:  # key j sits at position j
            q_first = tl.min(tl.where(mask_m, qpos, 1 << 62), axis=0)
            q_last = tl.max(tl.where(mask_m, qpos, -1), axis=0)
            hi = tl.minimum(q_last + 1, n_keys)
            lo = tl.where(window > 0, tl.maximum(q_first - window + 1, 0), 0) // BLOCK_N * BLOCK_N
            full_lo = tl.where(window > 0, tl.maximum(q_last - window + 1, 0), 0)
            full_lo = (full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N
            full_hi = tl.maximum(tl.minimum(q_first + 1, n_keys) // BLOCK_N * BLOCK_N, full_lo)
    elif not KEY_POS:
        full_hi = n_keys // BLOCK_N * BLOCK_N
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    kpos_base = kpos_ptr + b * stride_kpb
    if SINKS:  # the sink's logit opens every row's softmax: max = sink, sum = e^(sink - sink) = 1, no value
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(sinks_ptr + h).to(tl.float32)
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for j0 in range(lo, tl.minimum(full_lo, hi), BLOCK_N):  # the window's lower edge
        m_i, l_i, acc = _attend_block(q, k_base, v_base, kpos_base, qpos, mask_m, j0, n_keys, window, scale, m_i,
                                      l_i, acc, stride_kj, stride_vj, D, DV, True, CAUSAL, KEY_POS, PRECISION, UPCAST,
                                      SOFTCAP, BLOCK_N, BLOCK_D, BLOCK_DV)
    for j0 in range(full_lo, full_hi, BLOCK_N):  # wholly visible
        m_i, l_i, acc = _attend_block(q, k_base, v_base, kpos_base, qpos, mask_m, j0, n_keys, window, scale, m_i,
                                      l_i, acc, stride_kj, stride_vj, D, DV, False, CAUSAL, KEY_POS, PRECISION,
                                      UPCAST, SOFTCAP, BLOCK_N, BLOCK_D, BLOCK_DV)
    for j0 in range(full_hi, hi, BLOCK_N):  # the diagonal and the valid length's edge
        m_i, l_i, acc = _attend_block(q, k_base, v_base, kpos_base, qpos, mask_m, j0, n_keys, window, scale, m_i,
                                      l_i, acc, stride_kj, stride_vj, D, DV, True, CAUSAL, KEY_POS, PRECISION, UPCAST,
                                      SOFTCAP, BLOCK_N, BLOCK_D, BLOCK_DV)
    # l = 0: the query saw no key (and there is no sink); with a sink such a query has acc = 0, so zeros too
    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    tl.store(out_ptr + b * stride_ob + offs_m[:, None] * stride_os + h * DV + offs_dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_dv[None, :] < DV))


def _launch(q, k4, v4, positions, key_positions, seq_lens, hq, scale, causal, window, softcap, sinks):
    """q [B, S, Hq*D]; k4, v4 as [B, Hkv, L, D] views (any strides, unit last stride); sinks [Hq] or None."""
    b, s, width = q.shape
    d, dv, hk = width // hq, v4.shape[-1], k4.shape[1]
    out = torch.empty(b, s, hq * dv, dtype=q.dtype, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    on_cpu = interpreted(q.device)
    if on_cpu:
        block_m, block_n, options = 16, 16, {}
    else:  # the flash-attention shape for Hopper (Triton's tutorial, FlashAttention-2): chosen, not yet tuned
        block_m = min(128, max(16, triton.next_power_of_2(s)))
        block_n = 64
        options = {"num_warps": 8 if block_m == 128 else 4, "num_stages": 3}
    grid = (b * hq, triton.cdiv(s, block_m))
    kpos = key_positions if key_positions is not None else positions
    sinks_arg = sinks.contiguous() if sinks is not None else seq_lens  # a stand-in, never read without sinks
    attention_kernel[grid](
        q, k4, v4, positions, kpos, seq_lens, sinks_arg, out,
        s, hq, hq // hk, d, dv,
        q.stride(0), q.stride(1), k4.stride(0), k4.stride(1), k4.stride(2), v4.stride(0), v4.stride(1),
        v4.stride(2), out.stride(0), out.stride(1), positions.stride(0), kpos.stride(0),
        scale, window,
        CAUSAL=causal, KEY_POS=key_positions is not None,
        PRECISION="ieee" if q.dtype == torch.float32 or on_cpu else None,
        UPCAST=on_cpu,  # the interpreter computes bf16 dots wrongly: give it f32
        SOFTCAP=float(softcap), SINKS=sinks is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), **options)
    return out


def _heads(x, h):
    b, s, width = x.shape
    return x.reshape(b, s, h, width // h).transpose(1, 2)


def attention(q, k, v, positions, seq_lens, heads, scale, causal=True, window=0, softcap=0.0, sinks=None):
    """The ``attention`` op: q [B, S, Hq*D], k [B, S, Hk*D], v [B, S, Hk*Dv] -> [B, S, Hq*Dv]; scores soft-capped
    when ``softcap`` > 0, ``sinks`` [Hq] (any float dtype, read in f32) or None."""
    hq, hk = heads
    positions = positions.contiguous()
    return _launch(q, _heads(k, hk), _heads(v, hk), positions, positions, seq_lens.contiguous(), hq, scale,
                   causal, window, softcap, sinks)


def cached_attention(q, k_cache, v_cache, positions, seq_lens, scale, causal=True, window=0, softcap=0.0,
                     sinks=None):
    """The ``cached_attention`` op: q [B, S, Hq*D] over caches [B, Hk, T, D] -> [B, S, Hq*Dv]; ``softcap`` and
    ``sinks`` as in ``attention``."""
    hq = q.shape[2] // k_cache.shape[3]
    return _launch(q, k_cache, v_cache, positions.contiguous(), None, seq_lens.contiguous(), hq, scale, causal,
                   window, softcap, sinks)
