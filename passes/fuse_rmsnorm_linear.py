"""fuse_rmsnorm_linear: an ``rms_norm`` whose every user is a projection of it (q, k, v; gate, up; the final norm
and lm_head) becomes one ``rms_norm_linear`` with the projections' weights concatenated (a weight expression)
and one result per projection: x is read once and normalised in the matmul's prologue.

When the norm's input is a bare residual add (its producer was not a projection that took the add as an
epilogue — after a MoE combine, say), the add moves inside: ``rms_norm_linear(a, w, W, residual=b)`` also
yields ``a + b``, the new residual stream, for the add's other users (the add + RMSNorm fusion serving engines do).
Runs after fuse_linear_residual and before fuse_swiglu. Does not fire when the normalised value has a user that is
not a projection of it, when a projection has a residual epilogue, or when a weight is computed at run time.
"""

from __future__ import annotations

from lowerlm.ir.graph import Graph, GraphBuilder, Node
from lowerlm.ir.ops import WEIGHT_LEAF, Op
from lowerlm.ir.weights import Concat, Param
from lowerlm.passes.canonicalize import dce
from lowerlm.passes.pattern import Pass, merge_sources


def weight_expr(g: Graph, value: str):
    """The weight expression a value holds, or None when it is computed at run time. ``g``: a graph, or a rule's
    context (anything with ``producer``)."""
    node = g.producer(value)
    if node is None or node.op not in WEIGHT_LEAF:
        return None
    return Param(node.attrs["name"]) if node.op is Op.PARAM else node.attrs["expr"]


def weight_value(b: GraphBuilder, g: Graph, values: list, name: str, source) -> str:
    """One weight value for the concatenation of ``values`` (the value itself when there is one). ``b`` adds the
    node (a builder, or a rule's context), ``g`` knows the values (a graph, or a rule's context)."""
    if len(values) == 1:
        return values[0]
    expr = Concat(tuple(weight_expr(g, v) for v in values), 0)
    first = g.type_of(values[0])
    rows = sum(g.type_of(v).shape[0] for v in values)
    return b.add(Op.WEIGHT, [], {"expr": expr}, types=[first.with_shape((rows,) + first.shape[1:])], name=name,
                 source=source)


def _projections(g: Graph, norm: Node):
    """The linear users of a norm's result when every user is one, else None."""
    out = norm.name
    if out in g.outputs:
        return None
    users = g.users.get(out, [])
    if not users or any(u.op is not Op.LINEAR or u.inputs[0] != out or u.inputs[3] is not None or
                        u.inputs[1] == out or u.inputs[2] == out for u in users):
        return None
    if any(weight_expr(g, u.inputs[1]) is None for u in users):
        return None
    biases = [u.inputs[2] for u in users]
    if any(b is not None for b in biases) and any(b is None or weight_expr(g, b) is None for b in biases):
        return None
    return users


def _residual_add(g: Graph, norm: Node):
    """(a, b) when the norm reads a bare add of two values of its own type."""
    add = g.producer(norm.inputs[0])
    if add is None or add.op is not Op.ADD:
        return None
    a, b = add.inputs
    t = g.type_of(add.name)
    return (add, a, b) if g.type_of(a) == t and g.type_of(b) == t else None


@Pass
def fuse_rmsnorm_linear(g: Graph) -> tuple:
    """Norms feeding only projections become rms_norm_linear."""
    plans = {}
    for node in g.nodes:
        if node.op is Op.RMS_NORM:
            users = _projections(g, node)
            if users is not None:
                plans[node.name] = (node, users)
    if not plans:
        return g, 0
    dropped = {u.name for _, users in plans.values() for u in users}
    b = GraphBuilder.rebuild(g)
    subst: dict = {}
    for node in g.nodes:
        node = node.with_(inputs=tuple(subst.get(i, i) if i is not None else None for i in node.inputs))
        if node.name in dropped:
            continue
        if node.name not in plans:
            b.append(node)
            continue
        norm, users = plans[node.name]
        x, norm_w = node.inputs
        source = merge_sources(norm, *users)
        w = weight_value(b, g, [u.inputs[1] for u in users], f"{users[0].name}.w", source)
        bias = None
        if users[0].inputs[2] is not None:
            bias = weight_value(b, g, [u.inputs[2] for u in users], f"{users[0].name}.b", source)
        inputs = [x, norm_w, w, bias, None]
        names = [u.name for u in users]
        residual = _residual_add(g, node)
        if residual is not None:
            add, first, second = residual
            inputs[0], inputs[4] = first, second
            names.append(add.name + ".r")
        b.release([u.name for u in users])
        results = b.add(Op.RMS_NORM_LINEAR, inputs, {"eps": norm.attr("eps"),
                                                     "splits": [g.type_of(u.name).shape[-1] for u in users]},
                        source=source if residual is None else merge_sources(residual[0], norm, *users),
                        names=names)
        results = (results,) if isinstance(results, str) else results
        if residual is not None:
            subst[residual[0].name] = results[-1]
    out = b.build([subst.get(o, o) for o in g.outputs], [subst.get(o, o) for o in g.state_outputs])
    # the fused op sits where the norm was; a weight it reads directly may be defined further down (the
    # importer emits params at their first use): reorder so definitions come first
    from lowerlm.ir.nx import topological_order  # networkx only when the pass fires

    return dce(topological_order(out))[0], len(plans)
