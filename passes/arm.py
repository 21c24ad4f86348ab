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
"""

from __future__ import annotations

from dataclasses import dataclass

from lowerlm.ir.graph import Graph, GraphBuilder, Node
from lowerlm.ir.ops import Op
from lowerlm.ir.types import TensorType
from lowerlm.ir.weights import Concat, Data, MatMul, Scale
from lowerlm.passes.canonicalize import dce
from lowerlm.passes.fuse_rmsnorm_linear import weight_expr
from lowerlm.passes.pattern import merge_sources, record_rewrites

ACTS = {Op.SILU: "silu"}


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
        return ACTS.get(self.act.op) or {"none": "gelu", "tanh": "gelu_tanh"}[self.act.attr("approximate")]


def _act(node):
    return node is not None and (node.op in ACTS or node.op is Op.GELU)


def _plain_linear(g: Graph, node, x: str | None = None) -> bool:
    """A linear without bias or residual whose weight is a load-time weight (a parameter, or an expression over
    them, such as upcast's conversion), and whose input is ``x`` if given."""
    if node is None or node.op is not Op.LINEAR or node.inputs[2] is not None or node.inputs[3] is not None:
        return False
    return weight_expr(g, node.inputs[1]) is not None and (x is None or node.inputs[0] == x)


def find_gated_mlps(g: Graph) -> list:
    """Every gated MLP of the graph in the form arm rewrites."""
    out = []
    for down in g.nodes:
        if not _plain_linear(g, down):
            continue
        mul = g.producer(down.inputs[0])
        if mul is None or mul.op is not Op.MUL or g.use_count(mul.name) != 1:
            continue
        for a, u in (mul.inputs, mul.inputs[::-1]):
            act, up = g.producer(a), g.producer(u)
            if not _act(act) or g.use_count(a) != 1 or up is None:
                continue
            gate = g.producer(act.inputs[0])
            if gate is None or g.use_count(gate.name) != 1 or g.use_count(up.name) != 1:
                continue
            norm = g.producer(gate.inputs[0])
            if norm is None or norm.op is not Op.RMS_NORM or g.use_count(norm.name) != 2:
                continue
            if _plain_linear(g, gate, norm.name) and _plain_linear(g, up, norm.name) and up is not gate:
                out.append(GatedMLP(norm, gate, act, up, mul, down))
                break
    return out


def arm(calibration: ArmCalibration):
    """The arm pass for this calibration data."""

    def arm_pass(g: Graph) -> Graph:
        mlps = {m.down.name: m for m in find_gated_mlps(g) if calibration.layer(m.key) is not None}
        if not mlps:
            return g
        b = GraphBuilder.rebuild(g)
        for node in g.nodes:
            if node.name not in mlps:
                b.append(node)
                continue
            _emit(b, g, mlps[node.name], calibration.layer(mlps[node.name].key))
            record_rewrites()
        return dce(b.build(g.outputs, g.state_outputs), count=False)

    return arm_pass


def _emit(b: GraphBuilder, g: Graph, m: GatedMLP, layer: ArmLayer) -> None:
    w_gate, w_up, w_down = (weight_expr(g, n.inputs[1]) for n in (m.gate, m.up, m.down))
    x, norm_w = m.norm.inputs
    xt, up_t = g.type_of(x), g.type_of(m.up.inputs[1])
    hidden, inter = xt.shape[-1], up_t.shape[0]
    vec = TensorType(up_t.dtype, (inter,))
    mu = Data.of(f"arm.{m.key}.mu", vec, layer.mu)
    scale = Data.of(f"arm.{m.key}.scale", vec, layer.scale)
    source = merge_sources(m.norm, m.gate, m.act, m.up, m.mul, m.down)
    name = m.key.replace("model.layers.", "L").replace(".mlp", "") + ".arm"

    def weight(expr, shape, hint):
        return b.add(Op.WEIGHT, [], {"expr": expr}, types=[up_t.with_shape(shape)], name=f"{name}.{hint}",
                     source=source)

    m_expr = MatMul(Scale(w_down, mu, 1), w_up)
    inputs = [x, norm_w,
              weight(Concat((w_gate, m_expr), 0), (inter + hidden, hidden), "gate_m"),
              m.up.inputs[1],
              weight(Scale(w_down, scale, 1), (hidden, inter), "down"),
              weight(mu, (inter,), "mu"),
              weight(scale, (inter,), "scale")]
    b.release([m.down.name])
    b.add(Op.ARM_MLP, inputs, {"eps": m.norm.attr("eps"), "tau": float(layer.tau), "act": m.activation},
          names=[m.down.name], source=source)
