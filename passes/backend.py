"""Backend tails: the fusions a backend's kernels take, as passes after ``select_logits`` that make real IR ops.

Each fused op is the composition of the nodes it replaces (its row in ``ir/opdefs.py`` says so, and its reference
implementation computes exactly that), so a tail changes which kernels run, never what they compute. The fused node
takes the replaced results' names, so users and returned state need no renaming, and sits where its last input is
ready and before its first user (the anchor named below). ``TAILS`` in ``passes/__init__.py`` lists each backend's.

- ``fuse_decode_attention`` (Triton): in decode (S = 1), ``rope`` → the two ``kv_cache_write`` of its layer →
  ``cached_attention`` becomes one ``rope_cached_attention``; Qwen3's per-head q/k norms
  (``reshape → rms_norm → reshape`` on both q and k, one eps, weights in the activations' dtype) fold in.
- ``fuse_gqa_attention`` (ONNX): the same chain, prefill and decode, where ONNX Runtime's GroupQueryAttention
  takes it: causal, no window, half-split RoPE, head size a multiple of 16, sinks (gpt-oss) in the activations'
  dtype (its ``head_sink`` input; ``softcap`` its attribute); norms never fold.
- ``fuse_rope_cache_write`` (Triton): a ``rope`` whose k result feeds only its layer's k cache write, with the v
  write of the same layer and positions, becomes one ``rope_cache_write``.
- ``fuse_route_norm`` (Triton): an ``rms_norm`` whose first user routes it (``moe_route``) becomes one
  ``rms_norm_moe_route`` yielding the normed value for the later users too; so does one whose flattened rows
  (a ``reshape`` to [T, H], as traced MoE blocks make) are routed first, the other users after the route reading
  the rows reshaped back.
- ``fuse_ew_chains`` (Triton): each single-use chain of float element-wise nodes becomes one ``ew_chain`` whose body
  is the chain (a lone element-wise node too: one generated kernel either way).

Must not fire: a value with another user (an intermediate returned, a cache read by a second attention), a chain
the backend cannot take (window, layout, head size), a rope whose caches belong to different layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowerlm.ir.body import from_nodes
from lowerlm.ir.graph import Graph, GraphBuilder, Node
from lowerlm.ir.ops import ELEMENTWISE, Op
from lowerlm.passes.pattern import Pass, merge_sources


@dataclass(frozen=True)
class Fusion:
    """Replace ``drop`` (node names) by one ``op`` node at ``anchor``'s place, taking the result names ``names``."""

    anchor: str
    drop: frozenset
    op: Op
    inputs: tuple
    attrs: dict
    names: tuple
    source: tuple
    pre: tuple = ()  # (op, inputs, attrs, result name): views emitted just before the fused node
    post: tuple = ()  # the same, just after it


def apply_fusions(g: Graph, fusions: list) -> Graph:
    """``g`` with each fusion applied (their ``drop`` sets must be disjoint)."""
    if not fusions:
        return g
    at = {f.anchor: f for f in fusions}
    dropped = set().union(*(f.drop for f in fusions))
    b = GraphBuilder.rebuild(g)
    for node in g.nodes:
        f = at.get(node.name)
        if f is not None:
            b.release(list(f.names) + [name for *_, name in f.post])
            for op, inputs, attrs, name in f.pre:
                b.add(op, inputs, attrs, names=[name], source=f.source)
            b.add(f.op, f.inputs, f.attrs, names=f.names, source=f.source)
            for op, inputs, attrs, name in f.post:
                b.add(op, inputs, attrs, names=[name], source=f.source)
        elif node.name not in dropped:
            b.append(node)
    return b.build(g.outputs, g.state_outputs)


def _only_user(g: Graph, value: str) -> Node | None:
    """The one node reading ``value`` when nothing else (no other node, no output) does."""
    users = g.users.get(value, [])
    return users[0] if len(users) == 1 and g.use_count(value) == 1 else None


def _node_users(g: Graph, value: str) -> list:
    return g.users.get(value, [])


# ---- rope → cache writes → cached_attention ---------------------------------------------------------------------
def _attention_chain(g: Graph, att: Node):
    """(rope, k write, v write) feeding ``att`` alone, or None."""
    rope, kw, vw = (g.producer(v) for v in att.inputs[:3])
    if not (rope and kw and vw and rope.op is Op.ROPE and kw.op is vw.op is Op.KV_CACHE_WRITE):
        return None
    q_out, k_out = rope.result_names
    positions = att.inputs[3]
    if att.inputs[0] != q_out or kw.inputs[1] != k_out or not rope.inputs[2] == kw.inputs[2] == vw.inputs[2] == \
            positions or _only_user(g, q_out) is not att or _only_user(g, k_out) is not kw:
        return None
    # the new cache versions: read by this attention alone (and returned as state)
    if any(u is not att for w in (kw, vw) for u in _node_users(g, w.results[0].name)):
        return None
    return rope, kw, vw


def _head_norm(g: Graph, value: str, head_dim):
    """For ``value`` = reshape(rms_norm(reshape(x) to heads of ``head_dim``, w)) back to rows, each step used once
    and w in the activations' dtype: (x, w, eps, the three nodes); else None."""
    back = g.producer(value)
    norm = g.producer(back.inputs[0]) if back is not None and back.op is Op.RESHAPE else None
    split = g.producer(norm.inputs[0]) if norm is not None and norm.op is Op.RMS_NORM else None
    if split is None or split.op is not Op.RESHAPE or any(g.use_count(n.results[0].name) != 1
                                                          for n in (split, norm, back)):
        return None
    heads = norm.results[0].type
    if heads.rank != 4 or heads.shape[-1] != head_dim or g.type_of(norm.inputs[1]).dtype != heads.dtype:
        return None
    return split.inputs[0], norm.inputs[1], norm.attr("eps"), (split, norm, back)


def _attention_fusion(g: Graph, att: Node, rope: Node, kw: Node, vw: Node, norms) -> Fusion:
    q, k = rope.inputs[0], rope.inputs[1]
    extra, drop, inputs_norm = (), {rope.name, kw.name, vw.name}, (None, None)
    attrs = dict(rope.attrs, **att.attrs)
    if norms is not None:
        (q, qw, eps, qnodes), (k, kn, _, knodes) = norms
        inputs_norm, extra = (qw, kn), qnodes + knodes
        drop |= {n.name for n in extra}
        attrs["eps"] = eps
    inputs = (q, k, vw.inputs[1], att.inputs[3], att.inputs[4], kw.inputs[0], vw.inputs[0]) + inputs_norm + \
        (att.inputs[5],)
    names = (att.results[0].name, kw.results[0].name, vw.results[0].name)
    return Fusion(att.name, frozenset(drop), Op.ROPE_CACHED_ATTENTION, inputs, attrs, names,
                  merge_sources(*extra, rope, kw, vw, att))


@Pass
def fuse_decode_attention(g: Graph) -> tuple:
    """Triton, decode: rope, the two cache writes and cached_attention (per-head q/k norms folded in) become one
    rope_cached_attention."""
    fusions = []
    for att in (n for n in g.nodes if n.op is Op.CACHED_ATTENTION):
        chain = _attention_chain(g, att)
        if chain is None or g.type_of(att.inputs[0]).shape[1] != 1:
            continue
        rope, kw, vw = chain
        d = g.type_of(kw.inputs[0]).shape[-1]
        norms = _head_norm(g, rope.inputs[0], d), _head_norm(g, rope.inputs[1], d)
        both = norms[0] is not None and norms[1] is not None and norms[0][2] == norms[1][2]
        fusions.append(_attention_fusion(g, att, rope, kw, vw, norms if both else None))
    return apply_fusions(g, fusions), len(fusions)


@Pass
def fuse_gqa_attention(g: Graph) -> tuple:
    """ONNX: rope, the two cache writes and cached_attention become one rope_cached_attention where
    GroupQueryAttention takes it."""
    fusions = []
    for att in (n for n in g.nodes if n.op is Op.CACHED_ATTENTION):
        chain = _attention_chain(g, att)
        sinks = att.inputs[5]
        if chain is None or att.attr("window") or not att.attr("causal") or \
                g.type_of(att.inputs[1]).shape[3] % 16 or chain[0].attr("layout") != "half" or \
                (sinks is not None and g.type_of(sinks).dtype != g.type_of(att.inputs[0]).dtype):
            continue
        fusions.append(_attention_fusion(g, att, *chain, None))
    return apply_fusions(g, fusions), len(fusions)


# ---- rope + cache writes ------------------------------------------------------------------------------------------
@Pass
def fuse_rope_cache_write(g: Graph) -> tuple:
    """Triton: rope and its layer's two cache writes become one rope_cache_write."""
    index = {n.name: i for i, n in enumerate(g.nodes)}
    owners = {s.name: s.owner for s in g.state}
    writes = [n for n in g.nodes if n.op is Op.KV_CACHE_WRITE]
    fusions = []
    for rope in (n for n in g.nodes if n.op is Op.ROPE):
        kw = _only_user(g, rope.results[1].name)
        if kw is None or kw.op is not Op.KV_CACHE_WRITE or kw.inputs[1] != rope.results[1].name:
            continue
        owner = owners.get(kw.inputs[0])
        vws = [w for w in writes if w is not kw and owner and owners.get(w.inputs[0]) == owner
               and w.inputs[2] == kw.inputs[2] == rope.inputs[2] and index.get(w.inputs[1], -1) < index[rope.name]]
        if len(vws) != 1:
            continue
        vw = vws[0]
        # the new cache versions move to rope's place: nothing may read them before it
        if any(index[u.name] < index[rope.name] for w in (kw, vw) for u in _node_users(g, w.results[0].name)):
            continue
        fusions.append(Fusion(rope.name, frozenset({rope.name, kw.name, vw.name}), Op.ROPE_CACHE_WRITE,
                              (*rope.inputs[:2], vw.inputs[1], rope.inputs[2], kw.inputs[0], vw.inputs[0]),
                              dict(rope.attrs), (rope.results[0].name, kw.results[0].name, vw.results[0].name),
                              merge_sources(rope, kw, vw)))
    return apply_fusions(g, fusions), len(fusions)


# ---- the route's norm -------------------------------------------------------------------------------------------
def _first_route(g: Graph, value: str, index: dict) -> Node | None:
    """The moe_route that is ``value``'s first user and routes it (its tokens input), or None."""
    users = _node_users(g, value)
    first = min(users, key=lambda u: index[u.name]) if users else None
    return first if first is not None and first.op is Op.MOE_ROUTE and first.inputs[0] == value else None


def _route_norm(g: Graph, norm: Node, index: dict) -> Fusion | None:
    out, eps = norm.results[0].name, norm.attr("eps")
    route = _first_route(g, out, index)
    if route is not None:
        return Fusion(route.name, frozenset({norm.name, route.name}), Op.RMS_NORM_MOE_ROUTE,
                      (norm.inputs[0], norm.inputs[1], *route.inputs[1:]), dict(route.attrs, eps=eps),
                      (out, *route.result_names), merge_sources(norm, route))
    # a traced MoE block flattens the tokens first: norm -> reshape [T, H] -> route. The fused node normalises the
    # flattened input and yields the flattened rows; the norm's other users, all after the route, read them
    # reshaped back.
    t = norm.results[0].type
    for view in (u for u in _node_users(g, out) if u.op is Op.RESHAPE):
        route = _first_route(g, view.name, index)
        others = [u for u in _node_users(g, out) if u is not view]
        flat = view.results[0].type
        if route is None or flat.shape[-1] != t.shape[-1] or any(index[u.name] < index[route.name] for u in others):
            continue
        pre = f"{view.name}.in"
        if pre in g.types:
            continue
        back = ((Op.RESHAPE, (view.name,), {"shape": list(t.shape)}, out),) if others else ()
        return Fusion(route.name, frozenset({norm.name, view.name, route.name}), Op.RMS_NORM_MOE_ROUTE,
                      (pre, norm.inputs[1], *route.inputs[1:]), dict(route.attrs, eps=eps),
                      (view.name, *route.result_names), merge_sources(norm, view, route),
                      pre=((Op.RESHAPE, (norm.inputs[0],), view.attrs, pre),), post=back)
    return None


@Pass
def fuse_route_norm(g: Graph) -> tuple:
    """Triton: an rms_norm routed first by a moe_route becomes one rms_norm_moe_route."""
    index = {n.name: i for i, n in enumerate(g.nodes)}
    returned = set(g.outputs) | set(g.state_outputs)
    fusions = []
    for norm in (n for n in g.nodes if n.op is Op.RMS_NORM):
        if norm.results[0].name in returned or g.type_of(norm.inputs[1]).dtype != norm.results[0].type.dtype:
            continue
        fusion = _route_norm(g, norm, index)
        if fusion is not None:
            fusions.append(fusion)
    return apply_fusions(g, fusions), len(fusions)


# ---- element-wise chains ------------------------------------------------------------------------------------------
@Pass
def fuse_ew_chains(g: Graph) -> tuple:
    """Triton: single-use chains of float element-wise nodes become ew_chain nodes carrying their body."""
    ew = {n.name: n for n in g.nodes if n.op in ELEMENTWISE and n.results[0].type.dtype.is_float}
    returned = set(g.outputs) | set(g.state_outputs)
    inner = {name for name in ew if name not in returned and g.use_count(name) == 1
             and g.users[name][0].name in ew}
    index = {n.name: i for i, n in enumerate(g.nodes)}
    fusions = []
    for root in (n for name, n in ew.items() if name not in inner):
        members, stack = [], [root]
        while stack:
            n = stack.pop()
            members.append(n)
            stack += [ew[v] for v in n.args if v in inner]
        members.sort(key=lambda n: index[n.name])
        names = {m.name for m in members}
        inputs = tuple(dict.fromkeys(v for m in members for v in m.args if v not in names))
        fusions.append(Fusion(root.name, frozenset(names), Op.EW_CHAIN, inputs,
                              {"body": from_nodes(members, list(inputs))}, (root.results[0].name,),
                              merge_sources(*members)))
    return apply_fusions(g, fusions), len(fusions)
