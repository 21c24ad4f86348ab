"""raise_moe_route: a traced router whose ops compute exactly one of ``moe_route``'s routers becomes that op, feeding
the ``experts`` op it routed. The three routers it knows (docs/models.md):

  softmax   %l = linear(%x, %W)  (or of x and W cast to f32: router_f32)   [%l = cast(%l) {dtype=f32}]
            %p = softmax(%l)  %v, %i = topk(%p) {k}   [%v = div(%v, sum(%v) {keepdim})]   [%v = mul(%v, c)]
            [%v = cast(%v) {dtype=x's}]
  sigmoid   [%l = cast(%l) {dtype=f32}]  %s = sigmoid(%l)  %c = %s [+ bias]
            [the group mask: reshape %c to [T, G, E/G], sum of each group's top 2, the topk_group best groups
            scattered into a mask, %c = where(mask == 0, -inf, %c)]   %v, %i = topk(%c) {k}
            %v = gather(%s, %i)   [div(%v, sum(%v) {keepdim} [+ eps])]   [mul(%v, c)]   [cast]

  topk_softmax  %l = linear(%x, %W) [cast f32]   %v, %i = topk(%l) {k}   [%v = cast(%v) {dtype=f32}]
            %v = softmax(%v)   [renormalise, scaling, cast as softmax's]

become ``%ids, %w = moe_route(%x, %W, %bias) {router, top_k, n_group, topk_group, renormalize, scaling,
router_f32, weights_f32}`` and the ``experts`` op reads them. Anything else -- another normalisation, a mask that
fills 0 rather than -inf, weights taken before the bias, a bf16 softmax -- does not match, and the router stays as
the plain ops it was imported as: correct, only slower.

Why: ``moe_route`` is one launch (fused with the layer's norm on Triton by fuse_route_norm) where the plain router
is a dozen, and ``dump-ir`` names the router kind. Runs after canonicalize and before the fusions (which would fold
the router's linear into a norm). The router ops it replaced are dropped when nothing else reads them.
"""

from __future__ import annotations

import math

from lowerlm.ir.graph import Graph, Node
from lowerlm.ir.ops import Op
from lowerlm.ir.types import DType
from lowerlm.passes.canonicalize import dce
from lowerlm.passes.pattern import Pass, Pat, RewriteContext, rewrite


class _NoMatch(Exception):
    pass


def _need(cond: bool):
    if not cond:
        raise _NoMatch


class _Walk:
    """Reads the graph upwards from a value, raising _NoMatch at the first thing that is not the expected form."""

    def __init__(self, ctx: RewriteContext):
        self.ctx = ctx

    def node(self, v: str | None, op: Op) -> Node:
        n = self.ctx.producer(v) if v is not None else None
        _need(n is not None and n.op == op)
        return n

    def maybe(self, v: str, op: Op) -> Node | None:
        n = self.ctx.producer(v)
        return n if n is not None and n.op == op else None

    def type(self, v: str):
        return self.ctx.type_of(v)

    def last(self, n: Node, attr: str = "dim") -> bool:
        """The node's dim attribute names its input's last axis."""
        rank = self.type(n.args[0]).rank
        return n.attr(attr) % rank == rank - 1

    def scalar(self, v: str) -> float:
        """The one value of a constant, possibly broadcast (expand) to a shape."""
        n = self.ctx.producer(v)
        if n is not None and n.op == Op.EXPAND:
            n = self.ctx.producer(n.args[0])
        _need(n is not None and n.op == Op.CONSTANT and not isinstance(n.attrs["value"], tuple))
        return float(n.attrs["value"])

    def base(self, v: str) -> str:
        """The value under any reshapes."""
        while (n := self.maybe(v, Op.RESHAPE)) is not None:
            v = n.args[0]
        return v

    def topk(self, v: str, result: int) -> Node:
        """The largest-k topk along the last axis whose ``result`` (0 values, 1 indices) is v."""
        n = self.node(v, Op.TOPK)
        _need(n.result_names[result] == v and n.attr("largest") and self.last(n))
        return n

    def weights_tail(self, w: str, x_dtype) -> tuple:
        """Strip the optional cast and scaling off the routing weights: (value below, scaling, weights_f32)."""
        weights_f32 = True
        if (cast := self.maybe(w, Op.CAST)) is not None:
            _need(self.type(w).dtype == x_dtype and self.type(cast.args[0]).dtype == DType.F32)
            weights_f32, w = x_dtype == DType.F32, cast.args[0]
        _need(self.type(w).dtype == DType.F32)
        scaling = 1.0
        if (mul := self.maybe(w, Op.MUL)) is not None:
            a, b = mul.args
            try:
                scaling, w = self.scalar(b), a
            except _NoMatch:
                scaling, w = self.scalar(a), b
            _need(self.type(w) == self.type(mul.result_names[0]))
        return w, scaling, weights_f32

    def renormalised(self, w: str, eps: bool) -> tuple:
        """``div(v, sum(v) {keepdim} [+ a constant, if eps])``: (v, True, the constant or 0.0); anything else
        (w, False, 0.0)."""
        div = self.maybe(w, Op.DIV)
        if div is None:
            return w, False, 0.0
        v, denom = div.args
        value = 0.0
        if eps and (add := self.maybe(denom, Op.ADD)) is not None:
            value, denom = self.scalar(add.args[1]), add.args[0]
            _need(value > 0)
        total = self.node(denom, Op.SUM)
        _need(total.args[0] == v and total.attr("keepdim") and len(total.attr("dims")) == 1
              and total.attr("dims")[0] % self.type(v).rank == self.type(v).rank - 1)
        return v, True, value

    def logits(self, v: str, x: str) -> tuple:
        """The router's linear on (a view of) x: (weight value, router_f32)."""
        lin = self.node(v, Op.LINEAR)
        _need(len(lin.args) == 2)
        xi, wi = lin.args
        router_f32 = False
        if (cx := self.maybe(xi, Op.CAST)) is not None and self.type(xi).dtype == DType.F32:
            xi, router_f32 = cx.args[0], True
            if (cw := self.maybe(wi, Op.CAST)) is not None:
                wi = cw.args[0]
        x_type, r_type = self.type(x), self.type(xi)
        _need(self.base(xi) == self.base(x) and r_type.shape[-1] == x_type.shape[-1] and r_type.dtype == x_type.dtype)
        if not router_f32:
            _need(self.type(wi).dtype == x_type.dtype)
        return wi, router_f32


def _softmax(m: _Walk, x: str, ids: str, w: str) -> tuple:
    top = m.topk(ids, 1)
    v, scaling, weights_f32 = m.weights_tail(w, m.type(x).dtype)
    v, renormalize, _ = m.renormalised(v, False)
    _need(v == top.result_names[0])
    sm = m.node(top.args[0], Op.SOFTMAX)
    _need(m.last(sm) and m.type(sm.args[0]).dtype == DType.F32)
    logits = sm.args[0]
    if (cast := m.maybe(logits, Op.CAST)) is not None:
        logits = cast.args[0]
    weight, router_f32 = m.logits(logits, x)
    attrs = {"router": "softmax", "top_k": top.attr("k"), "renormalize": renormalize, "scaling": scaling,
             "router_f32": router_f32, "weights_f32": weights_f32}
    return weight, None, attrs


def _topk_softmax(m: _Walk, x: str, ids: str, w: str) -> tuple:
    top = m.topk(ids, 1)
    v, scaling, weights_f32 = m.weights_tail(w, m.type(x).dtype)
    v, renormalize, _ = m.renormalised(v, False)
    sm = m.node(v, Op.SOFTMAX)
    _need(m.last(sm) and m.type(v).dtype == DType.F32)
    values = sm.args[0]
    if (cast := m.maybe(values, Op.CAST)) is not None:  # softmax(dtype=float) of the chosen logits
        values = cast.args[0]
    _need(values == top.result_names[0])
    logits = top.args[0]
    if (cast := m.maybe(logits, Op.CAST)) is not None:  # the logits made f32 before the choice: same order
        logits = cast.args[0]
    weight, router_f32 = m.logits(logits, x)
    attrs = {"router": "topk_softmax", "top_k": top.attr("k"), "renormalize": renormalize, "scaling": scaling,
             "router_f32": router_f32, "weights_f32": weights_f32}
    return weight, None, attrs


def _group_mask(m: _Walk, masked: str, choice: str) -> tuple:
    """``where(mask == 0, -inf, choice)`` with DeepSeek-V3's group mask: (n_group, topk_group)."""
    where = m.node(masked, Op.WHERE)
    cond, fill, kept = where.args
    _need(kept == choice and m.scalar(fill) == -math.inf)
    cmp = m.node(cond, Op.COMPARE)
    _need(cmp.attr("pred") == "eq" and m.scalar(cmp.args[1]) == 0)
    mask = cmp.args[0]
    if (cast := m.maybe(mask, Op.CAST)) is not None:
        mask = cast.args[0]
    t, e = m.type(choice).shape[:-1], m.type(choice).shape[-1]
    flat = m.node(mask, Op.RESHAPE)  # [T, G, E/G] -> [T, E]
    _need(m.type(mask).shape == m.type(choice).shape)
    wide = m.node(flat.args[0], Op.EXPAND)  # [T, G, 1] -> [T, G, E/G]
    col = m.node(wide.args[0], Op.RESHAPE)  # [T, G] -> [T, G, 1]
    chosen = m.node(col.args[0], Op.SCATTER)  # zeros [T, G] with ones at the kept groups
    groups = m.type(chosen.result_names[0]).shape
    _need(len(groups) == len(t) + 1 and groups[:-1] == t and isinstance(groups[-1], int) and isinstance(e, int))
    n_group = groups[-1]
    _need(n_group >= 1 and e % n_group == 0)
    _need(m.type(col.result_names[0]).shape == (*t, n_group, 1)
          and m.type(wide.result_names[0]).shape == (*t, n_group, e // n_group))
    zeros, keep, ones = chosen.args
    _need(m.last(chosen) and m.scalar(zeros) == 0 and m.scalar(ones) == 1)
    best = m.topk(keep, 1)  # the topk_group best groups
    score = m.node(best.args[0], Op.SUM)  # each group's top 2, summed
    _need(tuple(d % (len(t) + 2) for d in score.attr("dims")) == (len(t) + 1,) and not score.attr("keepdim"))
    top2 = m.topk(score.args[0], 0)
    _need(top2.attr("k") == 2)
    view = m.node(top2.args[0], Op.RESHAPE)
    _need(view.args[0] == choice and m.type(view.result_names[0]).shape == (*t, n_group, e // n_group))
    return n_group, best.attr("k")


def _sigmoid(m: _Walk, x: str, ids: str, w: str) -> tuple:
    top = m.topk(ids, 1)
    v, scaling, weights_f32 = m.weights_tail(w, m.type(x).dtype)
    v, renormalize, eps = m.renormalised(v, True)
    gather = m.node(v, Op.GATHER)
    scores, index = gather.args
    _need(index == ids and m.last(gather))
    sig = m.node(scores, Op.SIGMOID)
    _need(m.type(scores).dtype == DType.F32)
    logits = sig.args[0]
    if (cast := m.maybe(logits, Op.CAST)) is not None:
        logits = cast.args[0]
    # what topk chose from: the scores, plus the correction bias, maybe under the group mask
    n_group, topk_group, choice = 1, 1, top.args[0]
    if m.maybe(choice, Op.WHERE) is not None:
        masked = choice
        choice = m.ctx.producer(masked).args[2]
        n_group, topk_group = _group_mask(m, masked, choice)
    bias = None
    if choice != scores:
        add = m.node(choice, Op.ADD)
        _need(scores in add.args)
        bias = add.args[1] if add.args[0] == scores else add.args[0]
        _need(m.type(bias).shape == (m.type(scores).shape[-1],) and m.type(choice) == m.type(scores))
        if (cast := m.maybe(bias, Op.CAST)) is not None:
            bias = cast.args[0]
    weight, router_f32 = m.logits(logits, x)
    attrs = {"router": "sigmoid", "top_k": top.attr("k"), "n_group": n_group, "topk_group": topk_group,
             "renormalize": renormalize, "scaling": scaling, "router_f32": router_f32, "weights_f32": weights_f32,
             **({"renorm_eps": eps} if renormalize and eps != 1e-20 else {})}
    return weight, bias, attrs


ROUTERS = (_softmax, _topk_softmax, _sigmoid)


def _raise(ctx: RewriteContext, root: Node):
    x, ids, w, gate_up, down, *biases = root.inputs
    m = _Walk(ctx)
    for router in ROUTERS:
        try:
            weight, bias, attrs = router(m, x, ids, w)
        except _NoMatch:
            continue
        if m.type(x).rank < 1 or ctx.type_of(weight).shape != (ctx.type_of(gate_up).shape[0], m.type(x).shape[-1]):
            continue
        # the weights keep their dtype: weights_tail read weights_f32 off it
        ids2, w2 = ctx.add(Op.MOE_ROUTE, [x, weight, bias], attrs, names=[f"{root.name}.ids", f"{root.name}.weights"],
                           source=ctx.producer(ids).source)
        return ctx.add(Op.EXPERTS, [x, ids2, w2, gate_up, down, *biases], root.attrs)
    return None


def _unraised(ctx, root) -> bool:
    """An experts op whose ids moe_route does not already make."""
    p = ctx.producer(root.inputs[1])
    return p is None or p.op != Op.MOE_ROUTE


RULES = [(Pat(Op.EXPERTS, name="root", where=_unraised), _raise)]


@Pass
def raise_moe_route(g: Graph) -> tuple:
    """Traced routers that compute moe_route's softmax or sigmoid-group routing become moe_route."""
    g, n = rewrite(g, RULES, name="raise_moe_route")
    return (dce(g)[0] if n else g), n
