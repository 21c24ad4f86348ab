"""RoPE on q and k, optionally fused with the KV-cache writes: one program per (token, head).

cos/sin are computed in the kernel from ``positions`` and ``inv_freq`` (as the model does: f32 angle, times the
multiplier, cast to the activation dtype), so no table lives in memory. Layout "half" rotates (x[:R/2],
x[R/2:]); "interleaved" rotates even/odd pairs. ``rope_cache_write`` rotates q, sends k straight to its cache
slot and copies v into its own, in one launch over the heads of all three. ``rope_rows`` is shared with decode
attention, which applies RoPE itself when it appends the step's k and v (decode_attention.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _normed(x, nw_ptr, idx, inv_rms, D, NORM: tl.constexpr):
    """x [f32] as the model's per-head RMSNorm leaves it: w · (x · inv_rms).to(dtype), rounded to dtype."""
    if NORM:
        w = tl.load(nw_ptr + idx, mask=idx < D, other=0.0).to(tl.float32)
        x = (w * (x * inv_rms).to(nw_ptr.dtype.element_ty).to(tl.float32)).to(nw_ptr.dtype.element_ty)
        x = x.to(tl.float32)
    return x


@triton.jit
def rope_rows(x_ptrs, offs_d, mask, pos, inv_ptr, scaling, nw_ptr, eps, D,
              HALF: tl.constexpr, HALF_R: tl.constexpr, NORM: tl.constexpr):
    """Rows of heads rotated at position ``pos``: ``x_ptrs + offs_d`` addresses the elements (any broadcast
    shape, ``offs_d`` the dimension within a head of D); the first 2·HALF_R dimensions rotate. With NORM each row
    is first RMS-normalised with weight ``nw_ptr`` (Qwen3's q/k norms), statistics in f32."""
    x = tl.load(x_ptrs + offs_d, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    inv_rms = 1.0
    if NORM:
        inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=-1, keep_dims=True) / D + eps)
        x32 = _normed(x32, nw_ptr, offs_d, inv_rms, D, NORM)
    # the partner of dimension d and the frequency index it uses
    if HALF:
        pair = tl.where(offs_d < HALF_R, offs_d + HALF_R, offs_d - HALF_R)
        freq_idx = tl.where(offs_d < HALF_R, offs_d, offs_d - HALF_R)
        sign = tl.where(offs_d < HALF_R, -1.0, 1.0)
    else:
        pair = tl.where(offs_d % 2 == 0, offs_d + 1, offs_d - 1)
        freq_idx = offs_d // 2
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    rotated = offs_d < 2 * HALF_R
    inv = tl.load(inv_ptr + freq_idx, mask=rotated, other=0.0)
    angle = pos.to(tl.float32) * inv
    # cos/sin rounded to the activation dtype as the model rounds them; each product and the sum rounded as the
    # model's element-wise ops round them (exact in f32)
    cos = (tl.cos(angle) * scaling).to(x.dtype).to(tl.float32)
    sin = (tl.sin(angle) * scaling).to(x.dtype).to(tl.float32)
    partner = tl.load(x_ptrs + pair, mask=rotated & mask, other=0.0).to(tl.float32)
    partner = _normed(partner, nw_ptr, pair, inv_rms, D, NORM)
    a = (x32 * cos).to(x.dtype).to(tl.float32)
    b = (sign * partner * sin).to(x.dtype).to(tl.float32)
    return tl.where(rotated, (a + b).to(x.dtype), x32.to(x.dtype))


@triton.jit
def rope_kernel(
    x_ptr, pos_ptr, inv_ptr, out_ptr,  # pointers
    H, D,  # sizes: heads, head dim
    stride_xt, stride_ot,  # strides: token rows
    scaling,
    HALF: tl.constexpr, HALF_R: tl.constexpr, BLOCK_D: tl.constexpr,  # HALF_R: number of rotated pairs
):
    tok = tl.program_id(0)  # b * S + s
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + tok)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    out = rope_rows(x_ptr + tok * stride_xt + head * D, offs_d, mask_d, pos, inv_ptr, scaling, inv_ptr, 0.0, D,
                    HALF, HALF_R, False)
    tl.store(out_ptr + tok * stride_ot + head * D + offs_d, out, mask=mask_d)


@triton.jit
def rope_cache_write_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_ptr, q_out_ptr, kc_ptr, vc_ptr,  # pointers
    S, HQ, HK, HV, D, DV, T,  # sizes: sequence, heads of q / k / v, head dims, cache slots
    stride_qt, stride_kt, stride_vt, stride_ot,  # strides: token rows
    stride_kcb, stride_kch, stride_kct, stride_vcb, stride_vch, stride_vct,  # strides: cache batch, head, slot
    scaling,
    HALF: tl.constexpr, HALF_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Programs (token, head) over HQ + HK + HV heads: q heads rotate into q_out, k heads rotate into their
    cache slot, v heads are copied into theirs; slots outside [0, T) are skipped."""
    tok = tl.program_id(0)  # b * S + s
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + tok)
    b = tok // S
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.zeros([BLOCK_D], dtype=tl.int64) + pos  # the token's cache slot, per lane
    in_cache = (slot >= 0) & (slot < T)
    if head < HQ:
        mask = offs_d < D
        out = rope_rows(q_ptr + tok * stride_qt + head * D, offs_d, mask, pos, inv_ptr, scaling, inv_ptr, 0.0, D,
                        HALF, HALF_R, False)
        tl.store(q_out_ptr + tok * stride_ot + head * D + offs_d, out, mask=mask)
    elif head < HQ + HK:
        h = head - HQ
        mask = offs_d < D
        out = rope_rows(k_ptr + tok * stride_kt + h * D, offs_d, mask, pos, inv_ptr, scaling, inv_ptr, 0.0, D,
                        HALF, HALF_R, False)
        tl.store(kc_ptr + b * stride_kcb + h * stride_kch + slot * stride_kct + offs_d, out, mask=mask & in_cache)
    else:
        h = head - HQ - HK
        mask = offs_d < DV
        v = tl.load(v_ptr + tok * stride_vt + h * DV + offs_d, mask=mask, other=0.0)
        tl.store(vc_ptr + b * stride_vcb + h * stride_vch + slot * stride_vct + offs_d, v, mask=mask & in_cache)


def _rows(x):
    """[B, S, W] -> [B*S, W] with a contiguous last dimension."""
    x2 = x.reshape(x.shape[0] * x.shape[1], x.shape[2])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _cache_strides(cache):
    return cache.stride(0), cache.stride(1), cache.stride(2)


def rope(q, k, positions, heads, inv_freq, scaling=1.0, layout="half"):
    """The ``rope`` op: q [B, S, Hq*D], k [B, S, Hk*D], positions [B, S] -> rotated q, k."""
    pos = positions.reshape(-1).contiguous()
    outs = []
    for x, h in zip((q, k), heads):
        x2 = _rows(x)
        out = torch.empty_like(x2)
        rope_kernel[(x2.shape[0], h)](
            x2, pos, inv_freq, out, h, x.shape[2] // h, x2.stride(0), out.stride(0), scaling,
            HALF=layout == "half", HALF_R=max(1, inv_freq.numel()), BLOCK_D=triton.next_power_of_2(x.shape[2] // h))
        outs.append(out.reshape(x.shape))
    return tuple(outs)


def _cache_write(q, k, v, positions, heads, inv_freq, k_cache, v_cache, scaling, layout):
    """One launch: q (or None) rotated and returned, k (or None) rotated into k_cache, v into v_cache."""
    b, s = v.shape[:2]
    hq, hk = heads
    v2 = _rows(v)
    q2, k2 = (_rows(q) if q is not None else v2), (_rows(k) if k is not None else v2)  # v2: never read
    out = torch.empty_like(q2) if q is not None else v2
    k_cache = k_cache if k_cache is not None else v_cache
    d, dv = k_cache.shape[-1], v_cache.shape[-1]
    rope_cache_write_kernel[(b * s, hq + hk + v_cache.shape[1])](
        q2, k2, v2, positions.reshape(-1).contiguous(), inv_freq, out, k_cache, v_cache,
        s, hq, hk, v_cache.shape[1], d, dv, v_cache.shape[2],
        q2.stride(0), k2.stride(0), v2.stride(0), out.stride(0), *_cache_strides(k_cache), *_cache_strides(v_cache),
        scaling, HALF=layout == "half", HALF_R=max(1, inv_freq.numel()), BLOCK_D=triton.next_power_of_2(max(d, dv)))
    return out.reshape(q.shape) if q is not None else None


def rope_cache_write(q, k, v, positions, heads, inv_freq, k_cache, v_cache, scaling=1.0, layout="half"):
    """RoPE on q (returned) and k, k and v written into their caches [B, Hk, T, D] at ``positions`` (slots
    outside the cache are skipped), all in one launch; the caches are updated in place."""
    return _cache_write(q, k, v, positions, heads, inv_freq, k_cache, v_cache, scaling, layout)


def kv_cache_write(cache, values, positions):
    """The ``kv_cache_write`` op, in place: values [B, S, Hk*D] into cache [B, Hk, T, D] at positions."""
    dummy = torch.empty(1, device=cache.device, dtype=torch.float32)
    _cache_write(None, None, values, positions, (0, 0), dummy, None, cache, 1.0, "half")
    return cache
