"""Rule tables for local rewrites, and the one fixpoint driver that applies them.

A rule is ``(Pat, fn)``. ``Pat`` matches a node by op (one op or a set) and, optionally, the producers of its
present inputs; patterns with ``op=None`` match any value. Named sub-patterns are captured: a node when the
pattern names an op, the value name otherwise. ``fn(ctx, **captures)`` returns None (no rewrite) or the value
names that replace the root's results (one name, or a tuple for multi-result roots); it may emit new nodes with
``ctx.add``, which lands them just before the root. Every applied rule counts as one rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from lowerlm.ir.errors import PassError
from lowerlm.ir.graph import Graph, GraphBuilder, Node
from lowerlm.ir.ops import Op

_counter = [0]


def record_rewrites(n: int = 1) -> None:
    """Count ``n`` rewrites toward the pass now running (the driver reads and resets the count)."""
    _counter[0] += n


def take_rewrite_count() -> int:
    n, _counter[0] = _counter[0], 0
    return n


@dataclass(frozen=True)
class Pat:
    op: Op | frozenset | None = None
    src: tuple | None = None  # patterns for the present inputs, in order
    name: str | None = None

    def ops(self) -> frozenset | None:
        if self.op is None:
            return None
        return self.op if isinstance(self.op, frozenset) else frozenset({self.op})


class RewriteContext:
    """What a rule function sees: the graph built so far and a way to add nodes before the root."""

    def __init__(self, builder: GraphBuilder, root: Node, graph: Graph):
        self.builder, self.root, self.graph = builder, root, graph
        self.producers: dict = {}

    def uses(self, value: str) -> int:
        """How many nodes and outputs read ``value`` in the graph this round started from."""
        return self.graph.use_count(value)

    def producer(self, value: str) -> Node | None:
        return self.producers.get(value)

    def type_of(self, value: str):
        return self.builder.types[value]

    def add(self, op: Op, inputs: Iterable = (), attrs: Mapping | None = None, *, name: str = "", types=None,
            source: Iterable | None = None):
        out = self.builder.add(op, inputs, attrs, name=name or self.root.name, types=types,
                               source=self.root.source if source is None else source)
        for n in self.builder.nodes[-1:]:
            self.producers.update({r: n for r in n.result_names})
        return out


def merge_sources(*nodes: Node) -> tuple:
    """The module paths of the nodes a fusion replaces, in order, each once."""
    return tuple(dict.fromkeys(p for n in nodes for p in n.source))


def _match(pat: Pat, value: str, ctx: RewriteContext, caps: dict) -> bool:
    node = ctx.producer(value)
    if pat.op is None:
        if pat.name:
            caps[pat.name] = value
        return True
    if node is None or node.op not in pat.ops():
        return False
    return _match_node(pat, node, ctx, caps)


def _match_node(pat: Pat, node: Node, ctx: RewriteContext, caps: dict) -> bool:
    if pat.src is not None:
        args = node.args
        if len(args) != len(pat.src) or not all(_match(p, a, ctx, caps) for p, a in zip(pat.src, args)):
            return False
    if pat.name:
        caps[pat.name] = node
    return True


def rewrite(g: Graph, rules: list, name: str = "rewrite", max_rounds: int = 100) -> Graph:
    """Apply ``rules`` until none fires. Replaced nodes are dropped; their users read the replacement."""
    for _ in range(max_rounds):
        g, fired = _one_round(g, rules, name)
        if not fired:
            return g
    raise PassError(f"{name}: rules still firing after {max_rounds} rounds (a rule undoes another?)")


def _one_round(g: Graph, rules: list, name: str) -> tuple:
    builder = GraphBuilder(g.name, seed=g)
    builder.inputs, builder.state = list(g.inputs), list(g.state)
    builder.types.update({v.name: v.type for v in g.inputs})
    builder.types.update({s.name: s.type for s in g.state})
    subst: dict = {}
    fired = 0
    ctx = RewriteContext(builder, None, g)
    for node in g.nodes:
        node = node.with_(inputs=tuple(subst.get(i, i) if i is not None else None for i in node.inputs))
        ctx.root = node
        replacement = None
        for pat, fn in rules:
            ops = pat.ops()
            if ops is not None and node.op not in ops:
                continue
            caps: dict = {}
            if not _match_node(pat, node, ctx, caps):
                continue
            # the root's names are free for its replacement to reuse
            builder.release(node.result_names)
            emitted = len(builder.nodes)
            replacement = fn(ctx, **caps)
            if replacement is not None:
                break
            if len(builder.nodes) != emitted:
                raise PassError(f"{name}: a rule emitted nodes for {node.op} but did not replace it")
            builder.reserve(node.result_names)
        if replacement is None:
            builder.append(node)
            ctx.producers.update({r: node for r in node.result_names})
            continue
        names = (replacement,) if isinstance(replacement, str) else tuple(replacement)
        if len(names) != len(node.results):
            raise PassError(f"{name}: a rule replaced {len(node.results)} results of {node.op} by {len(names)}")
        for r, new in zip(node.results, names):
            if builder.types[new] != r.type:
                raise PassError(f"{name}: a rule replaced %{r.name}: {r.type} by %{new}: {builder.types[new]}")
            subst[r.name] = new
        fired += 1
    record_rewrites(fired)
    out = builder.build([subst.get(o, o) for o in g.outputs], [subst.get(o, o) for o in g.state_outputs])
    return out, fired
