"""canonicalize: remove no-op views and casts, fold constants, merge common subexpressions, drop dead code.

Why: the frontend imports graphs full of views that do nothing (reshapes, casts and expands to the shape or
dtype they already have, transposes that undo each other) and repeated subexpressions; every later pattern is
simpler when it sees one canonical form. Needs nothing before it; runs first, after ``upcast`` when that runs
(whose casts it then removes).
Assertions are not IR ops (the frontend drops aten's ``_assert_*`` nodes at import), so none remain to remove.
DCE keeps state updates because every final state version is returned. CSE never merges state writers.
"""

from __future__ import annotations

from lowerlm.ir.fold import CORE_OPS, constant_attrs, constant_tensor, fold
from lowerlm.ir.graph import Graph
from lowerlm.ir.opdefs import OPDEFS
from lowerlm.ir.ops import Op
from lowerlm.passes.pattern import Pass, Pat, rewrite

ANY = Pat(name="x")


def _same_as_input(ctx, root):
    x = root.args[0]
    return x if ctx.type_of(x) == root.results[0].type else None


def _reshape_reshape(ctx, root, inner):
    return ctx.add(Op.RESHAPE, [inner.args[0]], root.attrs)


def _identity_transpose(ctx, root):
    return root.args[0] if tuple(root.attr("perm")) == tuple(range(len(root.attr("perm")))) else None


def _transpose_transpose(ctx, root, inner):
    outer, first = root.attr("perm"), inner.attr("perm")
    return ctx.add(Op.TRANSPOSE, [inner.args[0]], {"perm": [first[p] for p in outer]})


def _full_slice(ctx, root):
    if root.attr("step") == 1 and root.attr("start") == 0:
        return _same_as_input(ctx, root)
    return None


def _single_piece(ctx, root):
    """A concat of one input, or a split into one piece, is its input."""
    pieces = root.results if root.op is Op.SPLIT else root.args
    return root.args[0] if len(pieces) == 1 else None


def _constant(number: float) -> Pat:
    """A scalar ``constant`` node holding ``number``."""
    def holds(ctx, node) -> bool:
        v = node.attrs["value"]
        return not isinstance(v, tuple) and v == number
    return Pat(Op.CONSTANT, where=holds)


def _keep(ctx, root, x):
    """``x`` in place of ``root`` when it has the root's type (the constant did not broadcast it)."""
    return x if ctx.type_of(x) == root.results[0].type else None


def _fold(ctx, root):
    producers = [ctx.producer(v) for v in root.args]
    if not producers or any(p is None or p.op is not Op.CONSTANT for p in producers):
        return None
    values = fold(root, [constant_tensor(p) for p in producers])
    if values is None:
        return None
    names = [ctx.add(Op.CONSTANT, [], constant_attrs(v, r.type), name=r.name, types=[r.type])
             for v, r in zip(values, root.results)]
    return names[0] if len(names) == 1 else tuple(names)


RULES = [
    (Pat(Op.RESHAPE, (Pat(Op.RESHAPE, name="inner"),), name="root"), _reshape_reshape),
    (Pat(Op.RESHAPE, name="root"), _same_as_input),
    (Pat(Op.CAST, name="root"), _same_as_input),
    (Pat(Op.EXPAND, name="root"), _same_as_input),
    (Pat(Op.TRANSPOSE, (Pat(Op.TRANSPOSE, name="inner"),), name="root"), _transpose_transpose),
    (Pat(Op.TRANSPOSE, name="root"), _identity_transpose),
    (Pat(Op.SLICE, name="root"), _full_slice),
    (Pat(frozenset({Op.CONCAT, Op.SPLIT}), name="root"), _single_piece),
    (Pat(Op.ADD, (ANY, _constant(0.0)), commutative=True, name="root"), _keep),
    (Pat(Op.SUB, (ANY, _constant(0.0)), name="root"), _keep),
    (Pat(Op.MUL, (ANY, _constant(1.0)), commutative=True, name="root"), _keep),
    (Pat(Op.DIV, (ANY, _constant(1.0)), name="root"), _keep),
    (Pat(CORE_OPS - {Op.CONSTANT}, name="root"), _fold),
]


def cse(g: Graph) -> tuple:
    """Merge nodes with the same op, inputs, attributes and result types (state writers excepted): (graph, nodes
    merged)."""
    seen: dict = {}
    subst: dict = {}
    nodes = []
    for node in g.nodes:
        node = node.with_(inputs=tuple(subst.get(i, i) if i is not None else None for i in node.inputs))
        key = (node.op, node.inputs, node.attrs, tuple(r.type for r in node.results))
        if OPDEFS[node.op].writes or key not in seen:
            seen.setdefault(key, node)
            nodes.append(node)
            continue
        subst.update({r.name: k.name for r, k in zip(node.results, seen[key].results)})
    out = g.with_(nodes=tuple(nodes), outputs=tuple(subst.get(o, o) for o in g.outputs),
                  state_outputs=tuple(subst.get(o, o) for o in g.state_outputs))
    return out, len(g.nodes) - len(nodes)


def dce(g: Graph) -> tuple:
    """Drop nodes none of whose results reach an output or a returned state: (graph, nodes dropped). canonicalize
    counts them as rewrites; fusions that leave their matched nodes dead do not."""
    live = set(g.outputs) | set(g.state_outputs)
    keep = []
    for node in reversed(g.nodes):
        if any(r.name in live for r in node.results):
            keep.append(node)
            live.update(node.args)
    return g.with_(nodes=tuple(reversed(keep))), len(g.nodes) - len(keep)


@Pass
def canonicalize(g: Graph) -> tuple:
    """Local simplifications to a fixpoint, then CSE, then DCE."""
    g, simplified = rewrite(g, RULES, name="canonicalize")
    g, merged = cse(g)
    g, dropped = dce(g)
    return g, simplified + merged + dropped
