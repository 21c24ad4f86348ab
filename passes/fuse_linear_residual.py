"""fuse_linear_residual: ``add(r, linear(x, w))`` → ``linear(x, w, residual=r)`` (also for ``arm_mlp``).

Why: o_proj and down are followed by the residual add; as an epilogue the add costs no extra pass over memory,
and the op's result is the new residual stream. Runs after arm (whose arm_mlp takes the add too) and before
fuse_rmsnorm_linear (which then finds the next norm's input produced by a projection, not a bare add).
Does not fire when the projection's result has another user (it is needed without the add), when it already has
a residual, or when the add broadcasts (operand types differ).
"""

from __future__ import annotations

from lowerlm.ir.graph import Graph
from lowerlm.ir.opdefs import OPDEFS
from lowerlm.ir.ops import RESIDUAL_EPILOGUE, Op
from lowerlm.passes.canonicalize import dce
from lowerlm.passes.pattern import Pass, Pat, merge_sources, rewrite, single_use

ANY = Pat(name="other")


def _slot(op: Op) -> int:
    return next(i for i, s in enumerate(OPDEFS[op].inputs) if s.name == "residual")


def _fusable(ctx, proj) -> bool:
    """The projection's result is read by the add only, and it has no residual yet."""
    return single_use(ctx, proj) and proj.inputs[_slot(proj.op)] is None


def _fuse(ctx, root, proj, other):
    out = root.results[0].type
    if proj.results[0].type != out or ctx.type_of(other) != out:
        return None
    inputs = list(proj.inputs)
    inputs[_slot(proj.op)] = other
    return ctx.add(proj.op, inputs, proj.attrs, name=root.name, source=merge_sources(proj, root))


PROJ = Pat(frozenset(RESIDUAL_EPILOGUE), name="proj", where=_fusable)
RULES = [(Pat(Op.ADD, (PROJ, ANY), commutative=True, name="root"), _fuse)]


@Pass
def fuse_linear_residual(g: Graph) -> tuple:
    """Residual adds become the epilogue of the projection before them."""
    g, fused = rewrite(g, RULES, name="fuse_linear_residual")
    return dce(g)[0], fused
