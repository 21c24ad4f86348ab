"""fuse_swiglu: ``act(gate) * up`` (SiLU, exact GeLU, tanh-GeLU) becomes the ``act`` epilogue of the
``rms_norm_linear`` that produced gate and up, or a standalone ``swiglu`` op when no such norm precedes.

Why: the gated MLP's elementwise product then never goes through memory twice (decode: one kernel from x to the
down projection's input). Runs after fuse_rmsnorm_linear. Never touches an arm_mlp, which has its own activation
and mask. Does not fire when gate, act(gate) or up has another user, or when the product broadcasts.
"""

from __future__ import annotations

from lowerlm.ir.graph import Graph, GraphBuilder, Node
from lowerlm.ir.ops import Op
from lowerlm.passes.pattern import merge_sources, record_rewrites


def _act(node: Node | None) -> str | None:
    if node is None:
        return None
    if node.op is Op.SILU:
        return "silu"
    if node.op is Op.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}[node.attr("approximate")]
    return None


def _match(g: Graph, mul: Node):
    """(act node, act name, gate, up) for ``mul(act(gate), up)`` in either order."""
    if g.type_of(mul.inputs[0]) != g.type_of(mul.inputs[1]):
        return None
    for a, up in (mul.inputs, mul.inputs[::-1]):
        act_node = g.producer(a)
        act = _act(act_node)
        if act is None or g.use_count(a) != 1 or g.use_count(up) != 1:
            continue
        gate = act_node.inputs[0]
        if g.use_count(gate) != 1 or g.type_of(gate) != g.type_of(up):
            continue
        return act_node, act, gate, up
    return None


def _epilogue_target(g: Graph, gate: str, up: str) -> Node | None:
    """The rms_norm_linear yielding exactly (gate, up[, residual]) with no activation yet."""
    node = g.producer(gate)
    if node is None or node.op is not Op.RMS_NORM_LINEAR or node.attr("act") != "none":
        return None
    names = node.result_names
    if len(node.attr("splits")) != 2 or names[:2] != (gate, up):
        return None
    return node


def fuse_swiglu(g: Graph) -> Graph:
    """Gated activations become an rms_norm_linear epilogue or a swiglu op."""
    epilogue: dict = {}  # rms_norm_linear name -> (act, mul node, act node)
    standalone: dict = {}  # mul name -> (act, gate, up, act node)
    for node in g.nodes:
        if node.op is not Op.MUL:
            continue
        m = _match(g, node)
        if m is None:
            continue
        act_node, act, gate, up = m
        target = _epilogue_target(g, gate, up)
        if target is not None:
            epilogue[target.name] = (act, node, act_node)
        else:
            standalone[node.name] = (act, gate, up, act_node)
    if not epilogue and not standalone:
        return g
    # the matched act and mul nodes disappear: the product is defined by the fused op, under the mul's name
    skip = {n.name for _, mul, act_node in epilogue.values() for n in (mul, act_node)}
    skip |= {act_node.name for *_, act_node in standalone.values()}
    b = GraphBuilder.rebuild(g)
    for node in g.nodes:
        if node.name in skip:
            continue
        if node.name in epilogue:
            act, mul, act_node = epilogue[node.name]
            names = [mul.name] + list(node.result_names[2:])  # the product, then the residual if any
            b.release(names)
            b.add(Op.RMS_NORM_LINEAR, node.inputs, dict(node.attrs, act=act), names=names,
                  source=merge_sources(node, act_node, mul))
        elif node.name in standalone:
            act, gate, up, act_node = standalone[node.name]
            b.release([node.name])
            b.add(Op.SWIGLU, [gate, up], {"act": act}, names=[node.name], source=merge_sources(act_node, node))
        else:
            b.append(node)
            continue
        record_rewrites()
    return b.build(g.outputs, g.state_outputs)
