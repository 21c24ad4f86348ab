"""arm: activation redistribution before the down projection (docs/models.md, "ARM").

A gated MLP ``y = W_d (act(W_g x̂) ⊙ W_u x̂)`` with ``x̂ = rms_norm(x)`` becomes one ``arm_mlp``:
``y = (W_d·diag(s)) (mask(â) ⊙ u) + M x̂`` with ``â = (a − μ) / s``, ``M = W_d·diag(μ)·W_u`` and channels with
``|â| < τ`` zeroed, so their rows of W_u and columns of W_d need not be read in decode. The rewrite is exact
(up to rounding) for τ = 0. μ, s and τ per MLP come from ``lowerlm.calibrate`` (measured on the reference
backend, handed to the pass as data: passes never run a model); ``[W_g; M]``, ``W_d·diag(s)``, μ and s are
weight expressions evaluated at load time.

Why here: it needs gate and up apart, so it runs right after canonicalize and before the fusions; it leaves the
residual add to fuse_linear_residual. Does not fire on an MLP the calibration has no entry for, with biases, with
an activation other than SiLU/GeLU, without an RMSNorm in front, or when an intermediate value has another user.

A rule table: ``GATED_MLP`` matches the six nodes from the down projection, with the use counts as ``where``
conditions and the product in either order; ``find_gated_mlps`` (what ``lowerlm.calibrate`` measures) is the same
pattern's matches.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowerlm.ir.abi import activation_of, short_path
from lowerlm.ir.graph import Graph, Node
from lowerlm.ir.ops import Op
from lowerlm.ir.types import TensorType
from lowerlm.ir.weights import Concat, Data, MatMul, Scale
from lowerlm.passes.canonicalize import dce
from lowerlm.passes.fuse_rmsnorm_linear import weight_expr
from lowerlm.passes.pattern import Pass, Pat, RewriteContext, matches, merge_sources, rewrite, single_use


@dataclass(frozen=True)
class ArmLayer:
    """Per-channel centre μ and scale s of one MLP's activation, and its threshold τ on |(a − μ) / s|."""

    mu: tuple
    scale: tuple
    tau: float


@dataclass(frozen=True)
class ArmCalibration:
    """Calibration data for the arm pass: one ArmLayer per MLP, keyed by the MLP's module path. ``mode`` "plain"
    holds μ = 0, s = 1 (thresholding the raw activation) for comparison."""

    sparsity: float
    layers: tuple  # ((mlp path, ArmLayer), ...)
    mode: str = "arm"

    def layer(self, path: str) -> ArmLayer | None:
        return dict(self.layers).get(path)


@dataclass(frozen=True)
class GatedMLP:
    """The nodes of ``down(act(gate(norm(x))) * up(norm(x)))``."""

    norm: Node
    gate: Node
    act: Node
    up: Node
    mul: Node
    down: Node

    @property
    def key(self) -> str:
        """The MLP's module path (where the product is computed)."""
        return self.mul.source[0] if self.mul.source else self.down.name

    @property
    def activation(self) -> str:
        return activation_of(self.act)

    def same_norm(self) -> bool:
        """Gate and up project the same normalised value (the pattern matches each one's norm on its own)."""
        return self.gate is not self.up and self.gate.args[0] == self.up.args[0]


def _load_time(ctx, value: str) -> bool:
    """A load-time weight: a parameter, or an expression over them (such as upcast's conversion)."""
    return weight_expr(ctx, value) is not None


W = Pat(where=_load_time)
NORM = Pat(Op.RMS_NORM, name="norm", where=lambda ctx, n: ctx.uses(n.name) == 2)  # read by gate and up only
GATE = Pat(Op.LINEAR, (NORM, W), name="gate", where=single_use)  # two inputs: no bias, no residual
UP = Pat(Op.LINEAR, (NORM, W), name="up", where=single_use)
ACT = Pat(frozenset({Op.SILU, Op.GELU}), (GATE,), name="act", where=single_use)
# down(act(gate(norm(x))) * up(norm(x))), the product in either order
GATED_MLP = Pat(Op.LINEAR, (Pat(Op.MUL, (ACT, UP), commutative=True, name="mul", where=single_use), W), name="down")


def find_gated_mlps(g: Graph) -> list:
    """Every gated MLP of the graph in the form arm rewrites."""
    out = []
    for node in g.nodes:
        out += [m for m in (GatedMLP(**caps) for caps in matches(g, GATED_MLP, node)) if m.same_norm()][:1]
    return out


def arm(calibration: ArmCalibration) -> Pass:
    """The arm pass for this calibration data."""

    def fire(ctx: RewriteContext, **captures):
        m = GatedMLP(**captures)
        layer = calibration.layer(m.key)
        return _emit(ctx, m, layer) if layer is not None and m.same_norm() else None

    rules = [(GATED_MLP, fire)]

    @Pass
    def arm_pass(g: Graph) -> tuple:
        g, fired = rewrite(g, rules, name="arm")
        return (dce(g)[0] if fired else g), fired

    return arm_pass


def _emit(ctx: RewriteContext, m: GatedMLP, layer: ArmLayer) -> str:
    """The weights and the arm_mlp that replace the MLP ``m``, under the down projection's name."""
    w_gate, w_up, w_down = (weight_expr(ctx, n.inputs[1]) for n in (m.gate, m.up, m.down))
    x, norm_w = m.norm.inputs
    xt, up_t = ctx.type_of(x), ctx.type_of(m.up.inputs[1])
    hidden, inter = xt.shape[-1], up_t.shape[0]
    vec = TensorType(up_t.dtype, (inter,))
    mu = Data.of(f"arm.{m.key}.mu", vec, layer.mu)
    scale = Data.of(f"arm.{m.key}.scale", vec, layer.scale)
    source = merge_sources(m.norm, m.gate, m.act, m.up, m.mul, m.down)
    name = short_path(m.key, ".mlp") + ".arm"

    def weight(expr, shape, hint):
        return ctx.add(Op.WEIGHT, [], {"expr": expr}, types=[up_t.with_shape(shape)], name=f"{name}.{hint}",
                       source=source)

    m_expr = MatMul(Scale(w_down, mu, 1), w_up)
    inputs = [x, norm_w,
              weight(Concat((w_gate, m_expr), 0), (inter + hidden, hidden), "gate_m"),
              m.up.inputs[1],
              weight(Scale(w_down, scale, 1), (hidden, inter), "down"),
              weight(mu, (inter,), "mu"),
              weight(scale, (inter,), "scale")]
    return ctx.add(Op.ARM_MLP, inputs, {"eps": m.norm.attr("eps"), "tau": float(layer.tau), "act": m.activation},
                   name=m.down.name, source=source)
