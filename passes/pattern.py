"""Rule tables for local rewrites, the one fixpoint driver that applies them, and ``Pass``, the form of a pass.

A rule is ``(Pat, fn)``. ``Pat`` matches a node by op (one op or a set) and, optionally, the producers of its
present inputs; patterns with ``op=None`` match any value. ``where=pred`` adds a condition ``pred(ctx, x)`` on the
matched node (on the value name for ``op=None``); ``commutative=True`` also tries the two inputs of the node
swapped. Named sub-patterns are captured: a node when the pattern names an op, the value name otherwise.
``fn(ctx, **captures)`` runs for each way the pattern matches, in order, until it returns the value names that
replace the root's results (one name, or a tuple for multi-result roots); None means no rewrite. It may emit new
nodes with ``ctx.add``, which lands them just before the root, and replace captured nodes above the root with
``ctx.replace``. Every applied rule counts as one rewrite; ``rewrite`` returns the count with the graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

from lowerlm.ir.errors import PassError
from lowerlm.ir.graph import Graph, GraphBuilder, Node
from lowerlm.ir.ops import Op


class Pass:
    """A pass whose function returns (result, rewrites)."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, g):
        """What tests and users call: the graph (or, for specialize, the tuple of graphs) only."""
        return self.fn(g)[0]

    def apply(self, g) -> tuple:
        """What the driver calls: (result, number of rewrites)."""
        return self.fn(g)


@dataclass(frozen=True)
class Pat:
    op: Op | frozenset | None = None
    src: tuple | None = None  # patterns for the present inputs, in order
    name: str | None = None
    where: Callable | None = None  # where(ctx, node) (op=None: where(ctx, value name)) must hold
    commutative: bool = False  # also try the two inputs swapped

    def __post_init__(self):
        if self.commutative and (self.src is None or len(self.src) != 2):
            raise ValueError("a commutative pattern needs exactly two input patterns")

    def ops(self) -> frozenset | None:
        if self.op is None:
            return None
        return self.op if isinstance(self.op, frozenset) else frozenset({self.op})


def single_use(ctx, x: Node | str) -> bool:
    """A ``where`` condition: the matched node's first result (or the matched value) has exactly one reader."""
    return ctx.uses(x if isinstance(x, str) else x.name) == 1


class RewriteContext:
    """What a rule function sees: the graph built so far and a way to add nodes before the root."""

    def __init__(self, builder: GraphBuilder, root: Node | None, graph: Graph):
        self.builder, self.root, self.graph = builder, root, graph
        self.producers: dict = {}
        self.replaced: list = []  # nodes above the root the current rule replaces (ctx.replace)
        self.refused = False  # a ctx.replace of the current rule returned False

    def uses(self, value: str) -> int:
        """How many nodes and outputs read ``value`` in the graph this round started from."""
        return self.graph.use_count(value)

    def producer(self, value: str) -> Node | None:
        return self.producers.get(value)

    def type_of(self, value: str):
        return self.builder.types[value]

    def add(self, op: Op, inputs: Iterable = (), attrs: Mapping | None = None, *, name: str = "", types=None,
            source: Iterable | None = None, names: Iterable[str] = ()):
        out = self.builder.add(op, inputs, attrs, name=name or self.root.name, types=types,
                               source=self.root.source if source is None else source, names=names)
        self.producers.update({r: n for n in self.builder.nodes[-1:] for r in n.result_names})
        return out

    def replace(self, *nodes: Node) -> bool:
        """Let the rule replace ``nodes`` as well as the root: captured nodes above it, which leave the graph. A
        node the rule emits may take one of their result names (with the same type); the others are gone, and
        nothing may read them after the rewrite. False, and nothing replaced, when a node between them and the
        root reads one of their results (the rule must return None then)."""
        built = self.builder.nodes
        at = [next((i for i in range(len(built) - 1, -1, -1) if built[i] is n), None) for n in nodes]
        if None in at:
            raise PassError(f"ctx.replace: {nodes[at.index(None)].op} is not a node above {self.root.op}")
        names = {r for n in nodes for r in n.result_names}
        leaving = self.replaced + list(nodes)
        if any(names.intersection(n.args) for n in built[min(at):] if all(n is not m for m in leaving)):
            self.refused = True
            return False
        self.replaced += nodes
        self.builder.release(names)
        return True


def merge_sources(*nodes: Node) -> tuple:
    """The module paths of the nodes a fusion replaces, in order, each once."""
    return tuple(dict.fromkeys(p for n in nodes for p in n.source))


def _capture(caps: dict, name: str | None, what) -> dict:
    return {**caps, name: what} if name else caps


def _matches(pat: Pat, value: str, ctx, caps: dict) -> Iterator[dict]:
    """Every way ``pat`` matches the value: ``caps`` plus its captures (a new dict each, so none leak)."""
    if pat.op is None:
        if pat.where is None or pat.where(ctx, value):
            yield _capture(caps, pat.name, value)
        return
    node = ctx.producer(value)
    if node is not None and node.op in pat.ops():
        yield from _node_matches(pat, node, ctx, caps)


def _node_matches(pat: Pat, node: Node, ctx, caps: dict) -> Iterator[dict]:
    if pat.where is not None and not pat.where(ctx, node):
        return
    if pat.src is None:
        yield _capture(caps, pat.name, node)
        return
    args = node.args
    if len(args) != len(pat.src):
        return
    orders = [args, args[::-1]] if pat.commutative and args[0] != args[1] else [args]
    for order in orders:
        for found in _all_match(pat.src, order, ctx, caps):
            yield _capture(found, pat.name, node)


def _all_match(pats: tuple, values: tuple, ctx, caps: dict) -> Iterator[dict]:
    if not pats:
        yield caps
        return
    for found in _matches(pats[0], values[0], ctx, caps):
        yield from _all_match(pats[1:], values[1:], ctx, found)


class _GraphView:
    """A finished graph seen the way rules see the graph being built (for ``matches``)."""

    def __init__(self, g: Graph):
        self.graph = g
        self.uses, self.producer, self.type_of = g.use_count, g.producer, g.type_of


def matches(g: Graph, pat: Pat, node: Node) -> Iterator[dict]:
    """Every way ``pat`` matches ``node`` of ``g``, as the captures a rule function would receive (a pass's
    analysis, such as ``find_gated_mlps``, shares the pattern of its rule this way)."""
    ops = pat.ops()
    if ops is not None and node.op not in ops:
        return iter(())
    return _node_matches(pat, node, _GraphView(g), {})


def rewrite(g: Graph, rules: list, name: str = "rewrite", max_rounds: int = 100) -> tuple:
    """Apply ``rules`` until none fires: (graph, rewrites). Replaced nodes are dropped; their users read the
    replacement. A graph without a node any rule can match at its root is returned as it is."""
    roots = [pat.ops() for pat, _ in rules]
    if None not in roots and not any(n.op in ops for n in g.nodes for ops in roots):
        return g, 0
    total = 0
    for _ in range(max_rounds):
        g, fired = _one_round(g, rules, name)
        total += fired
        if not fired:
            return g, total
    raise PassError(f"{name}: rules still firing after {max_rounds} rounds (a rule undoes another?)")


def _first_rewrite(node: Node, rules: list, ctx: RewriteContext, name: str):
    """The first replacement a rule returns for ``node`` (None if none), and where its emitted nodes start."""
    builder = ctx.builder
    for pat, fn in rules:
        ops = pat.ops()
        if ops is not None and node.op not in ops:
            continue
        for caps in _node_matches(pat, node, ctx, {}):
            builder.release(node.result_names)  # the root's names are free for its replacement to reuse
            emitted = len(builder.nodes)
            ctx.replaced, ctx.refused = [], False
            replacement = fn(ctx, **caps)
            if replacement is not None and ctx.refused:
                raise PassError(f"{name}: a rule for {node.op} fired although ctx.replace refused")
            if replacement is not None:
                return replacement, emitted
            if len(builder.nodes) != emitted:
                raise PassError(f"{name}: a rule emitted nodes for {node.op} but did not replace it")
            builder.reserve(node.result_names)
            builder.reserve(r for n in ctx.replaced for r in n.result_names)
    return None, None


def _drop_replaced(ctx: RewriteContext, emitted: int, name: str) -> tuple:
    """Take the nodes ``ctx.replace`` named out of the graph being built: (where the emitted nodes now start, the
    names of their results that no emitted node redefined)."""
    builder, replaced = ctx.builder, ctx.replaced
    kept = [n for n in builder.nodes[:emitted] if all(n is not m for m in replaced)]
    builder.nodes[:] = kept + builder.nodes[emitted:]
    redefined = {r for n in builder.nodes[len(kept):] for r in n.result_names}
    gone = set()
    for r in (r for n in replaced for r in n.results):
        if r.name not in redefined:
            gone.add(r.name)
            ctx.producers.pop(r.name, None)
        elif builder.types[r.name] != r.type:
            raise PassError(f"{name}: a rule replaced %{r.name}: {r.type} by %{r.name}: {builder.types[r.name]}")
    builder.reserve(gone)  # never reused this round: a later read of one is an error, not a new value
    read = sorted(gone.intersection(a for n in builder.nodes[len(kept):] for a in n.args))
    if read:
        raise PassError(f"{name}: a rule dropped %{read[0]}, which is still read")
    return len(kept), gone


def _one_round(g: Graph, rules: list, name: str) -> tuple:
    builder = GraphBuilder(g.name, seed=g)
    builder.inputs, builder.state = list(g.inputs), list(g.state)
    builder.types.update({v.name: v.type for v in g.inputs})
    builder.types.update({s.name: s.type for s in g.state})
    subst: dict = {}
    gone: set = set()
    fired = 0
    ctx = RewriteContext(builder, None, g)

    def read(values):
        out = tuple(subst.get(i, i) if i is not None else None for i in values)
        if gone.intersection(out):
            raise PassError(f"{name}: a rule dropped %{sorted(gone.intersection(out))[0]}, which is still read")
        return out

    for node in g.nodes:
        node = node.with_(inputs=read(node.inputs))
        ctx.root = node
        replacement, emitted = _first_rewrite(node, rules, ctx, name)
        if replacement is None:
            builder.append(node)
            ctx.producers.update({r: node for r in node.result_names})
            continue
        if ctx.replaced:
            emitted, dropped = _drop_replaced(ctx, emitted, name)
            gone |= dropped
        ctx.producers.update({r: n for n in builder.nodes[emitted:] for r in n.result_names})
        names = (replacement,) if isinstance(replacement, str) else tuple(replacement)
        if len(names) != len(node.results):
            raise PassError(f"{name}: a rule replaced {len(node.results)} results of {node.op} by {len(names)}")
        for r, new in zip(node.results, names):
            if builder.types[new] != r.type:
                raise PassError(f"{name}: a rule replaced %{r.name}: {r.type} by %{new}: {builder.types[new]}")
            subst[r.name] = new
        fired += 1
    out = builder.build(read(g.outputs), read(g.state_outputs))
    return out, fired
