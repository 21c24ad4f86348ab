"""Raise attention: ``scaled_dot_product_attention`` (or lowerlm's traceable eager attention with soft-capping
and sinks, frontend/eager_attention.py) with its GQA expansion, RoPE on q and k, and the mask the model built, into
``rope`` + ``attention`` over token-major ``[B, S, H*D]`` values.

- GQA: k and v reach sdpa either through ``unsqueeze, expand, clone, _unsafe_view`` (transformers' repeat_kv) or
  directly with ``enable_gqa=True``.
- RoPE: ``q*cos + rotate(q)*sin`` where cos/sin depend only on ``position_ids`` and buffers, and ``rotate`` only on
  q. Numeric checks on the model's own nodes give the layout (half or interleaved), ``inv_freq`` (the rotary
  module's buffer) and the cos/sin multiplier (the value at position 0).
- The softmax scale is read from the sdpa call. The mask the model builds is evaluated at the example length and
  at a longer one and must be causal (optionally within a sliding window) or all-visible: the ``attention`` op's
  causal + ``seq_lens`` semantics then stand in for it, padding included.
Where a check fails the block stays core ops (RoPE) or, for a mask the op cannot express, UnsupportedOpError.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from lowerlm.frontend.fx import ancestors, fx_eval, kwargs_of
from lowerlm.frontend.importer import Raised
from lowerlm.ir.abi import INPUT_IDS
from lowerlm.ir.errors import UnsupportedOpError
from lowerlm.ir.ops import Op
from lowerlm.ir.rope import rope_cos_sin, rotate

aten = torch.ops.aten


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def unwrap_repeat_kv(node: fx.Node) -> fx.Node:
    """K [B, Hk, S, D] from ``_unsafe_view(clone(expand(unsqueeze(K, 2), [B, Hk, r, S, D])), [B, Hk*r, S, D])``."""
    n = node
    if not _is(n, aten._unsafe_view.default, aten.view.default, aten.reshape.default):
        return node
    n = n.args[0]
    if _is(n, aten.clone.default):
        n = n.args[0]
    if not _is(n, aten.expand.default) or not _is(n.args[0], aten.unsqueeze.default) or n.args[0].args[1] != 2:
        return node
    k = n.args[0].args[0]
    kv, ev = k.meta["val"], n.meta["val"]
    if ev.dim() != 5 or kv.dim() != 4 or ev.shape[1] != kv.shape[1] or ev.shape[3:] != kv.shape[2:]:
        return node
    return k


def _rope_candidates(t: fx.Node):
    """(X, cos, sin, rotated) assignments of ``add(mul(X, cos), mul(rotated, sin))``."""
    if not _is(t, aten.add.Tensor) or kwargs_of(t).get("alpha", 1) != 1:
        return
    a, b = t.args
    for m1, m2 in ((a, b), (b, a)):
        if not (_is(m1, aten.mul.Tensor) and _is(m2, aten.mul.Tensor)):
            continue
        for x, c in (m1.args, m1.args[::-1]):
            for r, s in (m2.args, m2.args[::-1]):
                if all(isinstance(v, fx.Node) for v in (x, c, r, s)):
                    yield x, c, s, r


class _RopeCheck:
    """Numeric identification of RoPE parameters, shared by the q and k of every layer."""

    def __init__(self, imp):
        self.imp = imp
        self.pos_node = imp.positions_node
        self.cache: dict = {}
        ex = imp.info.example[INPUT_IDS]
        self.positions = torch.randint(0, max(imp.info.max_positions, 2), ex.shape,
                                       generator=torch.Generator().manual_seed(0)).to(ex.device)
        self.zeros = torch.zeros_like(self.positions)

    def _env(self, positions):
        inputs = dict(self.imp.info.example, position_ids=positions)
        return self.imp.example_env(inputs)

    def trig(self, c: fx.Node, s: fx.Node):
        """(inv_freq, scaling, layout) if c/s are cos/sin of positions·inv_freq times one multiplier."""
        key = (c, s)
        if key not in self.cache:
            self.cache[key] = self._trig(c, s)
        return self.cache[key]

    def _trig(self, c, s):
        if self.pos_node is None:
            return None
        allowed = {self.pos_node} | {n for n, (k, _) in self.imp.placeholders.items() if k in ("BUFFER",)}
        inv_nodes = []
        for node in (c, s):
            anc = ancestors(node)
            phs = {n for n in anc if n.op == "placeholder"}
            if self.pos_node not in phs or not phs <= allowed:
                return None
            inv_nodes += [n for n in phs if str(self.imp.placeholders[n][1]).endswith("inv_freq")
                          and not str(self.imp.placeholders[n][1]).endswith("original_inv_freq")]
        if len(set(inv_nodes)) != 1:
            return None
        env = self._env(self.positions)
        inv_freq = env[inv_nodes[0]].float()
        cv, sv = fx_eval(c, env).cpu(), fx_eval(s, env).cpu()  # compared on the host, wherever the model is
        c0 = fx_eval(c, self._env(self.zeros))
        scaling = float(c0.reshape(-1)[0])
        if cv.dim() != 4 or sv.shape != cv.shape:
            return None
        for layout in ("half", "interleaved"):
            want_c, want_s = rope_cos_sin(self.positions.cpu(), inv_freq.tolist(), scaling, layout, cv.dtype)
            want_c, want_s = want_c.transpose(1, 2), want_s.transpose(1, 2)  # [B, 1, S, R] like the model's
            if want_c.shape[-1] != cv.shape[-1]:
                return None
            tol = dict(rtol=1e-5, atol=1e-5) if cv.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            try:
                ok = torch.allclose(cv.float(), want_c.float().expand_as(cv), **tol) and \
                    torch.allclose(sv.float(), want_s.float().expand_as(sv), **tol)
            except RuntimeError:
                return None
            if ok:
                return tuple(inv_freq.tolist()), scaling, layout
        return None

    def rotation(self, x: fx.Node, r: fx.Node, layout: str) -> bool:
        """Whether ``r`` is ``rotate(x)`` for the layout: run the model's nodes on a random x."""
        if x not in ancestors(r, stop={x}):
            return False
        env = self.imp.example_env()
        probe = torch.randn(self.imp.example_shape(x), dtype=x.meta["val"].dtype).to(
            self.imp.info.example[INPUT_IDS].device)
        env[x] = probe
        try:
            got = fx_eval(r, env)
        except Exception:  # the subgraph does not run on a probe: not a plain rotation
            return False
        return got.shape == probe.shape and torch.equal(got.cpu(), rotate(probe.cpu(), layout))


def match_rope(check: _RopeCheck, t: fx.Node):
    """(X, (inv_freq, scaling, layout), cos node) when ``t`` is RoPE applied to X, else None."""
    for x, c, s, r in _rope_candidates(t):
        if x.meta["val"].shape != t.meta["val"].shape:
            continue
        params = check.trig(c, s)
        if params is None:
            continue
        if check.rotation(x, r, params[2]):
            return x, params, c
    return None


def _expected_mask(s: int, causal: bool, window: int) -> torch.Tensor:
    i = torch.arange(s)
    diff = i[:, None] - i[None, :]
    vis = torch.ones(s, s, dtype=torch.bool)
    if causal:
        vis &= diff >= 0
    if window:
        vis &= diff < window
    return vis


def analyse_mask(imp, sdpa: fx.Node, kw: dict, cache: dict) -> tuple:
    """(causal, window) standing for the sdpa call's mask, after checking the mask numerically at the example
    length, at 48 and just past the config's sliding window (if any). Layers sharing a mask share the check."""
    mask = kw.get("attn_mask")
    if mask is None:
        return bool(kw.get("is_causal")), 0
    if mask not in cache:
        cache[mask] = _analyse_mask(imp, sdpa, kw)
    return cache[mask]


def _analyse_mask(imp, sdpa: fx.Node, kw: dict) -> tuple:
    mask = kw["attn_mask"]
    if kw.get("is_causal"):
        raise UnsupportedOpError("aten.scaled_dot_product_attention", imp.path(sdpa), "both a mask and is_causal")
    ex = imp.info.example[INPUT_IDS]
    lengths = {int(ex.shape[1]), 48}
    if imp.info.window_hint:
        lengths.add(imp.info.window_hint + 2)
    lengths = sorted(n for n in lengths if n <= max(imp.info.max_positions, int(ex.shape[1])))
    masks = {}
    for s in lengths:
        inputs = {INPUT_IDS: torch.zeros(ex.shape[0], s, dtype=ex.dtype, device=ex.device)}
        if "position_ids" in imp.info.example:
            inputs["position_ids"] = torch.arange(s, device=ex.device).repeat(ex.shape[0], 1)
        try:
            vis = _visible(imp, sdpa, mask, imp.example_env(inputs))
        except UnsupportedOpError:
            raise
        except Exception as e:  # the model's mask builder failed at another length
            raise UnsupportedOpError("attention mask", imp.path(sdpa), f"cannot evaluate the mask: {e}") from None
        masks[s] = vis.expand(ex.shape[0], 1, s, s)[:, 0].cpu()
    longest = masks[lengths[-1]][0]
    causal = not bool(longest.triu(1).any())
    seen = int(longest[-1].sum())
    window = seen if causal and seen < lengths[-1] else 0
    for s, vis in masks.items():
        if not torch.equal(vis, _expected_mask(s, causal, window).expand_as(vis)):
            raise UnsupportedOpError("attention mask", imp.path(sdpa),
                                     "the model's mask is neither causal, sliding-window nor all-visible")
    return causal, window


def _visible(imp, sdpa: fx.Node, mask, env: dict) -> torch.Tensor:
    """Where the mask lets a query see a key (bool, broadcastable to [B, H, S, S]). ``mask``: sdpa's (an additive
    float mask, or bool: true where visible) or a written-out attention's parts (``_written_out``): an additive mask,
    and a fill of hidden scores whose value must hide them (at most finfo.min / 2, or -inf)."""
    parts = mask if isinstance(mask, tuple) else (("add", mask, None),)
    vis = None
    for kind, node, fill in parts:
        m = fx_eval(node, env)
        if m.dim() > 4 or m.dim() >= 3 and m.shape[-3] != 1:  # one mask per head (Doge's)
            raise UnsupportedOpError("attention mask", imp.path(sdpa), f"a mask of shape {list(m.shape)} (one per "
                                     "head) is not expressible as causal or sliding-window attention over seq_lens")
        if kind == "add":
            part = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
            if m.dtype != torch.bool and bool((m[part.expand_as(m)] != 0).any()):  # ALiBi, relative biases
                raise UnsupportedOpError("attention mask", imp.path(sdpa), "the mask adds a bias to visible scores "
                                         "(ALiBi or a relative-position bias), which the attention op has no form "
                                         "for")
        else:
            value = fx_eval(fill, env) if isinstance(fill, fx.Node) else torch.tensor(float(fill))
            dtype = value.dtype if value.dtype.is_floating_point else torch.float32
            if value.numel() != 1 or not float(value) <= torch.finfo(dtype).min / 2:
                raise UnsupportedOpError("attention mask", imp.path(sdpa), f"hidden scores are filled with {value}, "
                                         "not -inf or the dtype's lowest value: that is a score bias, not a mask")
            part = m if kind == "keep" else ~m
        vis = part if vis is None else vis & part
    return vis


def raise_attention(imp) -> dict:
    """Attention blocks of the graph, keyed by the node standing for their result (``_sites``)."""
    check = _RopeCheck(imp)
    masks: dict = {}
    out = {}
    for node, kw in _sites(imp):
        if kw.get("dropout_p", 0.0) != 0.0:
            raise UnsupportedOpError("aten.scaled_dot_product_attention", imp.path(node), "dropout_p != 0")
        q, k, v = kw["query"], kw["key"], kw["value"]
        softcap, sinks = float(kw.get("softcap") or 0.0), kw.get("sinks")
        if not kw.get("enable_gqa"):
            k, v = unwrap_repeat_kv(k), unwrap_repeat_kv(v)
        qv, kv, vv = q.meta["val"], k.meta["val"], v.meta["val"]
        if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
            continue
        hq, hk, d = int(qv.shape[1]), int(kv.shape[1]), int(qv.shape[3])
        scale = kw.get("scale")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
        causal, window = analyse_mask(imp, node, kw, masks)
        rq, rk = match_rope(check, q), match_rope(check, k)
        rope = None
        if rq is not None and rk is not None and rq[1] == rk[1]:
            rope = rq[1]
            q, k = rq[0], rk[0]

        def build(imp, node=node, q=q, k=k, v=v, rope=rope, hq=hq, hk=hk, scale=scale, causal=causal,
                  window=window, softcap=softcap, sinks=sinks):
            qf, kf, vf = (to_tokens(imp, node, imp.value(x), h) for x, h in ((q, hq), (k, hk), (v, hk)))
            if rope is not None:
                inv_freq, scaling, layout = rope
                qf, kf = imp.emit(node, Op.ROPE, [qf, kf, imp.positions],
                                  {"heads": [hq, hk], "inv_freq": list(inv_freq), "scaling": scaling,
                                   "layout": layout}, names=[short(imp, node, "q_rope"), short(imp, node, "k_rope")])
            extra = [imp.value(sinks)] if sinks is not None else []
            o = imp.emit(node, Op.ATTENTION, [qf, kf, vf, imp.positions, imp.seq_lens, *extra],
                         {"heads": [hq, hk], "scale": scale, "causal": causal, "window": window, "softcap": softcap},
                         name=short(imp, node, "attention"))
            return to_heads(imp, node, o, hq)

        deps = [q, k, v] + ([sinks] if sinks is not None else [])
        out[node] = Raised(deps, build, "attention")
    return out


def _sites(imp):
    """(node standing for the attention result [B, H, S, Dv], its arguments by sdpa's names) for every attention of
    the graph: sdpa calls, lowerlm's traceable eager attention (``enable_gqa``: it groups heads itself) and the
    matmul-softmax-matmul a model writes out itself (BERT-style over 4-D heads, BART-era over [B*H, S, D])."""
    eager = _eager_attention_op()
    for node in imp.graph.nodes:
        if _is(node, aten.scaled_dot_product_attention.default):
            yield node, kwargs_of(node)
        elif _is(node, *eager):
            yield node, dict(kwargs_of(node), enable_gqa=True)
        elif _is(node, aten.matmul.default):
            kw = _written_out(node)
            if kw is not None:
                yield node, kw
        elif _is(node, *_VIEWS) and _is(node.args[0], aten.bmm.default) and node.meta["val"].dim() == 4:
            kw = _written_out_by_batches(node)
            if kw is not None:
                yield node, kw


def _written_out(out: fx.Node) -> dict | None:
    """sdpa's arguments when ``out`` is ``softmax(scores, -1) @ v`` over 4-D heads, where ``scores`` is
    ``matmul(q, k^T)`` with, in any order, a scale (``/`` or ``*`` a number), an additive mask (``+ mask``) and a
    fill of hidden scores (``masked_fill(s, hide, -inf)`` as nanoGPT writes it, ``where(keep, s, finfo.min)`` as
    GPT-Neo does, the condition often sliced from a fixed-size buffer); else None. The mask parts go to the mask
    check as one (``_visible``)."""
    probs, v = out.args[:2]
    while _is(probs, aten.clone.default, aten.alias.default, aten.dropout.default):  # dropout: identity in eval
        probs = probs.args[0]
    if not _is(probs, aten.softmax.int, aten._softmax.default) or probs.args[1] not in (-1, 3):
        return None
    scores, parts, scale = probs.args[0], [], None
    while not _is(scores, aten.matmul.default):
        if _is(scores, aten.add.Tensor) and kwargs_of(scores).get("alpha", 1) == 1 and \
                not any(p[0] == "add" for p in parts):
            a, b = scores.args
            scores, mask = (a, b) if _is(a, aten.div.Tensor, aten.mul.Tensor, aten.matmul.default, *_FILLS) else (b, a)
            if not (isinstance(mask, fx.Node) and mask.meta["val"].dim() <= 4):
                return None
            parts.append(("add", mask, None))
        elif _is(scores, aten.div.Tensor, aten.mul.Tensor) and isinstance(scores.args[1], (int, float)) and \
                scale is None:
            scale = 1.0 / scores.args[1] if scores.target is aten.div.Tensor else float(scores.args[1])
            scores = scores.args[0]
        elif _is(scores, *_FILLS) and not any(p[0] != "add" for p in parts):
            fill = _fill(scores)
            if fill is None:
                return None
            scores, part = fill
            parts.append(part)
        else:
            return None
    q, kt = scores.args
    if not _is(kt, aten.transpose.int) or {d % 4 for d in kt.args[1:]} != {2, 3}:
        return None
    k = kt.args[0]
    if not all(isinstance(x, fx.Node) and x.meta["val"].dim() == 4 for x in (q, k, v)):
        return None
    mask = None if not parts else parts[0][1] if parts == [("add", parts[0][1], None)] else tuple(parts)
    return {"query": q, "key": k, "value": v, "attn_mask": mask, "scale": 1.0 if scale is None else scale}


_FILLS = (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther,
          aten.where.ScalarSelf)


def _fill(node: fx.Node):
    """(scores, ("hide" or "keep", the boolean condition, the fill value)) of a fill of hidden scores, else None:
    ``masked_fill(scores, hide, value)``, ``where(keep, scores, value)`` or ``where(hide, value, scores)``; the
    value (a number or a node) is checked to hide (``_visible``)."""
    kw = kwargs_of(node)
    if node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        cond, scores, value, kind = kw["mask"], kw["self"], kw["value"], "hide"
    else:
        cond, a, b = kw["condition"], kw["self"], kw["other"]
        scores_first = _is(a, aten.matmul.default, aten.div.Tensor, aten.mul.Tensor)
        scores, value, kind = (a, b, "keep") if scores_first else (b, a, "hide")
    if not isinstance(scores, fx.Node) or not isinstance(cond, fx.Node) or cond.meta["val"].dtype != torch.bool or \
            cond.meta["val"].dim() > 4:
        return None
    return scores, (kind, cond, value)


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _heads_of(x: fx.Node) -> fx.Node | None:
    """The 4-D [B, H, S, D] value a [B*H, S, D] ``x`` is a view of (through a clone), else None."""
    if not _is(x, *_VIEWS):
        return None
    h = x.args[0]
    while _is(h, aten.clone.default):
        h = h.args[0]
    hv, xv = h.meta["val"], x.meta["val"]
    if hv.dim() != 4 or xv.dim() != 3 or str(xv.shape[0]) != str(hv.shape[0] * hv.shape[1]) or \
            tuple(map(str, xv.shape[1:])) != tuple(map(str, hv.shape[2:])):
        return None
    return h


def _written_out_by_batches(out: fx.Node) -> dict | None:
    """sdpa's arguments when ``out`` is the [B, H, S, Dv] view of ``bmm(softmax(view(view(bmm(q, k^T)) + mask)),
    v)`` over [B*H, S, D] batches (BART-era attention: XGLM, TrOCR, MVP; q scaled before, so scale 1; XGLM clamps
    the masked scores at finfo.min, which changes nothing the softmax sees), else None."""
    probs, v = out.args[0].args
    while _is(probs, aten.clone.default, aten.dropout.default, *_VIEWS):
        probs = probs.args[0]
    if not _is(probs, aten.softmax.int, aten._softmax.default) or probs.args[1] not in (-1, 2, 3):
        return None
    scores = probs.args[0]
    while _is(scores, *_VIEWS):
        scores = scores.args[0]
    if _is(scores, aten.max.other) and _is(scores.args[1], aten.full.default):
        scores = scores.args[0]
    mask = None
    if _is(scores, aten.add.Tensor) and kwargs_of(scores).get("alpha", 1) == 1:
        scores, mask = scores.args
    while _is(scores, *_VIEWS):
        scores = scores.args[0]
    if not _is(scores, aten.bmm.default) or not _is(scores.args[1], aten.transpose.int) or \
            {d % 3 for d in scores.args[1].args[1:]} != {1, 2}:
        return None
    q, k, v = _heads_of(scores.args[0]), _heads_of(scores.args[1].args[0]), _heads_of(v)
    if q is None or k is None or v is None or \
            mask is not None and not (isinstance(mask, fx.Node) and mask.meta["val"].dim() <= 4):
        return None
    return {"query": q, "key": k, "value": v, "attn_mask": mask, "scale": 1.0}


def _eager_attention_op() -> tuple:
    """lowerlm's traceable eager attention (frontend/eager_attention.py), when registered with torch."""
    op = getattr(getattr(torch.ops, "lowerlm", None), "attention", None)
    return (op.default,) if op is not None and hasattr(op, "default") else ()


def short(imp, node, what: str) -> str:
    from lowerlm.frontend.importer import short_name

    return f"{short_name(imp.path(node))}.{what}"


def to_tokens(imp, node, x: str, heads: int) -> str:
    """[B, H, S, D] -> [B, S, H*D] (canonicalize cancels it against the model's own view + transpose)."""
    t = imp.b.types[x]
    b, h, s, d = t.shape
    y = imp.emit(node, Op.TRANSPOSE, [x], {"perm": [0, 2, 1, 3]})
    return imp.emit(node, Op.RESHAPE, [y], {"shape": [b, s, h * d]})


def to_heads(imp, node, x: str, heads: int) -> str:
    """[B, S, H*D] -> [B, H, S, D]: the value the sdpa node stood for."""
    b, s, width = imp.b.types[x].shape
    y = imp.emit(node, Op.RESHAPE, [x], {"shape": [b, s, heads, width // heads]})
    return imp.emit(node, Op.TRANSPOSE, [y], {"perm": [0, 2, 1, 3]})
