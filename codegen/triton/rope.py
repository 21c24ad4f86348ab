"""RoPE on q and k, optionally fused with the KV-cache write: one program per (token, head).

cos/sin are computed in the kernel from ``positions`` and ``inv_freq`` (as the model does: f32 angle, times the
multiplier, cast to the activation dtype), so no table lives in memory. Layout "half" rotates (x[:R/2],
x[R/2:]); "interleaved" rotates even/odd pairs. With caches given, k goes straight to its cache slot (and v to
its own) instead of to an output tensor: the decode step's rope + two cache writes are one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rope_kernel(
    x_ptr, pos_ptr, inv_ptr, out_ptr,  # pointers
    S, H, D, T,  # sizes: sequence, heads of this tensor, head dim, cache length (cache mode)
    stride_xt, stride_ot, stride_cb, stride_ch, stride_ct,  # strides: token rows; cache batch, head, slot
    scaling,
    TO_CACHE: tl.constexpr, HALF: tl.constexpr, ROTATE: tl.constexpr,  # ROTATE=0 copies (v into its cache)
    HALF_R: tl.constexpr, BLOCK_D: tl.constexpr,  # HALF_R: number of rotated pairs (len(inv_freq))
):
    tok = tl.program_id(0)  # b * S + s
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + tok)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x_row = x_ptr + tok * stride_xt + head * D
    x = tl.load(x_row + offs_d, mask=mask_d, other=0.0)
    out = x
    if ROTATE:
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
        inv = tl.load(inv_ptr + freq_idx, mask=rotated & mask_d, other=0.0)
        angle = pos.to(tl.float32) * inv
        # cos/sin rounded to the activation dtype as the model rounds them; each product and the sum rounded
        # as the model's element-wise ops round them (exact in f32)
        cos = (tl.cos(angle) * scaling).to(x.dtype).to(tl.float32)
        sin = (tl.sin(angle) * scaling).to(x.dtype).to(tl.float32)
        partner = tl.load(x_row + pair, mask=rotated & mask_d, other=0.0).to(tl.float32)
        a = (x.to(tl.float32) * cos).to(x.dtype).to(tl.float32)
        b = (sign * partner * sin).to(x.dtype).to(tl.float32)
        out = tl.where(rotated, (a + b).to(x.dtype), x)
    if TO_CACHE:
        b = tok // S
        slot = tl.zeros([BLOCK_D], dtype=tl.int64) + pos  # the token's cache slot, per lane
        dst = out_ptr + b * stride_cb + head * stride_ch + slot * stride_ct + offs_d
        tl.store(dst, out, mask=mask_d & (slot >= 0) & (slot < T))
    else:
        tl.store(out_ptr + tok * stride_ot + head * D + offs_d, out, mask=mask_d)


def _launch(x, positions, inv_freq, heads, out, scaling, layout, rotate, cache=None):
    b, s, width = x.shape
    d = width // heads
    x2 = x.reshape(b * s, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    pos = positions.reshape(-1).contiguous()
    target = cache if cache is not None else out
    cb, ch, ct = (cache.stride(0), cache.stride(1), cache.stride(2)) if cache is not None else (0, 0, 0)
    rope_kernel[(b * s, heads)](
        x2, pos, inv_freq, target, s, heads, d, cache.shape[2] if cache is not None else 0,
        x2.stride(0), out.stride(0) if out is not None else 0, cb, ch, ct, scaling,
        TO_CACHE=cache is not None, HALF=layout == "half", ROTATE=rotate, HALF_R=max(1, inv_freq.numel()),
        BLOCK_D=triton.next_power_of_2(d))


def rope(q, k, positions, heads, inv_freq, scaling=1.0, layout="half"):
    """The ``rope`` op: q [B, S, Hq*D], k [B, S, Hk*D], positions [B, S] -> rotated q, k."""
    hq, hk = heads
    outs = []
    for x, h in ((q, hq), (k, hk)):
        out = torch.empty(x.shape[0] * x.shape[1], x.shape[2], dtype=x.dtype, device=x.device)
        _launch(x, positions, inv_freq, h, out, scaling, layout, True)
        outs.append(out.reshape(x.shape))
    return tuple(outs)


def rope_cache_write(q, k, v, positions, heads, inv_freq, k_cache, v_cache, scaling=1.0, layout="half"):
    """RoPE on q (returned) and k, k and v written into their caches [B, Hk, T, D] at ``positions`` (slots
    outside the cache are skipped); the caches are updated in place."""
    hq, hk = heads
    out = torch.empty(q.shape[0] * q.shape[1], q.shape[2], dtype=q.dtype, device=q.device)
    _launch(q, positions, inv_freq, hq, out, scaling, layout, True)
    _launch(k, positions, inv_freq, hk, None, scaling, layout, True, cache=k_cache)
    _launch(v, positions, inv_freq, hk, None, scaling, layout, False, cache=v_cache)
    return out.reshape(q.shape)


def kv_cache_write(cache, values, positions):
    """The ``kv_cache_write`` op, in place: values [B, S, Hk*D] into cache [B, Hk, T, D] at positions."""
    dummy = torch.empty(1, device=cache.device, dtype=torch.float32)
    _launch(values, positions, dummy, cache.shape[1], None, 1.0, "half", False, cache=cache)
    return cache
