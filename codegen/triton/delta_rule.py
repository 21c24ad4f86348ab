"""Linear attention (Kimi Delta Attention, gated DeltaNet): the short causal convolution and the gated delta rule,
with their cached (recurrent-state) forms. ir/compute.py's ``short_conv`` / ``delta_rule`` rows define them.

Short convolution: programs (sequence, block of tokens, block of channels); each output is
``act(bias + sum_j w[c, j] * ext[s + j])`` over ext = [state; x], accumulated in f32 and rounded to x's dtype
once (silu on the rounded value, as the reference). The cached form also writes the new state (the W-1 inputs
of ext ending before the row's first padding token) from the token block 0 program, which is the only one that
reads the old state (BLOCK_S >= W-1), after a barrier: the state is updated in place.

Delta rule, two paths, the same math (f32 throughout, q and k L2-normalised per head when asked, q times scale,
gates per key channel (KDA) or per head (gated DeltaNet), padding tokens at or past ``seq_lens`` with gate 0 and
beta 0):

- recurrent (decode, any S): programs (sequence · head, block of V); the state tile [K, BV] lives in registers
  over the tokens: S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = S^T q. Reads the state once, writes it
  once (in place).
- chunked (prefill), two kernels following ``delta_rule_chunked``: a prep kernel, programs (sequence · head,
  chunk of BT tokens), all chunks in parallel: cumulative gates G within the chunk, A[i, j] = -beta_i
  sum_c k_i k_j exp(G_i - G_j) (j < i) and the causal scores att[i, j] = sum_c q_i k_j exp(G_i - G_j) (j <= i)
  over slices of K (per-channel gates: an exact [BT, BT, slice] product, so only differences of cumulative gates
  are exponentiated; per-head gates: dot products times exp(G_i - G_j)), T = (I - A)^-1 by forward substitution
  in registers, then u = T (beta v), w = T (beta k exp(G)), q exp(G), k exp(G_last - G), exp(G_last) into f32
  scratch. Then a state kernel, programs (sequence · head, block of V), walks the chunks in order with the state
  tile in registers: v' = u - w S; o = (q exp(G)) S + att v'; S <- exp(G_last) S + (k exp(G_last - G))^T v'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowerlm.codegen.triton import interpreted


# ---- short convolution ------------------------------------------------------------------------------------------
@triton.jit
def short_conv_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, pos_ptr, lens_ptr, y_ptr,  # pointers
    S, C, W,  # sizes: tokens, channels, kernel width
    stride_xb, stride_xs, stride_yb, stride_ys, stride_sb, stride_ss, stride_pb,  # strides
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr, UPDATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    b = tl.program_id(0)
    sblk = tl.program_id(1)
    offs_s = sblk * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask_s = offs_s < S
    dt = x_ptr.dtype.element_ty
    x_base = x_ptr + b * stride_xb
    s_base = state_ptr + b * stride_sb
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for j in range(W):
        e = offs_s + j  # index into ext = [state; x]
        xi = e - (W - 1)
        xv = tl.load(x_base + xi[:, None] * stride_xs + offs_c[None, :],
                     mask=(mask_s & (xi >= 0))[:, None] & mask_c[None, :], other=0.0)
        if HAS_STATE:  # the state enters in x's dtype, as the reference concatenates it
            in_state = e < W - 1
            sv = tl.load(s_base + e[:, None] * stride_ss + offs_c[None, :],
                         mask=(mask_s & in_state)[:, None] & mask_c[None, :], other=0.0).to(dt)
            xv = tl.where(in_state[:, None], sv, xv)
        wj = tl.load(w_ptr + offs_c * W + j, mask=mask_c, other=0.0).to(dt).to(tl.float32)
        acc += xv.to(tl.float32) * wj[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(dt).to(tl.float32)[None, :]
    if SILU:
        acc = acc.to(dt).to(tl.float32)
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * stride_yb + offs_s[:, None] * stride_ys + offs_c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_s[:, None] & mask_c[None, :])
    if UPDATE:
        if sblk == 0:  # the only program that read the state (BLOCK_S >= W-1): the new state, in place
            n = tl.load(lens_ptr + b).to(tl.int64) - tl.load(pos_ptr + b * stride_pb).to(tl.int64)
            n = tl.minimum(tl.maximum(n, 0), S)
            offs_w = tl.arange(0, BLOCK_W)
            mask_w = offs_w < W - 1
            e = n + offs_w
            xi = e - (W - 1)
            in_state = e < W - 1
            sv = tl.load(s_base + e[:, None] * stride_ss + offs_c[None, :],
                         mask=(mask_w & in_state)[:, None] & mask_c[None, :], other=0.0).to(dt)
            xv = tl.load(x_base + xi[:, None] * stride_xs + offs_c[None, :],
                         mask=(mask_w & (xi >= 0))[:, None] & mask_c[None, :], other=0.0)
            new = tl.where(in_state[:, None], sv, xv)
            tl.debug_barrier()  # every thread's reads of the old state before any write
            tl.store(s_base + offs_w[:, None] * stride_ss + offs_c[None, :], new.to(state_ptr.dtype.element_ty),
                     mask=mask_w[:, None] & mask_c[None, :])


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _conv(x, weight, bias, state, positions, seq_lens, act):
    b, s, c = x.shape
    w = weight.shape[1]
    x = _unit_last(x)
    weight = weight.contiguous()
    y = torch.empty(b, s, c, dtype=x.dtype, device=x.device)
    on_cpu = interpreted(x.device)
    block_s = max(triton.next_power_of_2(max(w - 1, 1)), min(16 if on_cpu else 32, triton.next_power_of_2(s)))
    block_c = min(64 if on_cpu else 128, triton.next_power_of_2(c))
    has_state = state is not None
    if has_state:
        assert state.stride(-1) == 1, "the short-conv state needs a contiguous channel dimension"
        pos = positions.reshape(b, -1)
    st, pos, lens = (state, pos, seq_lens) if has_state else (x, x, x)  # stand-ins, never read without a state
    short_conv_kernel[(b, triton.cdiv(s, block_s), triton.cdiv(c, block_c))](
        x, weight, bias if bias is not None else weight, st, pos, lens, y,
        s, c, w,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), st.stride(0) if has_state else 0,
        st.stride(1) if has_state else 0, pos.stride(0) if has_state else 0,
        HAS_BIAS=bias is not None, HAS_STATE=has_state, SILU=act == "silu", UPDATE=has_state and w > 1,
        BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_W=triton.next_power_of_2(max(w - 1, 1)))
    return y


def short_conv(x, weight, bias=None, act: str = "none"):
    """The ``short_conv`` op: x [B, S, C], weight [C, W], bias [C] or None -> [B, S, C] in x's dtype."""
    return _conv(x, weight, bias, None, None, None, act)


def cached_short_conv(x, weight, bias, state, positions, seq_lens, act: str = "none"):
    """The ``cached_short_conv`` op: continues from ``state`` [B, W-1, C] and writes the new state into it (in
    place; the caller passes a copy for functional state). Returns (y, state)."""
    return _conv(x, weight, bias, state, positions, seq_lens, act), state


# ---- delta rule: recurrent ---------------------------------------------------------------------------------------
@triton.jit
def delta_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, pos_ptr, lens_ptr, o_ptr,  # pointers
    S, H, K, V,  # sizes: tokens, heads, key and value head dims
    stride_qb, stride_qs, stride_kb, stride_ks, stride_vb, stride_vs, stride_gb, stride_gs, stride_bb, stride_bs,
    stride_ob, stride_os, stride_sb, stride_sh, stride_sk, stride_pb, stride_ps,  # strides
    scale, eps,
    L2NORM: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_STATE: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < K
    mask_v = offs_v < V
    st_ptrs = state_ptr + b * stride_sb + h * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :]
    mask_st = mask_k[:, None] & mask_v[None, :]
    if HAS_STATE:
        st = tl.load(st_ptrs, mask=mask_st, other=0.0).to(tl.float32)
    else:
        st = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    n_valid = 0
    if MASKED:
        n_valid = tl.load(lens_ptr + b).to(tl.int64)
    for t in range(S):
        q = tl.load(q_ptr + b * stride_qb + t * stride_qs + h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + b * stride_kb + t * stride_ks + h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + b * stride_vb + t * stride_vs + h * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + b * stride_bb + t * stride_bs + h).to(tl.float32)
        if PER_CHANNEL:
            g = tl.load(g_ptr + b * stride_gb + t * stride_gs + h * K + offs_k, mask=mask_k, other=0.0)
        else:
            g = tl.load(g_ptr + b * stride_gb + t * stride_gs + h)
        g = g.to(tl.float32)
        if L2NORM:
            q = q / tl.sqrt(tl.sum(q * q, axis=0) + eps)
            k = k / tl.sqrt(tl.sum(k * k, axis=0) + eps)
        q = q * scale
        if MASKED:  # right padding leaves the state as it is
            live = tl.load(pos_ptr + b * stride_pb + t * stride_ps).to(tl.int64) < n_valid
            g = tl.where(live, g, 0.0)
            beta = tl.where(live, beta, 0.0)
        if PER_CHANNEL:
            st = st * tl.exp(g)[:, None]
        else:
            st = st * tl.exp(g)
        kv = tl.sum(st * k[:, None], axis=0)
        delta = (v - kv) * beta
        st = st + k[:, None] * delta[None, :]
        o = tl.sum(st * q[:, None], axis=0)
        tl.store(o_ptr + b * stride_ob + t * stride_os + h * V + offs_v, o.to(o_ptr.dtype.element_ty), mask=mask_v)
    if HAS_STATE:
        tl.store(st_ptrs, st.to(state_ptr.dtype.element_ty), mask=mask_st)


# ---- delta rule: chunked -----------------------------------------------------------------------------------------
@triton.jit
def delta_chunk_prep_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, pos_ptr, lens_ptr,  # inputs
    att_ptr, u_ptr, w_ptr, qg_ptr, kd_ptr, decay_ptr,  # f32 scratch, per (sequence · head, chunk)
    S, H, K, V, NC,  # sizes: tokens, heads, key and value head dims, chunks
    stride_qb, stride_qs, stride_kb, stride_ks, stride_vb, stride_vs, stride_gb, stride_gs, stride_bb, stride_bs,
    stride_pb, stride_ps,  # strides
    scale, eps,
    L2NORM: tl.constexpr, PER_CHANNEL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
    BT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, KS: tl.constexpr, KD: tl.constexpr,
    SUBST_DOT: tl.constexpr,
):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BT)
    offs_t = c * BT + rows
    in_seq = offs_t < S
    live = in_seq
    if MASKED:  # tokens at or past seq_lens: gate 0, beta 0
        n_valid = tl.load(lens_ptr + b).to(tl.int64)
        tpos = tl.load(pos_ptr + b * stride_pb + offs_t * stride_ps, mask=in_seq, other=0).to(tl.int64)
        live = live & (tpos < n_valid)
    beta = tl.load(beta_ptr + b * stride_bb + offs_t * stride_bs + h, mask=live, other=0.0).to(tl.float32)
    q_rows = q_ptr + b * stride_qb + offs_t[:, None] * stride_qs + h * K
    k_rows = k_ptr + b * stride_kb + offs_t[:, None] * stride_ks + h * K
    v_rows = v_ptr + b * stride_vb + offs_t[:, None] * stride_vs + h * V
    g_rows = g_ptr + b * stride_gb + offs_t[:, None] * stride_gs + h * K
    # per-token L2 norms of q and k over the whole head
    rq = tl.full([BT], 1.0, dtype=tl.float32)
    rk = tl.full([BT], 1.0, dtype=tl.float32)
    if L2NORM:
        sq = tl.zeros([BT], dtype=tl.float32)
        sk = tl.zeros([BT], dtype=tl.float32)
        for k0 in range(0, BLOCK_K, KD):
            offs = k0 + tl.arange(0, KD)
            m = in_seq[:, None] & (offs < K)[None, :]
            qs = tl.load(q_rows + offs[None, :], mask=m, other=0.0).to(tl.float32)
            ks = tl.load(k_rows + offs[None, :], mask=m, other=0.0).to(tl.float32)
            sq += tl.sum(qs * qs, axis=1)
            sk += tl.sum(ks * ks, axis=1)
        rq = 1.0 / tl.sqrt(sq + eps)
        rk = 1.0 / tl.sqrt(sk + eps)
    strict = rows[:, None] > rows[None, :]
    incl = rows[:, None] >= rows[None, :]
    last_row = rows[:, None] == BT - 1
    if PER_CHANNEL:
        kk = tl.zeros([BT, BT], dtype=tl.float32)
        att = tl.zeros([BT, BT], dtype=tl.float32)
        for k0 in range(0, BLOCK_K, KS):
            offs = k0 + tl.arange(0, KS)
            m = in_seq[:, None] & (offs < K)[None, :]
            qs = tl.load(q_rows + offs[None, :], mask=m, other=0.0).to(tl.float32) * rq[:, None] * scale
            ks = tl.load(k_rows + offs[None, :], mask=m, other=0.0).to(tl.float32) * rk[:, None]
            gs = tl.load(g_rows + offs[None, :], mask=live[:, None] & (offs < K)[None, :], other=0.0).to(tl.float32)
            gc = tl.cumsum(gs, axis=0)
            diff = gc[:, None, :] - gc[None, :, :]  # [i, j, channel]: G_i - G_j
            e = tl.exp(tl.where(incl[:, :, None], diff, float("-inf")))
            kk += tl.sum(ks[:, None, :] * ks[None, :, :] * e, axis=2)
            att += tl.sum(qs[:, None, :] * ks[None, :, :] * e, axis=2)
        a = tl.where(strict, -beta[:, None] * kk, 0.0)
    else:
        gh = tl.load(g_ptr + b * stride_gb + offs_t * stride_gs + h, mask=live, other=0.0).to(tl.float32)
        gch = tl.cumsum(gh, axis=0)
        e = tl.exp(tl.where(incl, gch[:, None] - gch[None, :], float("-inf")))
        kk = tl.zeros([BT, BT], dtype=tl.float32)
        att = tl.zeros([BT, BT], dtype=tl.float32)
        for k0 in range(0, BLOCK_K, KD):
            offs = k0 + tl.arange(0, KD)
            m = in_seq[:, None] & (offs < K)[None, :]
            qs = tl.load(q_rows + offs[None, :], mask=m, other=0.0).to(tl.float32) * rq[:, None] * scale
            ks = tl.load(k_rows + offs[None, :], mask=m, other=0.0).to(tl.float32) * rk[:, None]
            kk += tl.dot(ks, tl.trans(ks), input_precision=PRECISION)
            att += tl.dot(qs, tl.trans(ks), input_precision=PRECISION)
        att = att * e
        a = tl.where(strict, -beta[:, None] * kk * e, 0.0)
        last_h = tl.sum(tl.where(rows == BT - 1, gch, 0.0), axis=0)
    # forward substitution: row i of (I - A)^-1 - I from the rows above it
    for i in range(1, BT):
        sel = rows[:, None] == i
        if SUBST_DOT:  # the interpreter: two matrix products (numpy) instead of two reductions (slow there)
            pick = tl.where((rows[None, :] == i) & (rows[:, None] >= 0), 1.0, 0.0)  # every row selects row i
            row = tl.dot(pick, a, input_precision=PRECISION)
            row = row + tl.dot(row, a, input_precision=PRECISION)
            a = tl.where(sel, row, a)
        else:
            row = tl.sum(tl.where(sel, a, 0.0), axis=0)
            row = row + tl.sum(row[:, None] * a, axis=0)
            a = tl.where(sel, row[None, :], a)
    t_mat = a + tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    chunk = (bh * NC + c).to(tl.int64)  # scratch offsets can pass 2^31 for long prompts
    tl.store(att_ptr + chunk * BT * BT + rows[:, None] * BT + rows[None, :], att)
    for v0 in range(0, BLOCK_V, KD):
        offs = v0 + tl.arange(0, KD)
        vs = tl.load(v_rows + offs[None, :], mask=in_seq[:, None] & (offs < V)[None, :], other=0.0).to(tl.float32)
        u = tl.dot(t_mat, vs * beta[:, None], input_precision=PRECISION)
        tl.store(u_ptr + chunk * BT * BLOCK_V + rows[:, None] * BLOCK_V + offs[None, :], u)
    for k0 in range(0, BLOCK_K, KD):
        offs = k0 + tl.arange(0, KD)
        m = in_seq[:, None] & (offs < K)[None, :]
        qs = tl.load(q_rows + offs[None, :], mask=m, other=0.0).to(tl.float32) * rq[:, None] * scale
        ks = tl.load(k_rows + offs[None, :], mask=m, other=0.0).to(tl.float32) * rk[:, None]
        if PER_CHANNEL:
            gs = tl.load(g_rows + offs[None, :], mask=live[:, None] & (offs < K)[None, :], other=0.0).to(tl.float32)
            gc = tl.cumsum(gs, axis=0)
            last = tl.sum(tl.where(last_row, gc, 0.0), axis=0)  # [KD]: G at the chunk's end
        else:
            gc = tl.zeros([BT, KD], dtype=tl.float32) + gch[:, None]
            last = tl.zeros([KD], dtype=tl.float32) + last_h
        eg = tl.exp(gc)  # exp(G_i - G_-1): a difference too
        w = tl.dot(t_mat, ks * beta[:, None] * eg, input_precision=PRECISION)
        at = chunk * BT * BLOCK_K + rows[:, None] * BLOCK_K + offs[None, :]
        tl.store(w_ptr + at, w)
        tl.store(qg_ptr + at, qs * eg)
        tl.store(kd_ptr + at, ks * tl.exp(last[None, :] - gc))
        tl.store(decay_ptr + chunk * BLOCK_K + offs, tl.exp(last))


@triton.jit
def delta_chunk_state_kernel(
    att_ptr, u_ptr, w_ptr, qg_ptr, kd_ptr, decay_ptr, state_ptr, o_ptr,  # pointers
    S, H, K, V, NC,  # sizes
    stride_ob, stride_os, stride_sb, stride_sh, stride_sk,  # strides
    HAS_STATE: tl.constexpr, PRECISION: tl.constexpr,
    BT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BV: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BT)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    st_ptrs = state_ptr + b * stride_sb + h * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :]
    mask_st = mask_k[:, None] & mask_v[None, :]
    if HAS_STATE:
        st = tl.load(st_ptrs, mask=mask_st, other=0.0).to(tl.float32)
    else:
        st = tl.zeros([BLOCK_K, BV], dtype=tl.float32)
    o_base = o_ptr + b * stride_ob + h * V
    for c in range(NC):
        chunk = (bh * NC + c).to(tl.int64)
        kt = chunk * BT * BLOCK_K + rows[:, None] * BLOCK_K + offs_k[None, :]
        w = tl.load(w_ptr + kt)
        qg = tl.load(qg_ptr + kt)
        kd = tl.load(kd_ptr + kt)
        u = tl.load(u_ptr + chunk * BT * BLOCK_V + rows[:, None] * BLOCK_V + offs_v[None, :])
        att = tl.load(att_ptr + chunk * BT * BT + rows[:, None] * BT + rows[None, :])
        decay = tl.load(decay_ptr + chunk * BLOCK_K + offs_k)
        v_new = u - tl.dot(w, st, input_precision=PRECISION)
        o = tl.dot(qg, st, input_precision=PRECISION) + tl.dot(att, v_new, input_precision=PRECISION)
        offs_t = c * BT + rows
        tl.store(o_base + offs_t[:, None] * stride_os + offs_v[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=(offs_t < S)[:, None] & mask_v[None, :])
        st = st * decay[:, None] + tl.dot(tl.trans(kd), v_new, input_precision=PRECISION)
    if HAS_STATE:
        tl.store(st_ptrs, st.to(state_ptr.dtype.element_ty), mask=mask_st)


# ---- delta rule: launchers ---------------------------------------------------------------------------------------
def _delta(q, k, v, g, beta, state, positions, seq_lens, heads, scale, l2norm, eps, chunk, method):
    b, s, _ = q.shape
    h = heads
    dk, dv = k.shape[2] // h, v.shape[2] // h
    per_channel = g.shape[2] != h or dk == 1
    q, k, v, g, beta = (_unit_last(t) for t in (q, k, v, g, beta))
    out = torch.empty(b, s, h * dv, dtype=q.dtype, device=q.device)
    has_state = state is not None
    if has_state:
        assert state.stride(-1) == 1, "the delta-rule state needs a contiguous V dimension"
        pos = positions.reshape(b, -1)
        st, st_strides, pos_strides = state, state.stride()[:3], (pos.stride(0), pos.stride(1))
    else:
        st, st_strides, pos, seq_lens, pos_strides = out, (0, 0, 0), out, out, (0, 0)  # stand-ins, never read
    on_cpu = interpreted(q.device)
    block_k = max(16, triton.next_power_of_2(dk))
    block_v = max(16, triton.next_power_of_2(dv))
    in_strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
                  g.stride(1), beta.stride(0), beta.stride(1))
    if method == "recurrent" or (method == "auto" and s <= 1):
        bv = min(block_v, 64 if on_cpu else 32)
        delta_recurrent_kernel[(b * h, triton.cdiv(dv, bv))](
            q, k, v, g, beta, st, pos, seq_lens, out,
            s, h, dk, dv, *in_strides, out.stride(0), out.stride(1), *st_strides, *pos_strides,
            scale, eps, L2NORM=l2norm, PER_CHANNEL=per_channel, HAS_STATE=has_state, MASKED=has_state,
            BLOCK_K=block_k, BLOCK_V=bv)
        return out
    assert chunk >= 16 and chunk & (chunk - 1) == 0, "the chunk is a power of two, at least 16 (tl.dot)"
    nc = triton.cdiv(s, chunk)
    f32 = dict(dtype=torch.float32, device=q.device)
    att = torch.empty(b * h * nc * chunk * chunk, **f32)
    u = torch.empty(b * h * nc * chunk * block_v, **f32)
    w, qg, kd = (torch.empty(b * h * nc * chunk * block_k, **f32) for _ in range(3))
    decay = torch.empty(b * h * nc * block_k, **f32)
    kd_slice = min(block_k, block_v, 64)
    ks_slice = min(block_k, 16) if on_cpu else max(1, min(block_k, 8192 // (chunk * chunk)))
    warps = {} if on_cpu else {"num_warps": 8 if chunk >= 64 else 4}
    delta_chunk_prep_kernel[(b * h, nc)](
        q, k, v, g, beta, pos, seq_lens, att, u, w, qg, kd, decay,
        s, h, dk, dv, nc, *in_strides, *pos_strides, scale, eps,
        L2NORM=l2norm, PER_CHANNEL=per_channel, MASKED=has_state, PRECISION="ieee",
        BT=chunk, BLOCK_K=block_k, BLOCK_V=block_v, KS=ks_slice, KD=kd_slice, SUBST_DOT=on_cpu, **warps)
    if not has_state:
        st = torch.empty(1, **f32)  # never read or written
    bv = min(block_v, 64 if on_cpu else 32)
    delta_chunk_state_kernel[(b * h, triton.cdiv(dv, bv))](
        att, u, w, qg, kd, decay, st, out,
        s, h, dk, dv, nc, out.stride(0), out.stride(1), *st_strides,
        HAS_STATE=has_state, PRECISION="ieee", BT=chunk, BLOCK_K=block_k, BLOCK_V=block_v, BV=bv, **warps)
    return out


def delta_rule(q, k, v, g, beta, heads: int, scale: float, l2norm: bool = False, eps: float = 1e-6,
               chunk: int = 64, method: str = "auto"):
    """The ``delta_rule`` op from a zero state: q, k [B, S, H*K], v [B, S, H*V], g [B, S, H*K] or [B, S, H],
    beta [B, S, H] -> [B, S, H*V] in q's dtype. ``method``: "recurrent", "chunked" (chunks of ``chunk`` tokens,
    a power of two >= 16) or "auto" (recurrent for one token, else chunked)."""
    return _delta(q, k, v, g, beta, None, None, None, heads, scale, l2norm, eps, chunk, method)


def cached_delta_rule(q, k, v, g, beta, state, positions, seq_lens, heads: int, scale: float, l2norm: bool = False,
                      eps: float = 1e-6, chunk: int = 64, method: str = "auto"):
    """The ``cached_delta_rule`` op: continues from ``state`` [B, H, K, V] (f32) and writes the final state into it
    (in place; the caller passes a copy for functional state); tokens at or past ``seq_lens`` leave it unchanged.
    Returns (o, state)."""
    return _delta(q, k, v, g, beta, state, positions, seq_lens, heads, scale, l2norm, eps, chunk, method), state
