"""upcast: a bf16 or f16 model computed in f32; its parameters are converted when a program loads them.

Why: a backend may lack the model's dtype (ONNX Runtime has no bf16 kernels on a CPU) and run f32 at full speed.
Every value of the model's dtype becomes f32, every cast or constant to that dtype becomes one to f32, and every
``param`` becomes ``weight cast[f32](param ...)``: the weight table keeps the model's own tensors. f32 compute rounds
less than the model's eager forward, so the two differ by eager's own rounding, not by ours. Upcasts only: a
downcast would also lower the f32 islands a model keeps on purpose (norm statistics, router softmax), which the
imported graph no longer marks. Runs first, when ``compile_model`` is asked for f32 (``dtype=torch.float32``, or
auto on a CPU with a bf16 model); canonicalize then drops the casts that became no-ops.
"""

from __future__ import annotations

from lowerlm.ir.dtypes import DType
from lowerlm.ir.errors import PassError
from lowerlm.ir.graph import Graph, Node
from lowerlm.ir.ops import Op
from lowerlm.ir.types import StateSpec, TensorType, Value
from lowerlm.ir.weights import Cast, Param
from lowerlm.passes.pattern import Pass

NARROW = (DType.BF16, DType.F16)


def upcast(src: DType, dst: DType = DType.F32) -> Pass:
    """The pass computing ``src`` values (bf16 or f16) in ``dst`` (f32)."""
    if src not in NARROW or dst is not DType.F32:
        raise PassError(f"upcast goes from bf16 or f16 to f32, not from {src.value} to {dst.value}")

    def ty(t: TensorType) -> TensorType:
        return t.with_dtype(dst) if t.dtype is src else t

    def node(n: Node) -> Node:
        results = [Value(r.name, ty(r.type)) for r in n.results]
        if n.op is Op.PARAM and n.results[0].type.dtype is src:
            return Node.make(Op.WEIGHT, (), results, {"expr": Cast(Param(n.attrs["name"]), dst)}, n.source)
        if n.op is Op.WEIGHT and n.results[0].type.dtype is src:
            return Node.make(Op.WEIGHT, (), results, {"expr": Cast(n.attrs["expr"], dst)}, n.source)
        attrs = dict(n.attrs)
        if attrs.get("dtype") is src and n.op in (Op.CAST, Op.CONSTANT):
            attrs["dtype"] = dst
        return Node.make(n.op, n.inputs, results, attrs, n.source)

    @Pass
    def upcast_pass(g: Graph) -> tuple:
        nodes = tuple(node(n) for n in g.nodes)
        return Graph(g.name, tuple(Value(v.name, ty(v.type)) for v in g.inputs),
                     tuple(StateSpec(s.name, ty(s.type), s.owner, s.kind) for s in g.state),
                     nodes, g.outputs, g.state_outputs), sum(a != b for a, b in zip(nodes, g.nodes))

    return upcast_pass
