"""specialize: the module's ``forward`` becomes ``prefill`` (any sequence length S) and ``decode`` (S = 1).

Why: decode runs once per token, so it gets its own graph with every shape static in S (only the batch B and the
cache length T stay symbols, and the runtime fixes both): later passes and backends can plan buffers and capture
it. Prefill keeps S free. Both share the weights and the state specs. Runs after insert_state (decode without
state would be pointless) and before select_logits, which rewrites prefill only. A module already specialised is
left alone.
"""

from __future__ import annotations

from lowerlm.ir.abi import DECODE, FORWARD, PREFILL, SEQ
from lowerlm.ir.graph import Graph, Node
from lowerlm.ir.opdefs import OPDEFS, AttrKind
from lowerlm.ir.shapes import substitute
from lowerlm.ir.types import StateSpec, TensorType, Value
from lowerlm.passes.pattern import Pass


def _type(t: TensorType, env: dict) -> TensorType:
    return t.with_shape(tuple(substitute(d, env) for d in t.shape))


def _node(n: Node, env: dict) -> Node:
    spec = OPDEFS[n.op].attrs
    attrs = {}
    for k, v in n.attrs.items():
        kind = spec[k].kind if k in spec else None
        if kind is AttrKind.DIM:
            v = substitute(v, env)
        elif kind is AttrKind.DIMS:
            v = tuple(substitute(d, env) for d in v)
        attrs[k] = v
    return Node.make(n.op, n.inputs, [Value(r.name, _type(r.type, env)) for r in n.results], attrs, n.source)


def bind(g: Graph, name: str, env: dict) -> Graph:
    """A copy of ``g`` named ``name`` with shape symbols bound by ``env`` everywhere (types and attributes)."""
    return Graph(name, tuple(Value(v.name, _type(v.type, env)) for v in g.inputs),
                 tuple(StateSpec(s.name, _type(s.type, env), s.owner, s.kind) for s in g.state),
                 tuple(_node(n, env) for n in g.nodes), g.outputs, g.state_outputs)


@Pass
def specialize(g: Graph) -> tuple:
    """``forward`` → (``prefill``, ``decode``), 2 rewrites; other graphs unchanged."""
    if g.name != FORWARD:
        return g, 0
    return (g.with_(name=PREFILL), bind(g, DECODE, {SEQ: 1})), 2
