"""moe_dispatch: each captured ``moe`` op becomes the dispatch serving engines run.

    %ids, %w       = moe_route(%x, %router[, %bias])            top-k expert ids and routing weights per token
    %order, %offs  = moe_sort(%ids) {experts=E}                  (token, k) pairs sorted by expert; segment starts
    %h             = grouped_gemm(%x, %gate_up, %order, %offs) {gather=k, act}   token rows gathered, act(g)*u
    %y             = grouped_gemm(%h, %down, %order, %offs, %w)                  times each pair's routing weight
    %out           = moe_combine(%y, %order, %x) {top_k=k}       unpermute, sum each token's k rows

and, with shared experts, their SwiGLU MLP (gate|up as one linear over a concatenated weight) whose down
projection takes the routed result as its residual epilogue. An ``experts`` op (a traced block's captured experts,
routed by whatever its router computed) becomes the same sort, grouped GEMMs and combine.

Why: each expert's weights are read once per step for all the tokens routed to it (a grouped GEMM over sorted
segments), and a decode step reads only the selected experts. Runs after the fusions (the shared expert's ops it
emits are already in their fused form) and before insert_state. Does not fire on anything but ``moe`` and
``experts``.

A rule table: one rule rooted at ``moe`` and one at ``experts``, whose functions emit the dispatch in their place
(under the op's module path).
"""

from __future__ import annotations

from lowerlm.ir.graph import Graph, Node
from lowerlm.ir.opdefs import GLU
from lowerlm.ir.ops import Op
from lowerlm.passes.fuse_rmsnorm_linear import weight_expr, weight_value
from lowerlm.passes.pattern import Pass, Pat, RewriteContext, rewrite

_ROUTE = ("router", "top_k", "n_group", "topk_group", "renormalize", "scaling", "router_f32", "weights_f32",
          "renorm_eps")


def _dispatch(ctx: RewriteContext, root: Node) -> str:
    x, router, bias, gate_up, down, sg, su, sd = root.inputs
    a = root.all_attrs()
    base = root.name
    ids, w = ctx.add(Op.MOE_ROUTE, [x, router, bias], {n: a[n] for n in _ROUTE},
                     names=[f"{base}.ids", f"{base}.weights"])
    routed = _experts(ctx, base if sg is None else f"{base}.routed", x, ids, w, gate_up, down, act=a["act"])
    if sg is None:
        return routed
    if weight_expr(ctx, sg) is not None and weight_expr(ctx, su) is not None:
        inter = ctx.type_of(sg).shape[0]
        w_gu = weight_value(ctx, ctx, [sg, su], f"{base}.shared_gate_up.w", root.source)
        gu = ctx.add(Op.LINEAR, [x, w_gu], name=f"{base}.shared_gate_up")
        gate, up = ctx.add(Op.SPLIT, [gu], {"dim": -1, "sizes": [inter, inter]},
                           names=[f"{base}.shared_gate", f"{base}.shared_up"])
    else:  # weights computed at run time: two projections
        gate = ctx.add(Op.LINEAR, [x, sg], name=f"{base}.shared_gate")
        up = ctx.add(Op.LINEAR, [x, su], name=f"{base}.shared_up")
    act = ctx.add(Op.SWIGLU, [gate, up], {"act": a["act"]}, name=f"{base}.shared_act")
    return ctx.add(Op.LINEAR, [act, sd, None, routed], name=base)


def _experts(ctx: RewriteContext, name: str, x, ids, w, gate_up, down, gate_up_bias=None, down_bias=None,
             act: str = "silu", unit=None) -> str:
    """Sort the (token, k) pairs by expert, the two grouped GEMMs (with the experts' biases, if any; the first
    with the experts' gated unit: ``unit``, the GLU attributes the experts op sets), the combine: the routed
    experts' sum."""
    k, experts, base = ctx.type_of(ids).shape[-1], ctx.type_of(gate_up).shape[0], ctx.root.name
    order, offsets = ctx.add(Op.MOE_SORT, [ids], {"experts": experts}, names=[f"{base}.order", f"{base}.offsets"])
    h = ctx.add(Op.GROUPED_GEMM, [x, gate_up, order, offsets, None, gate_up_bias],
                {"gather": k, "act": act, **(unit or {})}, name=f"{base}.gate_up")
    y = ctx.add(Op.GROUPED_GEMM, [h, down, order, offsets, w, down_bias], {}, name=f"{base}.down")
    return ctx.add(Op.MOE_COMBINE, [y, order, x], {"top_k": k}, name=name)


def _dispatch_experts(ctx: RewriteContext, root: Node) -> str:
    unit = {n: v for n, v in root.attrs.items() if n in GLU}
    return _experts(ctx, root.name, *root.inputs, act=root.attr("act"), unit=unit)


RULES = [(Pat(Op.MOE, name="root"), _dispatch), (Pat(Op.EXPERTS, name="root"), _dispatch_experts)]


@Pass
def moe_dispatch(g: Graph) -> tuple:
    """Every moe op becomes route → sort → grouped GEMMs → combine (+ shared experts); every experts op the same
    without the route."""
    return rewrite(g, RULES, name="moe_dispatch")
