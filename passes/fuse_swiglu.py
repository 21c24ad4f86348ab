"""fuse_swiglu: ``act(gate) * up`` (SiLU, exact GeLU, tanh-GeLU) becomes the ``act`` epilogue of the
``rms_norm_linear`` that produced gate and up, or a standalone ``swiglu`` op when no such norm precedes; gate and up
projections of one input by load-time weights then become one projection over the concatenated weight and a
``split`` (a shared expert whose input also feeds its router: one GEMM, as a norm-fused gate|up would be).

Why: the gated MLP's elementwise product then never goes through memory twice (decode: one kernel from x to the
down projection's input). Runs after fuse_rmsnorm_linear. Never touches an arm_mlp, which has its own activation
and mask. Does not fire when gate, act(gate) or up has another user, or when the product broadcasts.

A rule table, both halves rooted at the ``mul`` and matched in either operand order. The epilogue rule replaces
the ``rms_norm_linear`` above the root as well (``ctx.replace``): the fused op lands at the product, keeps the
product's name and the norm's residual result, and the rule gives way to the standalone one when a node between
the norm and the product reads the norm's residual result.
"""

from __future__ import annotations

from lowerlm.ir.abi import activation_of
from lowerlm.ir.graph import Graph
from lowerlm.ir.ops import Op
from lowerlm.passes.fuse_rmsnorm_linear import weight_expr, weight_value
from lowerlm.passes.pattern import Pass, Pat, merge_sources, rewrite, single_use


def _no_broadcast(ctx, mul) -> bool:
    a, b = mul.args
    return ctx.type_of(a) == ctx.type_of(b)


def _bare_pair(ctx, norm) -> bool:
    """An rms_norm_linear of two projections (and maybe the residual sum) with no activation yet."""
    return norm.attr("act") == "none" and len(norm.attr("splits")) == 2


def _epilogue(ctx, root, act, norm, up):
    gate = act.args[0]
    if norm.result_names[:2] != (gate, up) or not single_use(ctx, gate) or ctx.type_of(gate) != ctx.type_of(up):
        return None
    if not ctx.replace(norm, act):  # a node between them reads the residual sum
        return None
    names = [root.name] + list(norm.result_names[2:])  # the product, then the residual if any
    out = ctx.add(Op.RMS_NORM_LINEAR, norm.inputs, dict(norm.attrs, act=activation_of(act)), names=names,
                  source=merge_sources(norm, act, root))
    return out if isinstance(out, str) else out[0]


def _swiglu(ctx, root, act, gate, up):
    if ctx.type_of(gate) != ctx.type_of(up):
        return None
    gl, ul = ctx.producer(gate), ctx.producer(up)
    paired = (gl is not None and ul is not None and gl.op is ul.op is Op.LINEAR and len(gl.args) == len(ul.args) == 2
              and gl.args[0] == ul.args[0] and weight_expr(ctx, gl.args[1]) is not None
              and weight_expr(ctx, ul.args[1]) is not None)
    if paired and ctx.replace(gl, ul, act):  # gate and up projections of one input: one projection, then split
        source = merge_sources(gl, ul, act, root)
        w = weight_value(ctx, ctx, [gl.args[1], ul.args[1]], f"{root.name}.gate_up.w", source)
        gu = ctx.add(Op.LINEAR, [gl.args[0], w], name=f"{root.name}.gate_up", source=source)
        inter = ctx.type_of(gate).shape[-1]
        gate, up = ctx.add(Op.SPLIT, [gu], {"dim": -1, "sizes": [inter, inter]}, names=[gate, up], source=source)
        return ctx.add(Op.SWIGLU, [gate, up], {"act": activation_of(act)}, source=source)
    if not ctx.replace(act):
        return None
    return ctx.add(Op.SWIGLU, [gate, up], {"act": activation_of(act)}, source=merge_sources(act, root))


ACTS = frozenset({Op.SILU, Op.GELU})
NORM = Pat(Op.RMS_NORM_LINEAR, name="norm", where=_bare_pair)  # gate's producer, for the epilogue
GATE = Pat(name="gate", where=single_use)
UP = Pat(name="up", where=single_use)


def _product(act_input: Pat) -> Pat:
    """``mul(act(act_input), up)`` in either order, without broadcasting; act and up read once."""
    act = Pat(ACTS, (act_input,), name="act", where=single_use)
    return Pat(Op.MUL, (act, UP), commutative=True, name="root", where=_no_broadcast)


RULES = [(_product(NORM), _epilogue), (_product(GATE), _swiglu)]


@Pass
def fuse_swiglu(g: Graph) -> tuple:
    """Gated activations become an rms_norm_linear epilogue or a swiglu op."""
    return rewrite(g, RULES, name="fuse_swiglu")
