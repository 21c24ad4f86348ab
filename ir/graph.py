"""Nodes, graphs and modules: the SSA IR.

A ``Module`` is named graphs sharing one weight table (``params``); graphs declare the state they use. A ``Graph``
is immutable: passes build a new one. A ``Node`` has an op, inputs (value names; ``None`` for an absent optional
input), typed attributes, one or more typed results and ``source``, the nn.Module paths it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

from lowerlm.ir.opdefs import OPDEFS, REQUIRED, AttrKind
from lowerlm.ir.ops import Op
from lowerlm.ir.types import KV, StateSpec, TensorType, Value

_NOT_NAME = re.compile(r"[^A-Za-z0-9_.]")  # what a value name cannot hold


class Attrs(Mapping):
    """An immutable, hashable mapping of attribute names to values (lists stored as tuples)."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping | Iterable = ()):
        pairs = items.items() if isinstance(items, Mapping) else items
        self._items = tuple((k, _freeze(v)) for k, v in pairs)
        self._hash = hash(self._items)

    def __getitem__(self, key):
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, Attrs) and _eq_items(self._items, other._items)

    def __repr__(self) -> str:
        return f"Attrs({dict(self._items)!r})"


def _eq_items(a: tuple, b: tuple) -> bool:
    # floats compare by bit pattern so that nan == nan and 0.0 != -0.0: attributes are data, not numbers
    return len(a) == len(b) and all(k1 == k2 and _same(v1, v2) for (k1, v1), (k2, v2) in zip(a, b))


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return repr(x) == repr(y)
    if isinstance(x, tuple) and isinstance(y, tuple):
        return len(x) == len(y) and all(_same(p, q) for p, q in zip(x, y))
    return type(x) is type(y) and x == y


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def normalize_attrs(op: Op, attrs: Mapping) -> Attrs:
    """Attributes in the op's declared order, defaults dropped, unknown names kept last (the verifier flags
    them). Ints given for float attributes become floats."""
    spec = OPDEFS[op].attrs if op in OPDEFS else {}
    out = []
    for name, s in spec.items():
        if name in attrs:
            v = _freeze(attrs[name])
            if s.kind is AttrKind.FLOAT and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if s.kind is AttrKind.FLOATS and isinstance(v, tuple):
                v = tuple(float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v)
            if s.default is not REQUIRED and _same(v, _freeze(s.default)):
                continue
            out.append((name, v))
    out += [(k, _freeze(v)) for k, v in attrs.items() if k not in spec]
    return Attrs(out)


@dataclass(frozen=True)
class Node:
    op: Op
    inputs: tuple  # value names, None for an absent optional input
    results: tuple  # Value, ...
    attrs: Attrs = field(default_factory=Attrs)
    source: tuple = ()  # nn.Module paths

    @staticmethod
    def make(op: Op, inputs: Iterable, results: Iterable, attrs: Mapping | None = None,
             source: Iterable = ()) -> Node:
        inputs = tuple(inputs)
        d = OPDEFS.get(op)
        if d is not None and not d.variadic and len(inputs) < len(d.inputs):
            inputs += (None,) * (len(d.inputs) - len(inputs))
        return Node(op, inputs, tuple(results), normalize_attrs(op, attrs or {}), tuple(source))

    @property
    def name(self) -> str:
        """The name hint: the first result's name."""
        return self.results[0].name

    @property
    def result_names(self) -> tuple:
        return tuple(r.name for r in self.results)

    @property
    def args(self) -> tuple:
        """The inputs that are present."""
        return tuple(i for i in self.inputs if i is not None)

    def attr(self, name: str):
        """The attribute's value, or its default from the op table."""
        if name in self.attrs:
            return self.attrs[name]
        default = OPDEFS[self.op].attrs[name].default
        if default is REQUIRED:
            raise KeyError(f"{self.op} has no attribute '{name}'")
        return default

    def all_attrs(self) -> dict:
        """Every declared attribute with defaults filled in (what result rules receive)."""
        spec = OPDEFS[self.op].attrs
        out = {k: s.default for k, s in spec.items() if s.default is not REQUIRED}
        out.update(self.attrs)
        return out

    def with_(self, **changes) -> Node:
        return dataclasses.replace(self, **changes)

    def __hash__(self):
        return hash((self.op, self.inputs, self.results, self.attrs, self.source))


@dataclass(frozen=True)
class Graph:
    name: str
    inputs: tuple  # Value, ...
    state: tuple  # StateSpec, ...: version 0 of each state, by name
    nodes: tuple  # Node, ...
    outputs: tuple  # value names
    state_outputs: tuple  # final version of state i, in the order of ``state``

    @functools.cached_property
    def types(self) -> dict:
        """Every value's type by name (inputs, state, results). Later definitions of a name win."""
        out = {v.name: v.type for v in self.inputs}
        out.update({s.name: s.type for s in self.state})
        for n in self.nodes:
            out.update({r.name: r.type for r in n.results})
        return out

    @functools.cached_property
    def producers(self) -> dict:
        """Node defining each result name."""
        return {r.name: n for n in self.nodes for r in n.results}

    @functools.cached_property
    def users(self) -> dict:
        """For each value name, the nodes that read it, in order."""
        out: dict = {}
        for n in self.nodes:
            for i in dict.fromkeys(n.args):
                out.setdefault(i, []).append(n)
        return out

    def type_of(self, name: str) -> TensorType:
        return self.types[name]

    def producer(self, name: str) -> Node | None:
        return self.producers.get(name)

    def use_count(self, name: str) -> int:
        return (len(self.users.get(name, ())) + self.outputs.count(name) + self.state_outputs.count(name))

    def with_(self, **changes) -> Graph:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        from lowerlm.ir.printer import print_graph

        return print_graph(self)


@dataclass(frozen=True)
class Module:
    """Named graphs sharing one weight table. ``forward`` before specialisation; ``prefill`` and ``decode``
    after."""

    graphs: tuple  # Graph, ...
    params: tuple = ()  # (name, TensorType), ... in declaration order

    @staticmethod
    def of(graphs: Iterable[Graph], params: Mapping[str, TensorType] | Iterable = ()) -> Module:
        items = params.items() if isinstance(params, Mapping) else params
        return Module(tuple(graphs), tuple(items))

    @functools.cached_property
    def param_types(self) -> dict:
        return dict(self.params)

    def graph(self, name: str) -> Graph:
        for g in self.graphs:
            if g.name == name:
                return g
        raise KeyError(f"module has no graph '{name}' (it has {', '.join(g.name for g in self.graphs)})")

    def map(self, fn: Callable[[Graph], Graph]) -> Module:
        return dataclasses.replace(self, graphs=tuple(fn(g) for g in self.graphs))

    @property
    def state_specs(self) -> dict:
        out: dict = {}
        for g in self.graphs:
            out.update({s.name: s for s in g.state})
        return out

    def __str__(self) -> str:
        from lowerlm.ir.printer import print_module

        return print_module(self)


def infer_types(op: Op, in_types: list, attrs: Mapping) -> list | None:
    """The result types the op table's rule gives, or None for ops whose type is declared (param, weight)."""
    d = OPDEFS[op]
    if d.rule is None:
        return None
    full = {k: s.default for k, s in d.attrs.items() if s.default is not REQUIRED}
    full.update(attrs)
    return d.rule(in_types, full)


class GraphBuilder:
    """Builds a graph node by node, inferring result types and keeping names unique.

    ``b.add(Op.LINEAR, [x, w], name="q")`` appends a node and returns its result name (or names, for
    multi-result ops). Passes use it with ``seed=graph`` to rebuild a graph with fresh names that cannot clash.
    """

    def __init__(self, name: str = "forward", seed: Graph | None = None):
        self.name = name
        self.inputs: list = []
        self.state: list = []
        self.nodes: list = []
        self.types: dict = {}
        self._taken: set = set()
        if seed is not None:
            self._taken |= set(seed.types)

    @classmethod
    def rebuild(cls, g: Graph) -> GraphBuilder:
        """A builder for a new version of ``g``: its inputs, state and value types, names that cannot clash; the
        pass appends or replaces the nodes."""
        b = cls(g.name, seed=g)
        b.inputs, b.state = list(g.inputs), list(g.state)
        b.types.update(g.types)
        return b

    def fresh(self, hint: str) -> str:
        """An unused value name from ``hint``. Characters a value name cannot hold (``[A-Za-z0-9_.]`` only) become
        ``_``: passes derive hints from module paths, which may hold any character (``self-attn``)."""
        base = _NOT_NAME.sub("_", hint) or "v"
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name

    def release(self, names: Iterable[str]) -> None:
        """Make names of values that are being replaced available again."""
        self._taken -= set(names)

    def reserve(self, names: Iterable[str]) -> None:
        self._taken |= set(names)

    def input(self, name: str, type: TensorType) -> str:
        name = self.fresh(name)
        self.inputs.append(Value(name, type))
        self.types[name] = type
        return name

    def add_state(self, name: str, type: TensorType, owner: str = "", kind: str = KV) -> str:
        name = self.fresh(name)
        self.state.append(StateSpec(name, type, owner, kind))
        self.types[name] = type
        return name

    def add(self, op: Op, inputs: Iterable = (), attrs: Mapping | None = None, *, name: str = "",
            types: Iterable[TensorType] | None = None, source: Iterable = (), names: Iterable[str] = ()):
        node = Node.make(op, inputs, (), attrs, source)
        if types is None:
            types = infer_types(op, [self.types[i] if i is not None else None for i in node.inputs], node.attrs)
            if types is None:
                raise ValueError(f"{op} needs explicit result types")
        types = list(types)
        hints = list(names) or [name or op.value] + [f"{name or op.value}{i}" for i in range(1, len(types))]
        results = tuple(Value(self.fresh(h), t) for h, t in zip(hints, types))
        self.nodes.append(node.with_(results=results))
        self.types.update({r.name: r.type for r in results})
        return results[0].name if len(results) == 1 else tuple(r.name for r in results)

    def append(self, node: Node) -> None:
        """Append an existing node unchanged (its names must already be unique)."""
        self._taken |= set(node.result_names)
        self.nodes.append(node)
        self.types.update({r.name: r.type for r in node.results})

    def build(self, outputs: Iterable[str], state_outputs: Iterable[str] = ()) -> Graph:
        return Graph(self.name, tuple(self.inputs), tuple(self.state), tuple(self.nodes), tuple(outputs),
                     tuple(state_outputs))
