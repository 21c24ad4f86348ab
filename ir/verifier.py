"""The verifier: every node against the op table, SSA order, and state linearity.

State linearity is what makes aliasing a state output to its input buffer sound: every version of a state is
consumed by at most one writer, nothing reads a version after a writer consumed it, each returned state is the
last version of its own chain, and every state is returned.
"""

from __future__ import annotations

import re

from lowerlm.ir.body import Apply
from lowerlm.ir.dtypes import DType
from lowerlm.ir.errors import ShapeError, VerifyError
from lowerlm.ir.graph import Graph, Module, Node, infer_types
from lowerlm.ir.opdefs import OPDEFS, REQUIRED, AttrKind
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import dim_bounds, is_dim
from lowerlm.ir.types import STATE_KINDS, TensorType
from lowerlm.ir.weights import WeightExpr, weight_type

_NAME = re.compile(r"[A-Za-z0-9_.]+")
_GRAPH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")  # the parser's IDENT


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KIND_CHECK = {
    AttrKind.INT: _is_int,
    AttrKind.FLOAT: _is_number,
    AttrKind.BOOL: lambda v: isinstance(v, bool),
    AttrKind.STR: lambda v: isinstance(v, str),
    AttrKind.DTYPE: lambda v: isinstance(v, DType),
    AttrKind.INTS: lambda v: isinstance(v, tuple) and all(map(_is_int, v)),
    AttrKind.FLOATS: lambda v: isinstance(v, tuple) and all(map(_is_number, v)),
    AttrKind.DIM: is_dim,
    AttrKind.DIMS: lambda v: isinstance(v, tuple) and all(map(is_dim, v)),
    AttrKind.NUMBERS: lambda v: _is_number(v) or isinstance(v, tuple) and all(map(_is_number, v)),
    AttrKind.EXPR: lambda v: isinstance(v, WeightExpr.__args__),
    AttrKind.BODY: lambda v: isinstance(v, Apply),
}


def check_node(node: Node, in_types: list, params: dict | None = None) -> None:
    """Arity, attributes and result types of one node; raises VerifyError (ShapeError for types)."""
    d = OPDEFS.get(node.op)
    if d is None:
        raise VerifyError(f"op {node.op} is not in the op table")
    n_spec = len(d.inputs)
    if d.variadic:
        if len(node.inputs) < n_spec:
            raise VerifyError(f"{node.op} takes at least {n_spec} operands, got {len(node.inputs)}")
    elif len(node.inputs) != n_spec:
        # more operands than declared slots: the text form could not name the extra ones
        at_most = "at most " if any(s.optional for s in d.inputs) else ""
        raise VerifyError(f"{node.op} takes {at_most}{n_spec} operands, got {len(node.inputs)}")
    for i, v in enumerate(node.inputs):
        spec = d.inputs[min(i, n_spec - 1)]
        if v is None and not spec.optional:
            raise VerifyError(f"{node.op} operand '{spec.name}' is missing")
    for name, value in node.attrs.items():
        if name not in d.attrs:
            raise VerifyError(f"{node.op} has no attribute '{name}' (it takes: {', '.join(d.attrs) or 'none'})")
        spec = d.attrs[name]
        if not _KIND_CHECK[spec.kind](value):
            raise VerifyError(f"{node.op} attribute '{name}' must be {spec.kind.value}, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise VerifyError(f"{node.op} attribute '{name}' must be one of {list(spec.choices)}, got {value!r}")
    for name, spec in d.attrs.items():
        if spec.default is REQUIRED and name not in node.attrs:
            raise VerifyError(f"{node.op} needs attribute '{name}'")
    if not node.results:
        raise VerifyError(f"{node.op} has no results")
    declared = [r.type for r in node.results]
    if node.op is Op.PARAM:
        inferred = [params[node.attrs["name"]]] if params is not None and node.attrs["name"] in params else None
        if params is not None and inferred is None:
            raise VerifyError(f"param '{node.attrs['name']}' is not in the weight table")
    elif node.op is Op.WEIGHT:
        inferred = [weight_type(node.attrs["expr"], params)] if params is not None else None
    else:
        inferred = infer_types(node.op, in_types, node.attrs)
    if inferred is not None and list(inferred) != declared:
        raise ShapeError(f"{node.op} yields {', '.join(map(str, inferred))} but the node declares "
                         f"{', '.join(map(str, declared))}")


def check_type(t: TensorType) -> None:
    """A declared type's dimensions: none negative, as a constant or for every value of its symbols (``S-S-1``
    is ``-1``; ``-S-1`` is negative for any ``S >= 0``). Raises ShapeError. A 0 dimension is allowed: torch has
    empty tensors and the frontend emits them (a slice clamped to ``x[..., n:]`` with ``n`` the full width)."""
    for d in t.shape:
        if not is_dim(d):
            raise ShapeError(f"type {t} has a dimension that is not an int or a symbolic expression: {d!r}")
        if dim_bounds(d)[1] < 0:
            raise ShapeError(f"type {t} has a negative dimension {d}")


class _GraphCheck:
    """The walk ``verify_graph`` makes: values defined so far and their types, and the state chains (each version
    maps to the index of the state it descends from; a consumed version to the node that overwrote it)."""

    def __init__(self, g: Graph, params: dict | None):
        self.g, self.params = g, params
        self.defined: dict = {}
        self.chain: dict = {}
        self.consumed: dict = {}

    def fail(self, msg: str, where: str):
        raise VerifyError(msg, self.g.name, where)

    def define(self, name: str, type_, where: str) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            self.fail(f"bad value name '%{name}'", where)
        if name in self.defined:
            self.fail(f"%{name} is defined twice", where)
        self.check_declared(name, type_, where)
        self.defined[name] = type_

    def check_declared(self, name: str, type_, where: str) -> None:
        try:
            check_type(type_)
        except ShapeError as e:
            raise ShapeError(f"%{name}: {e}", self.g.name, where) from None

    def node(self, node: Node) -> None:
        where = "%" + node.name if node.results else str(node.op)
        writes = OPDEFS[node.op].writes if node.op in OPDEFS else {}
        for slot, v in enumerate(node.inputs):
            if v is None:
                continue
            if v not in self.defined:
                self.fail(f"%{v} is used before it is defined", where)
            if v in self.consumed:
                verb = "written twice: already" if slot in writes else "read after"
                self.fail(f"state version %{v} is {verb} overwritten by {self.consumed[v]}", where)
        if not all(isinstance(p, str) for p in node.source):
            self.fail(f"source paths must be strings, got {node.source!r}", where)
        for r in node.results:  # before the rule: a declared negative dimension is the clearer message
            self.check_declared(r.name, r.type, where)
        in_types = [self.defined[v] if v is not None else None for v in node.inputs]
        try:
            check_node(node, in_types, self.params)
        except VerifyError as e:
            raise type(e)(str(e), self.g.name, where) from None
        for slot, result in writes.items():
            old = node.inputs[slot]
            if old not in self.chain:
                self.fail(f"{node.op} writes %{old}, which is not a state version", where)
            root = self.g.state[self.chain[old]]
            kind = OPDEFS[node.op].state
            if kind and root.kind != kind:
                self.fail(f"{node.op} writes {kind} state, but %{old} descends from %{root.name}, declared "
                          f"{root.kind}", where)
            self.consumed[old] = where
            self.chain[node.results[result].name] = self.chain[old]
        for r in node.results:
            self.define(r.name, r.type, where)

    def returns(self) -> None:
        g, chain = self.g, self.chain
        for o in g.outputs:
            if o not in self.defined:
                self.fail(f"output %{o} is not defined", "return")
        if len(g.state_outputs) != len(g.state):
            self.fail(f"{len(g.state)} states declared but {len(g.state_outputs)} returned: every state must be "
                      "returned in declaration order", "return")
        for i, (s, o) in enumerate(zip(g.state, g.state_outputs)):
            if o not in chain or chain[o] != i:
                self.fail(f"returned state {i} (%{o}) does not descend from state %{s.name}", "return")
            if o in self.consumed:
                self.fail(f"returned state %{o} was overwritten by {self.consumed[o]}; return the last version",
                          "return")
        for o in g.outputs:
            if o in chain:
                self.fail(f"state version %{o} returned as a plain output", "return")


def verify_graph(g: Graph, params: dict | None = None) -> Graph:
    """Check ``g``; return it unchanged or raise VerifyError naming the graph and the node."""
    if not isinstance(g.name, str) or not _GRAPH_NAME.fullmatch(g.name):
        raise VerifyError(f"bad graph name {g.name!r}: the text form needs [A-Za-z_][A-Za-z0-9_.]*")
    check = _GraphCheck(g, params)
    for v in g.inputs:
        check.define(v.name, v.type, "inputs")
    for i, s in enumerate(g.state):
        if s.kind not in STATE_KINDS:
            check.fail(f"state %{s.name} has kind {s.kind!r}; kinds are {', '.join(STATE_KINDS)}", "state")
        check.define(s.name, s.type, "state")
        check.chain[s.name] = i
    for node in g.nodes:
        check.node(node)
    check.returns()
    return g


def verify_module(m: Module) -> Module:
    """Verify every graph against the module's weight table, and that graphs agree on shared state."""
    if not m.graphs:
        raise VerifyError("module has no graph (empty IR text?)")
    params = m.param_types
    for name, t in m.params:
        try:
            check_type(t)
        except ShapeError as e:
            raise ShapeError(f"param '{name}': {e}") from None
    names = [g.name for g in m.graphs]
    if len(set(names)) != len(names):
        raise VerifyError(f"graph names repeat: {names}")
    seen: dict = {}
    for g in m.graphs:
        verify_graph(g, params)
        for s in g.state:
            if s.name in seen and seen[s.name] != s:
                raise VerifyError(f"state %{s.name} is declared differently in two graphs", g.name, "state")
            seen[s.name] = s
    return m
