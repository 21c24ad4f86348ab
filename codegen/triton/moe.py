"""MoE dispatch kernels: the router with its top-k, the grouped GEMM over expert-sorted rows, the combine.

- ``moe_route``: one program per token computes the router logits (W_r · x, f32 accumulation, rounded to the
  model's dtype unless the family routes in f32), then softmax + top-k, top-k + the softmax of those k
  (``topk_softmax``), or sigmoid scores chosen by score + bias within the ``topk_group`` best of ``n_group`` groups
  (group score: the sum of its top two); the chosen weights are renormalised and scaled. Top-k is k rounds of
  max-and-mask over the experts held in registers.
- ``moe_sort``: a one-program counting sort (decode: one launch), or torch's sort on the device for prefill's
  many rows; no host synchronisation either way. It also gives each pair's row (the inverse), for the combine.
- ``grouped_gemm``: rows are sorted by expert; each expert's segment is cut into BLOCK_M row blocks, and the grid
  holds an upper bound of blocks (cdiv(R, BLOCK_M) + E) so it does not depend on the routing (CUDA graphs): a
  program finds its expert from the block counts it derives from the offsets and exits past the last block. An
  expert without tokens has no blocks, so its weights are never read — a decode step reads only the selected
  experts. With ``gather`` the rows are the tokens' rows (order // top_k); ``act`` computes act(gate)·up from both
  halves of the expert's weight; ``scale`` multiplies each row by its routing weight. Rounding as in transformers.
- ``moe_combine``: each token sums its top_k rows in expert order (f32 accumulation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton import interpreted, sm_count, tile_for_sms
from lowerlm.codegen.triton.gemv import ACTS, _act
from lowerlm.codegen.triton.rms_norm import rms_scale, row_inv_rms
from lowerlm.codegen.triton.splits import counters, last_to_finish
from lowerlm.ir.abi import SILU


@triton.jit
def route_kernel(
    x_ptr, nw_ptr, xn_ptr, w_ptr, bias_ptr, ids_ptr, wt_ptr, part_ptr, count_ptr,  # pointers
    H, E, SPLITS, CHUNK, scaling, eps, renorm_eps,  # sizes: hidden, experts, programs per token, dims per program
    K: tl.constexpr, SIGMOID: tl.constexpr, TOPK_SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr, ROUND_LOGITS: tl.constexpr,
    WEIGHTS_F32: tl.constexpr, NORM: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    t = tl.program_id(0)
    split = tl.program_id(1)
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    inv = 1.0
    if NORM:  # the layer's RMSNorm first: the row's statistics over all of H
        inv = row_inv_rms(x_ptr + t * H, H, eps, BLOCK_H)
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for h0 in range(split * CHUNK, tl.minimum(split * CHUNK + CHUNK, H), BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hmask = h < H
        xr = tl.load(x_ptr + t * H + h, mask=hmask, other=0.0)
        xv = xr.to(tl.float32)
        if NORM:  # this program's slice of the normalised row, stored for the experts' GEMM
            xn = rms_scale(xr, inv, tl.load(nw_ptr + h, mask=hmask, other=0.0))
            tl.store(xn_ptr + t * H + h, xn, mask=hmask)
            xv = xn.to(tl.float32)
        wv = tl.load(w_ptr + e[:, None] * H + h[None, :], mask=emask[:, None] & hmask[None, :], other=0.0)
        acc += tl.sum(wv.to(tl.float32) * xv[None, :], 1)
    last = split == 0
    if SPLITS > 1:  # the router's rows split over H: the token's last program sums the parts in order and stores
        tl.store(part_ptr + (t * SPLITS + split) * BLOCK_E + e, acc)
        last = last_to_finish(count_ptr + t, SPLITS)
        offs_s = tl.arange(0, BLOCK_S)
        parts = tl.load(part_ptr + (t * SPLITS + offs_s)[:, None] * BLOCK_E + e[None, :],
                        mask=(offs_s < SPLITS)[:, None], other=0.0, cache_modifier=".cg")
        acc = tl.sum(parts, axis=0)  # only the last program's sum is complete; only it stores
    if ROUND_LOGITS:  # F.linear in the model's dtype rounds the logits
        acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    neg = float("-inf")
    if SIGMOID:
        scores = tl.sigmoid(acc)
        choice = scores
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + e, mask=emask, other=0.0).to(tl.float32)
        choice = tl.where(emask, choice, neg)
        if N_GROUP > 1:
            size = E // N_GROUP
            gid = e // size
            allowed = e < 0
            gscore = tl.zeros([BLOCK_E], dtype=tl.float32) + neg  # group g's score at index g
            for g in tl.static_range(N_GROUP):
                vals = tl.where(gid == g, choice, neg)
                m1 = tl.max(vals, 0)
                i1 = tl.min(tl.where(vals == m1, e, BLOCK_E), 0)
                m2 = tl.max(tl.where(e == i1, neg, vals), 0)
                gscore = tl.where(e == g, m1 + m2, gscore)
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.max(gscore, 0)
                gi = tl.min(tl.where(gscore == best, e, BLOCK_E), 0)
                allowed = allowed | (gid == gi)
                gscore = tl.where(e == gi, neg, gscore)
            choice = tl.where(allowed & emask, choice, neg)
    elif TOPK_SOFTMAX:  # chosen by logit; the softmax over the k chosen follows
        scores = tl.where(emask, acc, neg)
        choice = scores
    else:
        logits = tl.where(emask, acc, neg)
        p = tl.exp(logits - tl.max(logits, 0))
        scores = p / tl.sum(p, 0)
        choice = tl.where(emask, scores, neg)
    kv = tl.arange(0, BLOCK_K)
    picked_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    picked_i = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(choice, 0)
        i = tl.min(tl.where(choice == best, e, BLOCK_E), 0)
        w_i = tl.sum(tl.where(e == i, scores, 0.0), 0)  # the unbiased score
        picked_w = tl.where(kv == j, w_i, picked_w)
        picked_i = tl.where(kv == j, i, picked_i)
        choice = tl.where(e == i, neg, choice)
    if TOPK_SOFTMAX:
        top = tl.where(kv < K, picked_w, neg)
        p = tl.exp(top - tl.max(top, 0))
        picked_w = p / tl.sum(p, 0)
    if RENORM:
        total = tl.sum(tl.where(kv < K, picked_w, 0.0), 0)
        if SIGMOID:
            total = total + renorm_eps
        picked_w = picked_w / total
    picked_w = picked_w * scaling
    kmask = (kv < K) & ((kv * 0 + last.to(tl.int32)) > 0)  # per lane: the interpreter takes no scalar & vector
    tl.store(ids_ptr + t * K + kv, picked_i, mask=kmask)
    if WEIGHTS_F32:
        tl.store(wt_ptr + t * K + kv, picked_w, mask=kmask)
    else:
        tl.store(wt_ptr + t * K + kv, picked_w.to(wt_ptr.dtype.element_ty), mask=kmask)


def moe_route(x, router, bias, router_kind, top_k, n_group, topk_group, renormalize, scaling, router_f32,
              weights_f32, renorm_eps=1e-20, norm=None):
    """The ``moe_route`` op: ids i32[..., k] and weights [..., k] (f32, or the model's dtype). With ``norm`` =
    (weight, eps), ``x`` is the RMSNorm's input and the launch also computes the norm, routing its result and
    returning it first: (normed x, ids, weights)."""
    lead, h = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, h).contiguous()
    e = router.shape[0]
    tokens = x2.shape[0]
    xn = torch.empty_like(x2) if norm is not None else None
    if norm is not None and (norm[0].shape != (h,) or norm[0].dtype != x.dtype):
        raise ValueError(f"rms_norm weight {tuple(norm[0].shape)} {norm[0].dtype} does not fit input "
                         f"{tuple(x.shape)} {x.dtype}")
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=x.device)
    weights = torch.empty(tokens, top_k, dtype=torch.float32 if weights_f32 else x.dtype, device=x.device)
    if tokens:
        block_e, block_h = triton.next_power_of_2(e), min(128, triton.next_power_of_2(h))
        # decode: a token's router rows are read by several programs (one would stream them alone)
        splits = 1 if interpreted(x.device) else \
            max(1, min(triton.cdiv(h, block_h), triton.cdiv(2 * sm_count(x.device), tokens), 32))
        split = splits > 1  # prefill's many tokens take one program each: no scratch, no counters
        part = torch.empty(tokens * splits * block_e if split else 1, dtype=torch.float32, device=x.device)
        count = counters(tokens, x.device) if split else ids
        route_kernel[(tokens, splits)](
            x2, norm[0] if norm is not None else x2, xn if norm is not None else x2, router.contiguous(),
            bias if bias is not None else router, ids, weights, part, count,
            h, e, splits, block_h * triton.cdiv(triton.cdiv(h, block_h), splits),
            float(scaling), float(norm[1]) if norm is not None else 0.0, float(renorm_eps),
            K=top_k, SIGMOID=router_kind == "sigmoid", TOPK_SOFTMAX=router_kind == "topk_softmax",
            HAS_BIAS=bias is not None, N_GROUP=n_group,
            TOPK_GROUP=topk_group, RENORM=renormalize, ROUND_LOGITS=not router_f32 and x.dtype != torch.float32,
            WEIGHTS_F32=weights_f32, NORM=norm is not None, BLOCK_E=block_e, BLOCK_H=block_h,
            BLOCK_K=triton.next_power_of_2(top_k), BLOCK_S=triton.next_power_of_2(splits))
    routed = ids.reshape(*lead, top_k), weights.reshape(*lead, top_k)
    return routed if norm is None else (xn.reshape(x.shape), *routed)


SORT_KERNEL_MAX_ROWS = 1024  # one program sorts this many (token, expert) pairs fast; prefill uses torch's sort


@triton.jit
def sort_kernel(
    ids_ptr, order_ptr, inverse_ptr, offsets_ptr,  # pointers
    R, E,  # sizes: (token, expert) pairs, experts
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program, a counting sort: per-expert counts give the segment starts (offsets), then each pair's row is
    its expert's start plus the pairs of that expert before it (stable)."""
    ev = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        e = tl.load(ids_ptr + offs_r, mask=offs_r < R, other=-1)
        counts += tl.sum((e[:, None] == ev[None, :]).to(tl.int32), axis=0)
    base = tl.cumsum(counts, axis=0) - counts  # each expert's first row
    tl.store(offsets_ptr + ev, base, mask=ev < E)
    tl.store(offsets_ptr + E, tl.sum(counts, axis=0))
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        e = tl.load(ids_ptr + offs_r, mask=mask_r, other=-1)
        onehot = (e[:, None] == ev[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot  # pairs of the same expert earlier in this block
        row = tl.sum(onehot * (base[None, :] + before), axis=1)
        tl.store(order_ptr + row, offs_r, mask=mask_r)
        tl.store(inverse_ptr + offs_r, row, mask=mask_r)
        base += tl.sum(onehot, axis=0)


def moe_sort(ids, experts: int):
    """order (pair indices sorted by expert, stable), offsets [E+1] and inverse (each pair's row), without
    leaving the device: one launch up to SORT_KERNEL_MAX_ROWS pairs (decode), torch's sort past it (prefill)."""
    flat = ids.reshape(-1)
    rows = flat.numel()
    dev = ids.device
    if rows <= SORT_KERNEL_MAX_ROWS:
        order = torch.empty(rows, dtype=torch.int32, device=dev)
        inverse = torch.empty(rows, dtype=torch.int32, device=dev)
        offsets = torch.empty(experts + 1, dtype=torch.int32, device=dev)
        block_e = triton.next_power_of_2(experts)
        sort_kernel[(1,)](flat.to(torch.int32).contiguous(), order, inverse, offsets, rows, experts,
                          BLOCK_R=max(16, min(64, 4096 // block_e)), BLOCK_E=block_e)
        return order, offsets, inverse
    flat = flat.long()
    index = torch.arange(rows, device=dev)
    order = torch.argsort(flat * rows + index)  # distinct keys: the sort is stable
    counts = (flat[:, None] == torch.arange(experts, device=dev)[None, :]).sum(0)
    offsets = torch.zeros(experts + 1, dtype=torch.int32, device=dev)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return order.to(torch.int32), offsets, _inverse(order)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """Each pair's row: the permutation ``order`` inverted, on the device."""
    inverse = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
    inverse[order.long()] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
    return inverse


@triton.jit
def grouped_gemm_kernel(
    x_ptr, w_ptr, order_ptr, offsets_ptr, scale_ptr, bias_ptr, out_ptr,  # pointers
    N, K, E, gather, stride_we,  # N: output columns (per half with ACT)
    limit, alpha, up_shift,  # the gated unit (ir/compute.py's glu): clamps at limit (CLAMP), SiLU's alpha, up + shift
    GATHER: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr, ALPHA: tl.constexpr, SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ev = tl.arange(0, BLOCK_E)
    seg_starts = tl.load(offsets_ptr + ev, mask=ev < E, other=0)
    seg_ends = tl.load(offsets_ptr + ev + 1, mask=ev < E, other=0)
    blocks = (seg_ends - seg_starts + BLOCK_M - 1) // BLOCK_M  # row blocks of each expert
    cum = tl.cumsum(blocks, axis=0)  # blocks of experts 0..e
    if pid_m < tl.sum(blocks, axis=0):
        e = tl.sum((cum <= pid_m).to(tl.int32), 0)
        first = tl.sum(tl.where(ev == e, cum - blocks, 0), axis=0)  # this expert's first block
        seg_start = tl.load(offsets_ptr + e)
        seg_end = tl.load(offsets_ptr + e + 1)
        rows = seg_start + (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < seg_end
        if GATHER:
            src = tl.load(order_ptr + rows, mask=rmask, other=0) // gather
        else:
            src = rows
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        w_e = w_ptr + e.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            a = tl.load(x_ptr + src[:, None].to(tl.int64) * K + k[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            b = tl.load(w_e + n[None, :] * K + k[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
            if ACT != 0:
                b_up = tl.load(w_e + (n + N)[None, :] * K + k[:, None], mask=nmask[None, :] & kmask[:, None],
                               other=0.0)
                if UPCAST:
                    b_up = b_up.to(tl.float32)
                acc_up += tl.dot(a, b_up, input_precision=PRECISION)
        dtype = out_ptr.dtype.element_ty
        y = acc.to(dtype).to(tl.float32)  # the projection's result in the model's dtype
        if HAS_BIAS:  # expert e's bias row [N] (both halves with ACT: gate at n, up at n + N), added rounded
            b_e = bias_ptr + e.to(tl.int64) * (2 * N if ACT != 0 else N)
            b_gate = tl.load(b_e + n, mask=nmask, other=0.0).to(tl.float32)
            y = (y + b_gate[None, :]).to(dtype).to(tl.float32)
            if ACT != 0:
                b_up = tl.load(b_e + N + n, mask=nmask, other=0.0).to(tl.float32)
                acc_up = acc_up.to(dtype).to(tl.float32) + b_up[None, :]
        if ACT != 0:
            up = acc_up.to(dtype).to(tl.float32)
            if CLAMP != 0:  # 1: gate clamped before the act, 2: the act's result after it; up both ways
                up = tl.minimum(tl.maximum(up, -limit), limit)
            if CLAMP == 1:
                y = tl.minimum(y, limit)
            if ALPHA:  # gpt-oss's GLU: gate * sigmoid(alpha * gate), each step rounded as transformers does
                g = (y * tl.sigmoid((y * alpha).to(dtype).to(tl.float32)).to(dtype).to(tl.float32))
            else:
                g = _act(y, ACT)
            g = g.to(dtype).to(tl.float32)
            if CLAMP == 2:
                g = tl.minimum(g, limit)
            if SHIFT:
                up = (up + up_shift).to(dtype).to(tl.float32)
            y = (g * up).to(dtype).to(tl.float32)
        if HAS_SCALE:
            pair = tl.load(order_ptr + rows, mask=rmask, other=0)
            s = tl.load(scale_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
            y = y * s[:, None]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * N + n[None, :], y.to(dtype),
                 mask=rmask[:, None] & nmask[None, :])


def gemm_blocks(rows: int, n: int, k: int, e: int, device) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, row blocks launched) of the grouped GEMM over ``rows`` expert-sorted rows. At
    most min(e, rows) experts hold rows, each adding at most one partial block, so cdiv(rows, BLOCK_M) +
    min(e, rows) blocks cover any routing (a decode step of 8 pairs over 128 experts launches 9 row blocks, not
    129). On a GPU BLOCK_M follows the mean rows per expert (16 for decode, up to 64 for prefill), BLOCK_N is cut
    towards two programs per SM over the experts that can hold rows, and BLOCK_K keeps W's tile near 16 KB."""
    if interpreted(device):
        block_m = 16
        block_n, block_k = (min(64, max(16, triton.next_power_of_2(d))) for d in (n, k))
    else:
        block_m = min(64, max(16, triton.next_power_of_2(rows // e)))
        busy = min(e, rows)
        block_n = tile_for_sms(busy * n, device, 16)
        block_k = min(max(16, triton.next_power_of_2(k)), max(64, 8192 // block_n))
    return block_m, block_n, block_k, triton.cdiv(rows, block_m) + min(e, rows)


def grouped_gemm(x, w, order, offsets, scale, bias, gather: int, act: str, limit: float = 0.0, clamp: str = "gate",
                 alpha: float = 1.0, up_shift: float = 0.0):
    """The ``grouped_gemm`` op: rows [R, N] (N halved with an act; its gated unit as ir/compute.py's glu)."""
    e, n_w, k = w.shape
    n = n_w // 2 if act != "none" else n_w
    rows = order.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block_m, block_n, block_k, blocks = gemm_blocks(rows, n, k, e, x.device)
    grid = (blocks, triton.cdiv(n, block_n))
    on_cpu = interpreted(x.device)
    grouped_gemm_kernel[grid](
        x2, w.contiguous(), order.contiguous(), offsets.contiguous(),
        scale.reshape(-1).contiguous() if scale is not None else x2, bias.contiguous() if bias is not None else x2,
        out,
        n, k, e, max(gather, 1), n_w * k, float(limit), float(alpha), float(up_shift),
        GATHER=gather > 0, ACT=ACTS[act], CLAMP=(0 if not limit else 1 if clamp == "gate" else 2),
        ALPHA=act == SILU and alpha != 1.0, SHIFT=up_shift != 0.0, HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 or on_cpu else None, UPCAST=on_cpu,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=triton.next_power_of_2(e))
    return out


@triton.jit
def combine_kernel(
    y_ptr, inverse_ptr, out_ptr,  # pointers
    H,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.load(inverse_ptr + t * K + offs_k, mask=offs_k < K, other=2 ** 30)  # this token's rows
    rank = tl.sum((rows[None, :] < rows[:, None]).to(tl.int32), axis=1)  # each row's place in row order
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(K):  # rows in ascending order: experts in order, as the reference sums
        p = tl.sum(tl.where(rank == j, rows, 0), axis=0).to(tl.int64)
        acc += tl.load(y_ptr + p * H + h, mask=hmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + h, acc.to(out_ptr.dtype.element_ty), mask=hmask)


def moe_combine(y, order, like, top_k: int, inverse=None):
    """The ``moe_combine`` op: each token's top_k rows summed (in expert order), shaped like ``like``;
    ``inverse`` (each pair's row, from ``moe_sort``) saves recomputing it from ``order``."""
    rows, h = y.shape
    tokens = rows // top_k
    out = torch.empty(tokens, h, dtype=y.dtype, device=y.device)
    if tokens:
        if inverse is None:
            inverse = _inverse(order)
        block_h = min(1024, triton.next_power_of_2(h))
        combine_kernel[(tokens, triton.cdiv(h, block_h))](y.contiguous(), inverse.contiguous(), out, h, K=top_k,
                                                          BLOCK_K=triton.next_power_of_2(top_k), BLOCK_H=block_h)
    return out.reshape(like.shape)
