"""moe_dispatch: each captured ``moe`` op becomes the dispatch serving engines run.

    %ids, %w       = moe_route(%x, %router[, %bias])            top-k expert ids and routing weights per token
    %order, %offs  = moe_sort(%ids) {experts=E}                  (token, k) pairs sorted by expert; segment starts
    %h             = grouped_gemm(%x, %gate_up, %order, %offs) {gather=k, act}   token rows gathered, act(g)*u
    %y             = grouped_gemm(%h, %down, %order, %offs, %w)                  times each pair's routing weight
    %out           = moe_combine(%y, %order, %x) {top_k=k}       unpermute, sum each token's k rows

and, with shared experts, their SwiGLU MLP (gate|up as one linear over a concatenated weight) whose down
projection takes the routed result as its residual epilogue.

Why: each expert's weights are read once per step for all the tokens routed to it (a grouped GEMM over sorted
segments), and a decode step reads only the selected experts. Runs after the fusions (the shared expert's ops it
emits are already in their fused form) and before insert_kv_cache. Does not fire on anything but ``moe``.
"""

from __future__ import annotations

from lowerlm.ir.graph import Graph, GraphBuilder, Node
from lowerlm.ir.ops import Op
from lowerlm.passes.fuse_rmsnorm_linear import weight_expr, weight_value
from lowerlm.passes.pattern import record_rewrites

_ROUTE = ("router", "top_k", "n_group", "topk_group", "renormalize", "scaling", "router_f32", "weights_f32")


def _dispatch(b: GraphBuilder, g: Graph, node: Node) -> None:
    x, router, bias, gate_up, down, sg, su, sd = node.inputs
    a = node.all_attrs()
    k, experts = a["top_k"], g.type_of(gate_up).shape[0]
    src = node.source
    base = node.name
    ids, w = b.add(Op.MOE_ROUTE, [x, router, bias], {n: a[n] for n in _ROUTE}, names=[f"{base}.ids",
                                                                                     f"{base}.weights"],
                   source=src)
    order, offsets = b.add(Op.MOE_SORT, [ids], {"experts": experts}, names=[f"{base}.order", f"{base}.offsets"],
                           source=src)
    h = b.add(Op.GROUPED_GEMM, [x, gate_up, order, offsets], {"gather": k, "act": a["act"]}, name=f"{base}.gate_up",
              source=src)
    y = b.add(Op.GROUPED_GEMM, [h, down, order, offsets, w], {}, name=f"{base}.down", source=src)
    routed_name = base if sg is None else f"{base}.routed"
    if sg is None:
        b.release([base])
    routed = b.add(Op.MOE_COMBINE, [y, order, x], {"top_k": k}, name=routed_name, source=src)
    if sg is None:
        return
    if weight_expr(g, sg) is not None and weight_expr(g, su) is not None:
        inter = g.type_of(sg).shape[0]
        w_gu = weight_value(b, g, [sg, su], f"{base}.shared_gate_up.w", src)
        gu = b.add(Op.LINEAR, [x, w_gu], name=f"{base}.shared_gate_up", source=src)
        gate, up = b.add(Op.SPLIT, [gu], {"dim": -1, "sizes": [inter, inter]},
                         names=[f"{base}.shared_gate", f"{base}.shared_up"], source=src)
    else:  # weights computed at run time: two projections
        gate = b.add(Op.LINEAR, [x, sg], name=f"{base}.shared_gate", source=src)
        up = b.add(Op.LINEAR, [x, su], name=f"{base}.shared_up", source=src)
    act = b.add(Op.SWIGLU, [gate, up], {"act": a["act"]}, name=f"{base}.shared_act", source=src)
    b.release([base])
    b.add(Op.LINEAR, [act, sd, None, routed], name=base, source=src)


def moe_dispatch(g: Graph) -> Graph:
    """Every moe op becomes route → sort → grouped GEMMs → combine (+ shared experts)."""
    if not any(n.op is Op.MOE for n in g.nodes):
        return g
    b = GraphBuilder.rebuild(g)
    for node in g.nodes:
        if node.op is Op.MOE:
            _dispatch(b, g, node)
            record_rewrites()
        else:
            b.append(node)
    return b.build(g.outputs, g.state_outputs)
