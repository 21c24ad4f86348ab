"""What every op computes, in plain torch: the reference implementations the op table's rows point to
(``OpDef.impl``). Canonicalization folds constants with the core ops' implementations, the reference backend runs
every op through them, and the other backends are tested against them, so they favour the obvious formulation over
speed.

Calling convention: ``impl(*inputs, **attrs)``, the inputs by slot (None for an absent optional one) and the
attributes with their defaults filled in and symbolic dimensions already evaluated; ops that write state also get
``inplace`` (update the given buffer instead of a copy). Multi-result ops return a tuple.

torch is imported when an implementation first runs, not when ``lowerlm.ir`` is imported (the CLI's quick commands
never load it).
"""

from __future__ import annotations

import importlib

from lowerlm.ir.abi import GELU, GELU_TANH, SILU


class _Lazy:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self._name, self._module = name, None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


torch = _Lazy("torch")
F = _Lazy("torch.nn.functional")


# ---- LLM ops ------------------------------------------------------------------------------------------------
def rms_norm(x, w, eps: float):
    # x: [..., H]; computed in f32 and cast back before the weight, as transformers' LlamaRMSNorm does
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def rope(q, k, positions, heads, inv_freq, scaling: float, layout: str):
    # q: [B, S, Hq*D], k: [B, S, Hk*D]; the first R = 2*len(inv_freq) dims of each head rotate
    from lowerlm.ir.rope import rope_cos_sin, rotate

    cos, sin = rope_cos_sin(positions, inv_freq, scaling, layout, q.dtype)
    rdim = cos.shape[-1]
    out = []
    for x, h in zip((q, k), heads):
        b, s, width = x.shape
        xh = x.reshape(b, s, h, width // h)
        rot, rest = xh[..., :rdim], xh[..., rdim:]
        rot = rot * cos + rotate(rot, layout) * sin
        out.append(torch.cat([rot, rest], -1).reshape(b, s, width))
    return tuple(out)


def _heads(x, h):
    # [B, S, H*D] -> [B, H, S, D]
    b, s, width = x.shape
    return x.reshape(b, s, h, width // h).transpose(1, 2)


def _attend(q, k, v, visible, scale: float, softcap: float = 0.0, sinks=None):
    # q: [B, Hq, S, D]; k, v: [B, Hk, L, D*]; visible: [B, S, L] bool -> [B, S, Hq*Dv]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # query head h reads kv head h // rep
    mask = visible[:, None, :, :]
    if not softcap and sinks is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:  # as transformers' eager attention computes it: scores in the model's dtype, the softmax in f32
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.float().masked_fill(~mask, float("-inf"))
        if sinks is not None:
            sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
            probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        else:
            probs = torch.softmax(scores, -1)
        out = torch.matmul(probs.to(v.dtype), v)
    out = torch.where(visible.any(-1)[:, None, :, None], out, torch.zeros((), dtype=out.dtype))
    b, h, s, dv = out.shape
    return out.transpose(1, 2).reshape(b, s, h * dv)


def _visible(q_pos, k_pos, k_valid, causal: bool, window: int):
    # q_pos: [B, S], k_pos: [B, L], k_valid: [B, L] -> [B, S, L]
    vis = k_valid[:, None, :].expand(-1, q_pos.shape[1], -1)
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    if causal:
        vis = vis & (diff >= 0)
    if window:
        vis = vis & (diff < window)
    return vis


def attention(q, k, v, positions, seq_lens, sinks, heads, scale, causal, window, softcap=0.0):
    hq, hk = heads
    s = q.shape[1]
    k_valid = torch.arange(s)[None, :] < seq_lens[:, None].long()
    vis = _visible(positions, positions, k_valid, causal, window)
    return _attend(_heads(q, hq), _heads(k, hk), _heads(v, hk), vis, scale, softcap, sinks)


def kv_cache_write(cache, values, positions, inplace: bool = False):
    # cache: [B, Hk, T, D]; values: [B, S, Hk*D]; slots with positions outside [0, T) are skipped. In place only
    # when the caller owns the buffer (the verifier's state linearity makes that sound).
    b, hk, t, d = cache.shape
    out = cache if inplace else cache.clone()
    valid = (positions >= 0) & (positions < t)
    bi, si = valid.nonzero(as_tuple=True)
    out[bi, :, positions[bi, si], :] = values.reshape(b, -1, hk, d)[bi, si].to(out.dtype)
    return out


def cached_attention(q, k_cache, v_cache, positions, seq_lens, sinks, scale, causal, window, softcap=0.0):
    b, hk, t, d = k_cache.shape
    # slots at or past the longest valid length are never visible: leave them out (exact, and T may be large)
    t = max(1, min(t, int(seq_lens.max()) if seq_lens.numel() else 1))
    k_cache, v_cache = k_cache[:, :, :t], v_cache[:, :, :t]
    slots = torch.arange(t)[None, :].expand(b, -1)
    vis = _visible(positions, slots, slots < seq_lens[:, None].long(), causal, window)
    return _attend(_heads(q, q.shape[2] // d), k_cache, v_cache, vis, scale, softcap, sinks)


# ---- multi-head latent attention -------------------------------------------------------------------------------
def mla_expand(c, k_pe, w, heads: int, nope: int):
    """Keys [B,S,H*(P+R)] and values [B,S,H*V] from the latent c [B,S,L], the shared rotary key k_pe [B,S,R] and
    kv_b's weight w [H*(P+V), L] (per head: P key rows, then V value rows), as transformers' ``expand_kv``."""
    b, s, _ = c.shape
    kv = F.linear(c, w.to(c.dtype)).view(b, s, heads, -1)
    k_nope, v = kv.split([nope, kv.shape[-1] - nope], -1)
    k = torch.cat([k_nope, k_pe[:, :, None, :].expand(b, s, heads, -1).to(c.dtype)], -1)
    return k.reshape(b, s, -1), v.reshape(b, s, -1)


def mla_attention(q, c, k_pe, w, positions, seq_lens, heads: int, nope: int, scale: float):
    k, v = mla_expand(c, k_pe, w, heads, nope)
    return attention(q, k, v, positions, seq_lens, None, (heads, heads), scale, True, 0)


def cached_mla_attention(q, c_cache, k_pe_cache, w, positions, seq_lens, heads: int, nope: int, scale: float):
    """Attention over the latent caches c [B,1,T,L] and k_pe [B,1,T,R]: the naive form (keys and values expanded
    from the cached latents) for several tokens, the absorbed form for one token per row (decode)."""
    if q.shape[1] == 1:
        return mla_absorbed(q, c_cache, k_pe_cache, w, positions, seq_lens, heads, nope, scale)
    k, v = mla_expand_cache(c_cache, k_pe_cache, w, seq_lens, heads, nope)
    return cached_attention(q, k, v, positions, seq_lens, None, scale, True, 0)


def mla_expand_cache(c_cache, k_pe_cache, w, seq_lens, heads: int, nope: int):
    """Keys [B,H,t,P+R] and values [B,H,t,V] expanded from the latent caches' first t = max(seq_lens) slots (the
    slots past every row are never visible; T may be large): the naive form's operands."""
    b, _, t, _ = c_cache.shape
    t = max(1, min(t, int(seq_lens.max()) if seq_lens.numel() else 1))
    k, v = mla_expand(c_cache[:, 0, :t], k_pe_cache[:, 0, :t], w, heads, nope)
    return tuple(x.view(b, t, heads, -1).transpose(1, 2) for x in (k, v))


def mla_absorbed(q, c_cache, k_pe_cache, w, positions, seq_lens, heads: int, nope: int, scale: float):
    """The absorbed form: W_UK folded into the query (q_nope_h @ W_UK_h scores against the latents), the softmax
    over the latent and rotary scores (in f32), the latent output through W_UV -- no key or value expanded."""
    b, s, _ = q.shape
    _, _, t, lat = c_cache.shape
    t = max(1, min(t, int(seq_lens.max()) if seq_lens.numel() else 1))
    c, kpe = c_cache[:, 0, :t], k_pe_cache[:, 0, :t]
    wh = w.to(q.dtype).view(heads, -1, lat)
    w_uk, w_uv = wh[:, :nope], wh[:, nope:]  # [H, P, L], [H, V, L]
    q4 = q.view(b, s, heads, -1)
    q_lat = torch.einsum("bshp,hpl->bhsl", q4[..., :nope], w_uk)
    scores = torch.einsum("bhsl,btl->bhst", q_lat, c) + torch.einsum("bshr,btr->bhst", q4[..., nope:], kpe)
    slots = torch.arange(t)[None, :].expand(b, -1)
    vis = _visible(positions, slots, slots < seq_lens[:, None].long(), True, 0)  # [B, S, t]
    probs = torch.softmax((scores * scale).float().masked_fill(~vis[:, None], float("-inf")), -1)
    o_lat = torch.einsum("bhst,btl->bhsl", probs.to(q.dtype), c)
    out = torch.einsum("bhsl,hvl->bshv", o_lat, w_uv)
    out = torch.where(vis.any(-1)[:, :, None, None], out, torch.zeros((), dtype=out.dtype))
    return out.reshape(b, s, -1)


# ---- tensor parallelism ------------------------------------------------------------------------------------------
def _group(op: str, world: int):
    """torch.distributed, checked to hold ``world`` ranks in its default group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world:
        have = dist.get_world_size() if dist.is_available() and dist.is_initialized() else "no"
        raise RuntimeError(f"{op} over {world} ranks needs torch.distributed initialized with {world} ranks "
                           f"({have} here)")
    return dist


def allreduce(x, world: int):
    """The sum of x over the ranks of torch.distributed's default group, which must have ``world`` ranks."""
    out = x.clone()
    _group("allreduce", world).all_reduce(out)
    return out


def allgather(x, world: int):
    """Every rank's x side by side along the last axis, in rank order."""
    parts = [torch.empty_like(x) for _ in range(world)]
    _group("allgather", world).all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def allreduce_add_rms_norm(x, residual, weight, world: int, eps: float):
    r = allreduce(x, world) + residual
    return rms_norm(r, weight, eps), r


# ---- linear attention: short convolution and the delta rule ------------------------------------------------------
def short_conv(x, weight, bias, act: str):
    # x [B, S, C]: the causal depthwise convolution of a sequence that starts here (zeros before its first token)
    state = x.new_zeros(x.shape[0], weight.shape[1] - 1, x.shape[2])
    return _conv(x, weight, bias, state, act)[0]


def _conv(x, weight, bias, state, act: str):
    """act(bias + sum_j weight[:, j] * ext[s + j]) over ext = [state; x] (state: the W-1 inputs before x), in x's
    dtype, as transformers' causal_conv1d_update computes it."""
    ext = torch.cat([state.to(x.dtype), x], dim=1)
    y = F.conv1d(ext.transpose(1, 2), weight.to(x.dtype)[:, None, :], None if bias is None else bias.to(x.dtype),
                 groups=x.shape[2]).transpose(1, 2)
    return (F.silu(y) if act == SILU else y), ext


def cached_short_conv(x, weight, bias, state, positions, seq_lens, act: str, inplace: bool = False):
    # state [B, W-1, C]: the last W-1 inputs of each sequence so far. A row's valid tokens in this call are the
    # first n = seq_lens - positions[:, 0] (right padding): the new state is the W-1 inputs before token n, so
    # padding never enters it
    y, ext = _conv(x, weight, bias, state, act)
    n = (seq_lens.long() - positions[:, 0].long()).clamp(0, x.shape[1])
    idx = n[:, None] + torch.arange(state.shape[1], device=x.device)[None, :]
    new = torch.gather(ext, 1, idx[..., None].expand(-1, -1, x.shape[2])).to(state.dtype)
    out = state if inplace else state.clone()
    out.copy_(new)
    return y, out


def _l2norm(x, eps: float):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def _delta_inputs(q, k, v, g, beta, heads: int, scale: float, l2norm: bool, eps: float):
    """[B, H, S, D] f32 heads (q scaled, q and k L2-normalised when asked), g [B, H, S, K or 1], beta [B, H, S]."""
    b, s = q.shape[:2]
    q, k, v, g = (t.float().reshape(b, s, heads, -1).transpose(1, 2) for t in (q, k, v, g))
    if l2norm:
        q, k = _l2norm(q, eps), _l2norm(k, eps)
    return q * scale, k, v, g, beta.float().reshape(b, s, heads).transpose(1, 2)


def delta_rule_recurrent(q, k, v, g, beta, state):
    """The delta rule one token at a time over [B, H, S, D] f32 heads from ``state`` [B, H, K, V]: S <- exp(g_t) S
    (g per key channel, or one per head); S <- S + k_t (beta_t (v_t - S^T k_t))^T; o_t = S^T q_t. (o, final S)."""
    out = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t, :, None].exp()
        kt = k[:, :, t]
        delta = (v[:, :, t] - (state * kt[..., None]).sum(-2)) * beta[:, :, t, None]
        state = state + kt[..., None] * delta[..., None, :]
        out.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(out, 2), state


def delta_rule_chunked(q, k, v, g, beta, state, chunk: int = 64):
    """The delta rule by chunks (what prefill kernels compute): within a chunk of C tokens with cumulative gates
    G = cumsum(g), the WY form T = (I - A)^-1 (A[i, j] = -beta_i k_i . (exp(G_i - G_j) k_j), j < i, by forward
    substitution) turns the recurrence into products; across chunks the state carries. Only differences of
    cumulative gates are exponentiated (each <= 0 for a decaying gate; exp(G_i) alone is exp(G_i - G_-1))."""
    b, h, s, dk = k.shape
    pad = (-s) % chunk
    g = g.expand(b, h, s, dk)
    q, k, v, g = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, g))
    beta = F.pad(beta, (0, pad))
    n = (s + pad) // chunk
    q, k, v, g = (t.reshape(b, h, n, chunk, -1) for t in (q, k, v, g))
    beta = beta.reshape(b, h, n, chunk, 1)
    gc = g.cumsum(-2)
    kb, vb = k * beta, v * beta
    diff = gc[..., :, None, :] - gc[..., None, :, :]  # [.., i, j, K]: G_i - G_j
    ones = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device)
    strict, incl = torch.tril(ones, -1), torch.tril(ones)
    a = -(kb[..., :, None, :] * k[..., None, :, :] * diff.masked_fill(~strict[..., None], float("-inf")).exp()).sum(-1)
    for i in range(1, chunk):  # forward substitution: row i of (I - A)^-1 - I from the rows above it
        a[..., i, :i] = a[..., i, :i] + (a[..., i, :i, None] * a[..., :i, :i]).sum(-2)
    t = a + torch.eye(chunk, dtype=a.dtype, device=a.device)
    u, w = t @ vb, t @ (kb * gc.exp())
    att = (q[..., :, None, :] * k[..., None, :, :] * diff.masked_fill(~incl[..., None], float("-inf")).exp()).sum(-1)
    out = []
    for c in range(n):
        last = gc[:, :, c, -1]  # [B, H, K]
        v_new = u[:, :, c] - w[:, :, c] @ state
        out.append((q[:, :, c] * gc[:, :, c].exp()) @ state + att[:, :, c] @ v_new)
        k_decayed = k[:, :, c] * (last[:, :, None] - gc[:, :, c]).exp()  # decayed to the chunk's end
        state = state * last[..., None].exp() + k_decayed.transpose(-1, -2) @ v_new
    return torch.cat(out, 2)[:, :, :s], state


def _delta_out(o, like):
    b, h, s, dv = o.shape
    return o.transpose(1, 2).reshape(b, s, h * dv).to(like.dtype)


def _delta_run(q, k, v, g, beta, state):
    return (delta_rule_chunked if q.shape[2] > 1 else delta_rule_recurrent)(q, k, v, g, beta, state)


def delta_rule(q, k, v, g, beta, heads: int, scale: float, l2norm: bool, eps: float):
    qh, kh, vh, gh, bh = _delta_inputs(q, k, v, g, beta, heads, scale, l2norm, eps)
    state = qh.new_zeros(*kh.shape[:2], kh.shape[-1], vh.shape[-1])
    return _delta_out(_delta_run(qh, kh, vh, gh, bh, state)[0], q)


def cached_delta_rule(q, k, v, g, beta, state, positions, seq_lens, heads: int, scale: float, l2norm: bool,
                      eps: float, inplace: bool = False):
    # tokens at or past seq_lens (right padding) leave the state as it is: their gate is 0 (no decay) and beta 0
    qh, kh, vh, gh, bh = _delta_inputs(q, k, v, g, beta, heads, scale, l2norm, eps)
    valid = (positions < seq_lens[:, None].long())[:, None, :]  # [B, 1, S]
    gh, bh = torch.where(valid[..., None], gh, 0.0), torch.where(valid, bh, 0.0)
    o, new = _delta_run(qh, kh, vh, gh, bh, state.float())
    out = state if inplace else state.clone()
    out.copy_(new)
    return _delta_out(o, q), out


def activation(x, act: str):
    if act == SILU:
        return F.silu(x)
    if act == GELU:
        return F.gelu(x)
    if act == GELU_TANH:
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation '{act}'")


def rms_norm_linear(x, norm_weight, weight, bias, residual, eps, splits, act):
    # x: [..., H]; weight: [N, H] -> pieces [..., n] (or act(gate) * up), then the new residual stream
    r = x if residual is None else x + residual
    y = F.linear(rms_norm(r, norm_weight, eps), weight, bias)
    pieces = list(torch.split(y, list(splits), dim=-1))
    if act != "none":
        pieces = [activation(pieces[0], act) * pieces[1]]
    return tuple(pieces + ([r] if residual is not None else []))


def arm_mlp(x, norm_weight, gate_m, up, down_scaled, mu, scale, residual, eps, tau, act):
    # x: [..., H]; gate_m: [I + H, H] = [W_g; M]; up: [I, H]; down_scaled: [H, I] = W_d diag(scale)
    h = rms_norm(x, norm_weight, eps)
    i = up.shape[0]
    gm = F.linear(h, gate_m)
    g, m = gm[..., :i], gm[..., i:]
    a_hat = (activation(g, act) - mu) / scale
    a_hat = torch.where(a_hat.abs() >= tau, a_hat, torch.zeros((), dtype=a_hat.dtype))
    y = F.linear(a_hat * F.linear(h, up), down_scaled) + m
    return y if residual is None else y + residual


# ---- MoE (docs/models.md) ---------------------------------------------------------------------------------------
def moe_route(x, weight, bias, router, top_k, n_group, topk_group, renormalize, scaling, router_f32, weights_f32,
              renorm_eps=1e-20):
    # x: [..., H] -> ids i32[..., k], weights [..., k]: transformers' routers, with their rounding points
    lead, h = x.shape[:-1], x.reshape(-1, x.shape[-1])
    logits = F.linear(h.float(), weight.float()) if router_f32 else F.linear(h, weight)
    if router == "softmax":  # Mixtral, Qwen3-MoE: softmax in f32, top-k
        w, ids = torch.topk(torch.softmax(logits.float(), -1), top_k, -1)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
    elif router == "topk_softmax":  # Granite, Cohere2-MoE: top-k of the logits, the softmax of those k in f32
        w, ids = torch.topk(logits.float(), top_k, -1)
        w = torch.softmax(w, -1)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
    else:  # DeepSeek-V3, Kimi: sigmoid scores, chosen by score + bias within the best groups
        scores = logits.float().sigmoid()
        choice = scores if bias is None else scores + bias
        if n_group > 1:
            e = choice.shape[-1]
            groups = choice.view(-1, n_group, e // n_group).topk(2, -1)[0].sum(-1)
            keep = torch.topk(groups, topk_group, -1, sorted=False)[1]
            allowed = torch.zeros_like(groups).scatter_(1, keep, 1).bool().repeat_interleave(e // n_group, 1)
            choice = choice.masked_fill(~allowed, float("-inf"))
        ids = torch.topk(choice, top_k, -1, sorted=False)[1]
        w = scores.gather(1, ids)
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + renorm_eps) if renorm_eps else w / w.sum(-1, keepdim=True)
    w = w * scaling
    w = w if weights_f32 else w.to(x.dtype)
    return ids.to(torch.int32).reshape(*lead, top_k), w.reshape(*lead, top_k)


def glu(gate, up, act: str, limit: float = 0.0, clamp: str = "gate", alpha: float = 1.0, up_shift: float = 0.0):
    """The experts' gated unit (opdefs.GLU): act(gate) * up, clamped at ``limit`` and shifted as the attributes
    say, each step in the operands' dtype as transformers computes it."""
    if limit:
        up = up.clamp(-limit, limit)
        if clamp == "gate":
            gate = gate.clamp(max=limit)
    g = gate * torch.sigmoid(gate * alpha) if act == SILU and alpha != 1.0 else activation(gate, act)
    if limit and clamp == "act":
        g = g.clamp(max=limit)
    return g * (up + up_shift if up_shift else up)


def experts(x, ids, weights, gate_up, down, gate_up_bias, down_bias, act, **unit):
    # transformers' eager experts: every expert over its tokens, added into the output in expert order
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        gate_up_e = F.linear(x[tok], gate_up[e])
        if gate_up_bias is not None:
            gate_up_e = gate_up_e + gate_up_bias[e]
        y = F.linear(glu(*gate_up_e.chunk(2, dim=-1), act, **unit), down[e])
        if down_bias is not None:
            y = y + down_bias[e]
        y = y * weights[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def moe(x, weight, bias, gate_up, down, shared_gate, shared_up, shared_down, act, **route):
    # the block: route, the experts, plus the shared expert's MLP on every token
    ids, w = moe_route(x, weight, bias, **route)
    k = ids.shape[-1]
    out = experts(x.reshape(-1, x.shape[-1]), ids.reshape(-1, k), w.reshape(-1, k), gate_up, down, None, None, act)
    out = out.reshape(x.shape)
    if shared_gate is not None:
        out = out + F.linear(activation(F.linear(x, shared_gate), act) * F.linear(x, shared_up), shared_down)
    return out


def moe_sort(ids, experts: int):
    # the (token, k) pairs stably sorted by expert, and where each expert's rows start
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(experts + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=experts), 0)
    return order.to(torch.int32), offsets.to(torch.int32)


def grouped_gemm(x, w, order, offsets, scale, bias, gather: int, act: str, **unit):
    rows = x.reshape(-1, x.shape[-1])[order.long() // gather] if gather else x
    n = w.shape[1] // 2 if act != "none" else w.shape[1]
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    picked = scale.reshape(-1)[order.long()] if scale is not None else None
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue  # an expert without tokens
        y = F.linear(rows[lo:hi], w[e])
        if bias is not None:
            y = y + bias[e]
        if act != "none":
            gate, up = y.chunk(2, dim=-1)
            y = glu(gate, up, act, **unit)
        if picked is not None:
            y = (y * picked[lo:hi, None]).to(x.dtype)
        out[lo:hi] = y
    return out


def moe_combine(y, order, like, top_k: int):
    out = torch.zeros(like.numel() // like.shape[-1], like.shape[-1], dtype=y.dtype, device=y.device)
    out.index_add_(0, order.long() // top_k, y)  # rows in expert order: each token's sum in expert order
    return out.reshape(like.shape)


def swiglu(gate, up, act):
    return activation(gate, act) * up


_ROUTE_ATTRS = ("top_k", "n_group", "topk_group", "renormalize", "scaling", "router_f32", "weights_f32", "renorm_eps")


def route_attrs(a: dict) -> dict:
    """A route's attributes as the Triton kernel's keyword arguments."""
    return {"router_kind": a["router"], **{k: a[k] for k in _ROUTE_ATTRS}}


# ---- backend fusions (passes/backend.py): each is the composition of the ops it replaces -----------------------
def head_rms_norm(x, weight, eps: float):
    # x: [B, S, H*D], weight: [D]: RMSNorm of each head (Qwen3's q/k norms)
    b, s, width = x.shape
    d = weight.shape[0]
    return rms_norm(x.reshape(b, s, width // d, d), weight, eps).reshape(b, s, width)


def rope_cache_write(q, k, v, positions, k_cache, v_cache, heads, inv_freq, scaling, layout, inplace=False):
    q, k = rope(q, k, positions, heads, inv_freq, scaling, layout)
    return (q, kv_cache_write(k_cache, k, positions, inplace), kv_cache_write(v_cache, v, positions, inplace))


def rope_cached_attention(q, k, v, positions, seq_lens, k_cache, v_cache, q_norm, k_norm, sinks, heads, inv_freq,
                          scaling, layout, scale, causal, window, softcap, eps, inplace=False):
    if q_norm is not None:
        q, k = head_rms_norm(q, q_norm, eps), head_rms_norm(k, k_norm, eps)
    q, k_cache, v_cache = rope_cache_write(q, k, v, positions, k_cache, v_cache, heads, inv_freq, scaling, layout,
                                           inplace)
    return (cached_attention(q, k_cache, v_cache, positions, seq_lens, sinks, scale, causal, window, softcap),
            k_cache, v_cache)


def rms_norm_moe_route(x, norm_weight, weight, bias, eps, **route):
    normed = rms_norm(x, norm_weight, eps)
    return (normed, *moe_route(normed, weight, bias, **route))
