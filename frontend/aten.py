"""aten op → IR op, one converter per aten op the importer supports.

Converters read arguments by schema name (``kwargs_of``) and take result shapes from torch.export's metadata, so
``view(x, [B, S, -1, 64])`` needs no shape arithmetic. Python scalars become ``constant`` nodes of the result
dtype, and mixed-dtype operands are cast to the dtype torch promoted to. Nodes that compute no tensor
(``_assert_*``, ``sym_size``) are never needed by an output, so the importer never converts them.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from lowerlm.frontend.fx import kwargs_of, op_name, tensor_type
from lowerlm.ir.dtypes import DType
from lowerlm.ir.errors import UnsupportedOpError
from lowerlm.ir.ops import Op

INT64_MAX = 2**63 - 1


def _out(imp, node):
    return tensor_type(node, imp.symbols)


def _operand(imp, x, dtype: DType) -> str:
    """An fx tensor node or a Python scalar, as an IR value of ``dtype``."""
    if isinstance(x, fx.Node):
        return imp.cast(imp.value(x), dtype)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise UnsupportedOpError(f"operand {x!r}", hint="only tensors and numbers")
    return imp.constant(x, dtype, like="c")


def _binary(op: Op):
    def conv(imp, node, kw):
        out = _out(imp, node)
        a, b = kw["self"], kw["other"]
        alpha = kw.get("alpha", 1)
        if alpha != 1:
            b_val = imp.emit(node, Op.MUL, [_operand(imp, b, out.dtype), imp.constant(alpha, out.dtype)])
        else:
            b_val = _operand(imp, b, out.dtype)
        return imp.emit(node, op, [_operand(imp, a, out.dtype), b_val])
    return conv


def _div(imp, node, kw):
    if kw.get("rounding_mode") is not None:
        raise UnsupportedOpError(op_name(node), imp.path(node), "division with a rounding mode has no IR op")
    return _binary(Op.DIV)(imp, node, kw)


def _unary(op: Op, **attrs):
    def conv(imp, node, kw):
        return imp.emit(node, op, [_operand(imp, kw["self"], _out(imp, node).dtype)], attrs or None)
    return conv


def _pow(imp, node, kw):
    e = kw["exponent"]
    if not isinstance(e, (int, float)) or isinstance(e, bool):
        raise UnsupportedOpError(op_name(node), imp.path(node), "only a constant exponent is supported")
    return imp.emit(node, Op.POW, [imp.value(kw["self"])], {"exponent": float(e)})


def _sqrt(imp, node, kw):
    """``x ** 0.5``: the pow op every backend has (Triton's generated chains emit ``tl.sqrt`` for it)."""
    return imp.emit(node, Op.POW, [imp.cast(imp.value(kw["self"]), _out(imp, node).dtype)], {"exponent": 0.5})


def _gelu(imp, node, kw):
    return imp.emit(node, Op.GELU, [imp.value(kw["self"])], {"approximate": kw.get("approximate", "none")})


def _reduce(op: Op):
    def conv(imp, node, kw):
        x = imp.value(kw["self"])
        dims = kw.get("dim")
        rank = imp.b.types[x].rank
        dims = list(range(rank)) if dims in (None, []) else [dims] if isinstance(dims, int) else list(dims)
        if kw.get("dtype") is not None:
            x = imp.cast(x, DType.from_torch(kw["dtype"]))
        return imp.emit(node, op, [x], {"dims": dims, "keepdim": bool(kw.get("keepdim", False))})
    return conv


def _layer_norm(imp, node, kw):
    """``(x - mean) * rsqrt(var + eps) * weight + bias`` over the last dim, in f32 for narrower inputs (as torch
    computes it), cast back: core ops every backend runs, no op of its own (decode reads its inputs once either
    way; a fused kernel is for when a model family in scope needs it)."""
    out = _out(imp, node)
    x = imp.value(kw["input"])
    if len(kw["normalized_shape"]) != 1:
        raise UnsupportedOpError(op_name(node), imp.path(node), "layer_norm over more than the last dim")
    f32 = DType.F32 if out.dtype in (DType.BF16, DType.F16) else out.dtype
    last = imp.b.types[x].rank - 1
    x = imp.cast(x, f32)
    centred = imp.emit(node, Op.SUB, [x, imp.emit(node, Op.MEAN, [x], {"dims": [last], "keepdim": True})])
    var = imp.emit(node, Op.MEAN, [imp.emit(node, Op.MUL, [centred, centred])], {"dims": [last], "keepdim": True})
    inv = imp.emit(node, Op.RSQRT, [imp.emit(node, Op.ADD, [var, imp.constant(kw.get("eps", 1e-5), f32)])])
    y = imp.emit(node, Op.MUL, [centred, inv])
    if kw.get("weight") is not None:
        y = imp.emit(node, Op.MUL, [y, imp.cast(imp.value(kw["weight"]), f32)])
    if kw.get("bias") is not None:
        y = imp.emit(node, Op.ADD, [y, imp.cast(imp.value(kw["bias"]), f32)])
    return imp.cast(y, out.dtype)


def _softmax(imp, node, kw):
    x = imp.cast(imp.value(kw["self"]), _out(imp, node).dtype)
    return imp.emit(node, Op.SOFTMAX, [x], {"dim": kw["dim"]})


def _to_copy(imp, node, kw):
    x = imp.value(kw["self"])
    dtype = kw.get("dtype")
    return x if dtype is None else imp.cast(x, DType.from_torch(dtype), source=(imp.path(node),))


def _type_as(imp, node, kw):
    """``self.type_as(other)``: self cast to other's dtype (Gemma's norms cast back to the input's)."""
    return imp.cast(imp.value(kw["self"]), imp.b.types[imp.value(kw["other"])].dtype, source=(imp.path(node),))


def _identity(imp, node, kw):
    return imp.value(kw["self"])


def _reshape(imp, node, kw):
    return imp.emit(node, Op.RESHAPE, [imp.value(kw["self"])], {"shape": _out(imp, node).shape})


def _expand(imp, node, kw):
    return imp.emit(node, Op.EXPAND, [imp.value(kw["self"])], {"shape": _out(imp, node).shape})


def _transpose(imp, node, kw):
    x = imp.value(kw["self"])
    rank = imp.b.types[x].rank
    perm = list(range(rank))
    d0, d1 = kw["dim0"] % rank, kw["dim1"] % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return imp.emit(node, Op.TRANSPOSE, [x], {"perm": perm})


def _permute(imp, node, kw):
    x = imp.value(kw["self"])
    rank = imp.b.types[x].rank
    return imp.emit(node, Op.TRANSPOSE, [x], {"perm": [d % rank for d in kw["dims"]]})


def _t(imp, node, kw):
    x = imp.value(kw["self"])
    return imp.emit(node, Op.TRANSPOSE, [x], {"perm": [1, 0]}) if imp.b.types[x].rank == 2 else x


def _dim_value(imp, v):
    """A start/end argument: an int, a SymInt or an fx node computing one."""
    if isinstance(v, fx.Node):
        v = v.meta["val"]
    return imp.symbols.dim(v)


def _slice(imp, node, kw):
    x = imp.value(kw["self"])
    t = imp.b.types[x]
    dim = kw.get("dim", 0) % t.rank
    size = t.shape[dim]
    start, end, step = kw.get("start"), kw.get("end"), kw.get("step", 1)
    start = 0 if start is None else _dim_value(imp, start)
    end = size if end is None or (isinstance(end, int) and end >= INT64_MAX) else _dim_value(imp, end)
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, int) and v < 0:
            v = size + v
        if isinstance(v, int) and isinstance(size, int):
            v = max(0, min(v, size))
        if name == "start":
            start = v
        else:
            end = v
    if start == 0 and end == size and step == 1:
        return x
    return imp.emit(node, Op.SLICE, [x], {"dim": dim, "start": start, "end": end, "step": step})


def _select(imp, node, kw):
    x = imp.value(kw["self"])
    t = imp.b.types[x]
    dim = kw["dim"] % t.rank
    index = _dim_value(imp, kw["index"])
    if isinstance(index, int) and index < 0:
        index = t.shape[dim] + index
    piece = imp.emit(node, Op.SLICE, [x], {"dim": dim, "start": index, "end": index + 1})
    return imp.emit(node, Op.RESHAPE, [piece], {"shape": _out(imp, node).shape})


def _cat(imp, node, kw):
    out = _out(imp, node)
    xs = [imp.cast(imp.value(x), out.dtype) for x in kw["tensors"]]
    return imp.emit(node, Op.CONCAT, xs, {"dim": kw.get("dim", 0) % out.rank})


def _split(imp, node, kw):
    x = imp.value(kw["self"])
    t = imp.b.types[x]
    dim = kw.get("dim", 0) % t.rank
    sizes = [imp.symbols.dim(v.shape[dim]) for v in node.meta["val"]]
    return imp.emit(node, Op.SPLIT, [x], {"dim": dim, "sizes": sizes})


def _topk(imp, node, kw):
    if not kw.get("sorted", True):
        raise UnsupportedOpError(op_name(node), imp.path(node), "unsorted topk")
    return imp.emit(node, Op.TOPK, [imp.value(kw["self"])],
                    {"k": kw["k"], "dim": kw.get("dim", -1), "largest": kw.get("largest", True)})


def _argmax(imp, node, kw):
    x = imp.value(kw["self"])
    if kw.get("dim") is None:
        x = imp.emit(node, Op.RESHAPE, [x], {"shape": [imp.b.types[x].numel]})
    return imp.emit(node, Op.ARGMAX, [x], {"dim": kw.get("dim") or 0, "keepdim": bool(kw.get("keepdim"))})


def _matmul(imp, node, kw):
    a = imp.value(kw["self"])
    b = imp.value(kw.get("mat2", kw.get("other")))
    return imp.emit(node, Op.MATMUL, [a, b])


def _addmm(imp, node, kw):
    """``self + mat1 @ mat2`` with ``self`` a bias row (GPT-2's Conv1D, its weight stored [in, out]): a ``linear``
    over the weight's transpose, a load-time weight expression when it is a parameter, so the projection reaches
    the linear kernels and fusions. Other forms (beta or alpha not 1, a 2-D ``self``) are refused."""
    bias, x, w = imp.value(kw["self"]), imp.value(kw["mat1"]), imp.value(kw["mat2"])
    wt, bt = imp.b.types[w], imp.b.types[bias]
    if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1 or bt.rank != 1 or bt.shape[0] != wt.shape[1]:
        raise UnsupportedOpError(op_name(node), imp.path(node), "only bias + mat1 @ mat2 with a bias row (beta and "
                                 "alpha 1) imports, as a linear")
    mat2 = kw["mat2"]
    if isinstance(mat2, fx.Node) and imp.placeholders.get(mat2, ("",))[0] == "PARAMETER":
        from lowerlm.ir.types import TensorType
        from lowerlm.ir.weights import Param, Transpose

        w = imp.b.add(Op.WEIGHT, [], {"expr": Transpose(Param(imp.param_name(mat2)))}, name=w + "_t",
                      types=[TensorType(wt.dtype, (wt.shape[1], wt.shape[0]))], source=(imp.path(node),))
    else:
        w = imp.b.add(Op.TRANSPOSE, [w], {"perm": [1, 0]}, name=w + "_t", source=(imp.path(node),))
    return imp.emit(node, Op.LINEAR, [x, w, bias])


def _linear(imp, node, kw):
    bias = kw.get("bias")
    inputs = [imp.value(kw["input"]), imp.value(kw["weight"])] + ([imp.value(bias)] if bias is not None else [])
    return imp.emit(node, Op.LINEAR, inputs)


def _embedding(imp, node, kw):
    return imp.emit(node, Op.EMBEDDING, [imp.value(kw["weight"]), imp.value(kw["indices"])])


def _gather(imp, node, kw):
    return imp.emit(node, Op.GATHER, [imp.value(kw["self"]), imp.value(kw["index"])], {"dim": kw["dim"]})


def _scalar_tensor(imp, node, kw):
    out = _out(imp, node)
    return imp.constant(kw["s"], out.dtype)


def _full(imp, node, kw):
    out = _out(imp, node)
    if not all(isinstance(d, int) for d in out.shape):
        raise UnsupportedOpError(op_name(node), imp.path(node), "a constant of symbolic shape")
    value = kw["fill_value"]
    if isinstance(value, float) and math.isnan(value):
        value = float("nan")
    return imp.b.add(Op.CONSTANT, [], {"value": float(value) if out.dtype.is_float else int(value),
                                       "dtype": out.dtype, "shape": list(out.shape)}, name="c")


ATEN = {
    "add": _binary(Op.ADD), "sub": _binary(Op.SUB), "mul": _binary(Op.MUL), "div": _div,
    "neg": _unary(Op.NEG), "exp": _unary(Op.EXP), "rsqrt": _unary(Op.RSQRT), "sigmoid": _unary(Op.SIGMOID),
    "silu": _unary(Op.SILU), "tanh": _unary(Op.TANH), "cos": _unary(Op.COS), "sin": _unary(Op.SIN),
    "pow": _pow, "sqrt": _sqrt, "gelu": _gelu, "layer_norm": _layer_norm,
    "mean": _reduce(Op.MEAN), "sum": _reduce(Op.SUM), "_softmax": _softmax, "softmax": _softmax,
    "_to_copy": _to_copy, "clone": _identity, "alias": _identity, "contiguous": _identity, "detach": _identity,
    "lift_fresh_copy": _identity,
    "view": _reshape, "_unsafe_view": _reshape, "reshape": _reshape, "unsqueeze": _reshape, "squeeze": _reshape,
    "flatten": _reshape,
    "expand": _expand, "transpose": _transpose, "permute": _permute, "t": _t,
    "slice": _slice, "select": _select, "cat": _cat, "split_with_sizes": _split, "split": _split,
    "topk": _topk, "argmax": _argmax, "mm": _matmul, "bmm": _matmul, "matmul": _matmul,
    "linear": _linear, "embedding": _embedding, "gather": _gather,
    "scalar_tensor": _scalar_tensor, "full": _full,
    "relu": _unary(Op.RELU),
    "type_as": _type_as, "addmm": _addmm,
}


def convert(imp, node: fx.Node):
    """Convert one aten call to IR; raises UnsupportedOpError for ops with no IR equivalent."""
    target = node.target
    packet = getattr(getattr(target, "overloadpacket", None), "__name__", None)
    conv = ATEN.get(packet) if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten" else None
    if conv is None:
        from lowerlm.frontend.capture import convert_captured

        out = convert_captured(imp, node)
        if out is not None:
            return out
        raise UnsupportedOpError(op_name(node), imp.path(node),
                                 "lowerlm has no IR op for it; capture the module that uses it "
                                 "(lowerlm.frontend.capture) or file an issue with this message")
    return conv(imp, node, kwargs_of(node))
