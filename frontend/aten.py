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
from lowerlm.ir.opdefs import COMPARISONS
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import numel
from lowerlm.ir.types import TensorType

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


def _square(imp, node, kw):
    return imp.emit(node, Op.POW, [imp.cast(imp.value(kw["self"]), _out(imp, node).dtype)], {"exponent": 2.0})


def _softplus(imp, node, kw):
    x = imp.cast(imp.value(kw["self"]), _out(imp, node).dtype)
    return imp.emit(node, Op.SOFTPLUS, [x], {"beta": float(kw.get("beta", 1)),
                                             "threshold": float(kw.get("threshold", 20))})


def _promoted(a, b) -> DType:
    """The dtype torch computes ``a op b`` in (a comparison's operands, before the bool result)."""
    val = [x.meta["val"] if isinstance(x, fx.Node) else x for x in (a, b)]
    return DType.from_torch(torch.result_type(*val))


def _compare(pred: str):
    def conv(imp, node, kw):
        a, b = kw["self"], kw["other"]
        dtype = _promoted(a, b)
        return imp.emit(node, Op.COMPARE, [_operand(imp, a, dtype), _operand(imp, b, dtype)], {"pred": pred})
    return conv


def _where(imp, node, kw):
    out = _out(imp, node)
    cond = imp.cast(imp.value(kw["condition"]), DType.BOOL)
    return imp.emit(node, Op.WHERE, [cond, _operand(imp, kw["self"], out.dtype), _operand(imp, kw["other"],
                                                                                           out.dtype)])


def _masked_fill(imp, node, kw):
    """``self`` with ``value`` where ``mask`` is true."""
    out = _out(imp, node)
    mask = imp.cast(imp.value(kw["mask"]), DType.BOOL)
    return imp.emit(node, Op.WHERE, [mask, _operand(imp, kw["value"], out.dtype), imp.cast(imp.value(kw["self"]),
                                                                                             out.dtype)])


def _elementwise_or_reduction(op: Op, what: str):
    """``min``/``max``: the two-operand overload is element-wise; along a dim (values and indices) the values are
    ``topk`` of one and the indices ``argmax`` (of the negated input for min: the first on ties, as torch's); the
    reduction over every element has no IR op yet."""
    def conv(imp, node, kw):
        if node.target._overloadname == "other":
            return _binary(op)(imp, node, kw)
        if node.target._overloadname != "dim":
            raise UnsupportedOpError(op_name(node), imp.path(node), f"{what} over every element has no IR op")
        x = imp.value(kw["self"])
        t = imp.b.types[x]
        dim, keep, largest = kw["dim"] % t.rank, kw.get("keepdim", False), what == "max"
        values, _ = imp.emit(node, Op.TOPK, [x], {"k": 1, "dim": dim, "largest": largest})
        ranked = x if largest else imp.emit(node, Op.NEG, [x])
        indices = imp.emit(node, Op.ARGMAX, [ranked], {"dim": dim, "keepdim": True})
        if keep:
            return values, indices
        shape = [d for i, d in enumerate(imp.b.types[values].shape) if i != dim]
        return tuple(imp.emit(node, Op.RESHAPE, [v], {"shape": shape}) for v in (values, indices))
    return conv


def _clamp(imp, node, kw):
    out = _out(imp, node)
    y = imp.cast(imp.value(kw["self"]), out.dtype)
    for bound, op in (("min", Op.MAXIMUM), ("max", Op.MINIMUM)):
        if kw.get(bound) is not None:
            y = imp.emit(node, op, [y, _operand(imp, kw[bound], out.dtype)])
    return y


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


def _var(sqrt: bool):
    """``var`` / ``std`` over dims with a correction (default 1, Bessel's): sum((x - mean)^2) / (n - correction),
    its square root for std -- core ops; the reduced extent must be static."""
    def conv(imp, node, kw):
        out = _out(imp, node)
        x = imp.cast(imp.value(kw["self"]), out.dtype)
        t = imp.b.types[x]
        dims = kw.get("dim")
        dims = list(range(t.rank)) if dims in (None, []) else [dims] if isinstance(dims, int) else list(dims)
        dims = [d % t.rank for d in dims]
        n = 1
        for d in dims:
            n = n * t.shape[d]
        correction = kw.get("correction")
        correction = (1 if kw.get("unbiased", True) else 0) if correction is None else correction
        if not isinstance(n, int):
            raise UnsupportedOpError(op_name(node), imp.path(node), "a variance over a symbolic extent")
        centred = imp.emit(node, Op.SUB, [x, imp.emit(node, Op.MEAN, [x], {"dims": dims, "keepdim": True})])
        total = imp.emit(node, Op.SUM, [imp.emit(node, Op.MUL, [centred, centred])],
                         {"dims": dims, "keepdim": bool(kw.get("keepdim", False))})
        var = imp.emit(node, Op.DIV, [total, imp.constant(max(n - correction, 0), out.dtype)])
        return imp.emit(node, Op.POW, [var], {"exponent": 0.5}) if sqrt else var
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


def _copy(imp, node, kw):
    """Functional ``self.copy_(src)``: ``src`` in ``self``'s dtype, broadcast to its shape."""
    out = _out(imp, node)
    src = imp.cast(imp.value(kw["src"]), out.dtype)
    return src if imp.b.types[src].shape == out.shape else imp.emit(node, Op.EXPAND, [src], {"shape": out.shape})


def _identity(imp, node, kw):
    return imp.value(kw["self"])


def _reshape(imp, node, kw):
    return imp.emit(node, Op.RESHAPE, [imp.value(kw["self"])], {"shape": _out(imp, node).shape})


def _expand(imp, node, kw):
    return imp.emit(node, Op.EXPAND, [imp.value(kw["self"])], {"shape": _out(imp, node).shape})


def _repeat(imp, node, kw):
    """``x.repeat(r0, r1, …)`` (tiling): x seen as [1, s0, 1, s1, …], expanded to [r0, s0, r1, s1, …], merged."""
    x = imp.value(kw["self"])
    reps = list(kw["repeats"])
    shape = [1] * (len(reps) - imp.b.types[x].rank) + list(imp.b.types[x].shape)
    spread = [d for s in shape for d in (1, s)]
    tiled = [d for r, s in zip(reps, shape) for d in (r, s)]
    x = imp.emit(node, Op.RESHAPE, [x], {"shape": spread})
    x = imp.emit(node, Op.EXPAND, [x], {"shape": tiled})
    return imp.emit(node, Op.RESHAPE, [x], {"shape": _out(imp, node).shape})


def _repeat_interleave(imp, node, kw):
    """``x.repeat_interleave(r, dim)`` with an int ``r``: each element along dim r times in a row -- a new axis of
    size r after dim, expanded, merged."""
    x = imp.value(kw["self"])
    dim = kw.get("dim")
    if not isinstance(kw["repeats"], int):
        raise UnsupportedOpError(op_name(node), imp.path(node), "repeats per element (a tensor) have no IR op")
    if dim is None:
        x = imp.emit(node, Op.RESHAPE, [x], {"shape": [imp.b.types[x].numel]})
        dim = 0
    shape = list(imp.b.types[x].shape)
    dim %= len(shape)
    x = imp.emit(node, Op.RESHAPE, [x], {"shape": shape[:dim + 1] + [1] + shape[dim + 1:]})
    x = imp.emit(node, Op.EXPAND, [x], {"shape": shape[:dim + 1] + [kw["repeats"]] + shape[dim + 1:]})
    return imp.emit(node, Op.RESHAPE, [x], {"shape": _out(imp, node).shape})


def _stack(imp, node, kw):
    out = _out(imp, node)
    dim = kw.get("dim", 0) % out.rank
    pieces = []
    for t in kw["tensors"]:
        x = imp.cast(imp.value(t), out.dtype)
        shape = list(imp.b.types[x].shape)
        pieces.append(imp.emit(node, Op.RESHAPE, [x], {"shape": shape[:dim] + [1] + shape[dim:]}))
    return imp.emit(node, Op.CONCAT, pieces, {"dim": dim})


def _broadcast_tensors(imp, node, kw):
    """Each tensor expanded to the common shape (a tuple, read by getitem)."""
    outs = []
    for x, val in zip(kw["tensors"], node.meta["val"]):
        v = imp.value(x)
        shape = tuple(imp.symbols.dim(d) for d in val.shape)
        outs.append(v if imp.b.types[v].shape == shape else imp.emit(node, Op.EXPAND, [v], {"shape": list(shape)}))
    return tuple(outs)


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


def _below_zero(v) -> bool:
    """A bound the export's shape environment knows to be negative: a SymInt such as ``-seq_len`` (``x[:, -S:]``,
    counted from the end like a negative int)."""
    if isinstance(v, fx.Node):
        v = v.meta["val"]
    if not isinstance(v, torch.SymInt):
        return False
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(v < 0)


def _slice(imp, node, kw):
    x = imp.value(kw["self"])
    t = imp.b.types[x]
    dim = kw.get("dim", 0) % t.rank
    size = t.shape[dim]
    start, end, step = kw.get("start"), kw.get("end"), kw.get("step", 1)
    negative = {"start": _below_zero(start), "end": _below_zero(end)}
    start = 0 if start is None else _dim_value(imp, start)
    end = size if end is None or (isinstance(end, int) and end >= INT64_MAX) else _dim_value(imp, end)
    for name, v in (("start", start), ("end", end)):
        if (isinstance(v, int) and v < 0) or negative[name]:
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


def _slice_scatter(imp, node, kw):
    """``self`` with ``src`` in place of ``self[start:end:step]`` along dim. Step 1: the parts of ``self`` before
    and after, concatenated around ``src``; a larger step along a dim of known size (Qwen3.5's interleaved
    multimodal RoPE writes every third frequency): ``src`` spread to ``self``'s length by a constant index, chosen
    where a constant mask says the slice lies."""
    out = _out(imp, node)
    x, src = imp.cast(imp.value(kw["self"]), out.dtype), imp.cast(imp.value(kw["src"]), out.dtype)
    t = imp.b.types[x]
    dim = kw.get("dim", 0) % t.rank
    size = t.shape[dim]
    step = kw.get("step", 1)
    start = 0 if kw.get("start") is None else _dim_value(imp, kw["start"])
    end = size if kw.get("end") is None or (isinstance(kw["end"], int) and kw["end"] >= INT64_MAX) \
        else _dim_value(imp, kw["end"])
    if any(isinstance(v, int) and v < 0 for v in (start, end)):
        raise UnsupportedOpError(op_name(node), imp.path(node), "only a slice of non-negative bounds")
    if step != 1:
        if not all(isinstance(v, int) for v in (size, start, end, step)):
            raise UnsupportedOpError(op_name(node), imp.path(node), "a slice with a step needs a dim of known size")
        where = range(start, min(end, size), step)
        return _strided_scatter(imp, node, x, src, dim, where) if len(where) else x
    return _in_place_of(imp, node, x, src, dim, start, end)


def _in_place_of(imp, node, x: str, piece: str, dim: int, start, end) -> str:
    """``x`` with ``piece`` in place of ``x[start:end]`` along dim: the parts before and after concatenated around
    it."""
    size = imp.b.types[x].shape[dim]
    pieces = [piece]
    if start != 0:
        pieces.insert(0, imp.emit(node, Op.SLICE, [x], {"dim": dim, "start": 0, "end": start}))
    if end != size:
        pieces.append(imp.emit(node, Op.SLICE, [x], {"dim": dim, "start": end, "end": size}))
    return pieces[0] if len(pieces) == 1 else imp.emit(node, Op.CONCAT, pieces, {"dim": dim})


def _select_scatter(imp, node, kw):
    """``self`` with ``src`` (one rank less) in place of ``self.select(dim, index)``: a slice scatter of one row."""
    out = _out(imp, node)
    x, src = imp.cast(imp.value(kw["self"]), out.dtype), imp.cast(imp.value(kw["src"]), out.dtype)
    t = imp.b.types[x]
    dim, index = kw["dim"] % t.rank, _dim_value(imp, kw["index"])
    if not isinstance(index, int) or not isinstance(t.shape[dim], int):
        raise UnsupportedOpError(op_name(node), imp.path(node), "only a constant index along a dim of known size")
    index %= t.shape[dim]
    shape = list(imp.b.types[src].shape)
    shape.insert(dim, 1)
    row = imp.emit(node, Op.RESHAPE, [src], {"shape": shape})
    return _in_place_of(imp, node, x, row, dim, index, index + 1)


def _strided_scatter(imp, node, x: str, src: str, dim: int, where: range) -> str:
    """``x`` with row ``i`` of ``src`` (along ``dim``) at index ``where[i]``: where(mask, src[spread], x)."""
    t = imp.b.types[x]
    size = t.shape[dim]
    spread = [min(max(j - where.start, 0) // where.step, len(where) - 1) for j in range(size)]
    index = imp.b.add(Op.CONSTANT, [], {"value": tuple(spread), "dtype": DType.I64, "shape": (size,)},
                      types=[TensorType(DType.I64, (size,))], name="spread")
    spread_src = _select_rows(imp, node, src, dim, index)
    shape = tuple(size if d == dim else 1 for d in range(t.rank))
    mask = imp.b.add(Op.CONSTANT, [], {"value": tuple(int(j in where) for j in range(size)), "dtype": DType.BOOL,
                                       "shape": shape}, types=[TensorType(DType.BOOL, shape)], name="in_slice")
    return imp.emit(node, Op.WHERE, [mask, spread_src, x])


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


def _unbind(imp, node, kw):
    """``x.unbind(dim)`` along a dim of known size: a split into rows of one, each reshaped without the dim."""
    x = imp.value(kw["self"])
    t = imp.b.types[x]
    dim = kw.get("dim", 0) % t.rank
    if not isinstance(t.shape[dim], int):
        raise UnsupportedOpError(op_name(node), imp.path(node), "only along a dim of known size")
    rows = imp.emit(node, Op.SPLIT, [x], {"dim": dim, "sizes": [1] * t.shape[dim]})
    rows = [rows] if isinstance(rows, str) else rows
    shape = [d for i, d in enumerate(t.shape) if i != dim]
    return tuple(imp.emit(node, Op.RESHAPE, [r], {"shape": shape}) for r in rows)


def _sort(imp, node, kw):
    """``sort`` and ``sort.stable``: equal values keep their order, which is one of the orders an unstable sort may
    give."""
    return imp.emit(node, Op.SORT, [imp.value(kw["self"])],
                    {"dim": kw.get("dim", -1), "descending": bool(kw.get("descending", False))})


def _topk(imp, node, kw):
    """``sorted=False`` leaves the order of the k results unspecified: the sorted order is one of them."""
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


def _index(imp, node, kw):
    """``table[idx]``: integer indices into the first axis (CTRL's sinusoid table at the positions), an embedding
    lookup over the table seen as rows; other advanced indexing has no IR op yet."""
    indices = list(kw["indices"])
    table = imp.value(kw["self"])
    t = imp.b.types[table]
    if (len(indices) != 1 or not isinstance(indices[0], fx.Node)
            or not DType.from_torch(indices[0].meta["val"].dtype).is_int):
        raise UnsupportedOpError(op_name(node), imp.path(node), "only integer indices into the first axis import "
                                 "(an embedding lookup)")
    rows = imp.emit(node, Op.RESHAPE, [table], {"shape": [t.shape[0], t.numel // t.shape[0]]}) \
        if t.rank != 2 else table
    found = imp.emit(node, Op.EMBEDDING, [rows, imp.value(indices[0])])
    return imp.emit(node, Op.RESHAPE, [found], {"shape": _out(imp, node).shape})


def _rms_norm(imp, node, kw):
    """torch's own rms_norm (``nn.RMSNorm``): computed in f32, cast back, times the weight -- the IR op."""
    out = _out(imp, node)
    x = imp.cast(imp.value(kw["input"]), out.dtype)
    if len(kw["normalized_shape"]) != 1:
        raise UnsupportedOpError(op_name(node), imp.path(node), "rms_norm over more than the last dim")
    eps = kw.get("eps")
    eps = torch.finfo(out.dtype.to_torch()).eps if eps is None else eps
    if kw.get("weight") is None:
        w = imp.b.add(Op.CONSTANT, [], {"value": 1.0, "dtype": out.dtype, "shape": [out.shape[-1]]}, name="c")
    else:
        w = imp.cast(imp.value(kw["weight"]), out.dtype)
    return imp.emit(node, Op.RMS_NORM, [x, w], {"eps": float(eps)})


def _arange(imp, node, kw):
    """``arange(start, end, step)`` with integer bounds and step. A bound that depends on the call's shape (the
    sequence length) is refused: such an arange numbers the call's tokens from 0, which is right for a prefill
    from position 0 and wrong for every decode step -- unless frontend/raise_positions.py raised it into the
    positions input (a learned position table's lookup)."""
    start, end, step = kw.get("start", 0), kw["end"], kw.get("step", 1)
    if not all(isinstance(v, (int, fx.Node, torch.SymInt)) for v in (start, end)) or not isinstance(step, int):
        raise UnsupportedOpError(op_name(node), imp.path(node), "only integer bounds and step import")
    start, end = _dim_value(imp, start), _dim_value(imp, end)
    if not isinstance(start, int) or not isinstance(end, int):
        raise UnsupportedOpError(op_name(node), imp.path(node),
                                 f"arange({start}, {end}) numbers this call's tokens from 0, not the positions a "
                                 "decode step sits at; take position_ids as an input and use them instead")
    return imp.emit(node, Op.ARANGE, [], {"start": start, "end": end, "step": step, "dtype": _out(imp, node).dtype})


def _index_select(imp, node, kw):
    x = imp.value(kw["self"])
    return _select_rows(imp, node, x, kw["dim"] % imp.b.types[x].rank, imp.value(kw["index"]))


def _select_rows(imp, node, x: str, dim: int, index: str) -> str:
    """``x.index_select(dim, index)``: the dim moved first, an embedding lookup over rows, moved back."""
    t = imp.b.types[x]
    perm = [dim] + [d for d in range(t.rank) if d != dim]
    if dim:
        x = imp.emit(node, Op.TRANSPOSE, [x], {"perm": perm})
    moved = imp.b.types[x].shape
    rows = imp.emit(node, Op.RESHAPE, [x], {"shape": [moved[0], numel(moved[1:])]})
    found = imp.emit(node, Op.EMBEDDING, [rows, index])
    found = imp.emit(node, Op.RESHAPE, [found], {"shape": [imp.b.types[found].shape[0], *moved[1:]]})
    if dim:
        found = imp.emit(node, Op.TRANSPOSE, [found], {"perm": [perm.index(d) for d in range(t.rank)]})
    return found


def _logical(kind: str):
    """``&``, ``|`` and ``~`` of bool tensors (masks): ``where`` over the operands, ``compare`` for not."""
    def conv(imp, node, kw):
        if _out(imp, node).dtype is not DType.BOOL:
            raise UnsupportedOpError(op_name(node), imp.path(node), "bitwise operations on integers have no IR op")
        if kind == "not":  # x == 0, of x's own dtype
            a = imp.value(kw["self"])
            return imp.emit(node, Op.COMPARE, [a, imp.constant(0, imp.b.types[a].dtype)], {"pred": "eq"})
        a, false = _operand(imp, kw["self"], DType.BOOL), imp.constant(0, DType.BOOL)
        b = _operand(imp, kw["other"], DType.BOOL)
        if kind == "and":
            return imp.emit(node, Op.WHERE, [a, b, false])
        return imp.emit(node, Op.WHERE, [a, imp.constant(1, DType.BOOL), b])
    return conv


def _gather(imp, node, kw):
    return imp.emit(node, Op.GATHER, [imp.value(kw["self"]), imp.value(kw["index"])], {"dim": kw["dim"]})


def _scatter(imp, node, kw):
    """``scatter.src``, and ``scatter.value`` with the value broadcast to the index's shape."""
    x, index = imp.value(kw["self"]), imp.value(kw["index"])
    dtype = imp.b.types[x].dtype
    if "src" in kw:
        src = imp.cast(imp.value(kw["src"]), dtype)
    else:
        src = imp.emit(node, Op.EXPAND, [_operand(imp, kw["value"], dtype)], {"shape": imp.b.types[index].shape})
    return imp.emit(node, Op.SCATTER, [x, index, src], {"dim": kw["dim"] % imp.b.types[x].rank})


def _scalar_tensor(imp, node, kw):
    out = _out(imp, node)
    return imp.constant(kw["s"], out.dtype)


def _filled(value=None):
    """``full``, ``ones``, ``zeros`` and their ``_like`` / ``new_`` forms: one value of the result's dtype, a
    constant of the result's shape, or broadcast to it (``expand``) when the shape is symbolic."""
    def conv(imp, node, kw):
        out = _out(imp, node)
        v = kw["fill_value"] if value is None else value
        if isinstance(v, fx.Node) or isinstance(v, bool) and out.dtype is not DType.BOOL:
            raise UnsupportedOpError(op_name(node), imp.path(node), "a fill value that is not a number")
        v = float(v) if out.dtype.is_float else int(v)
        if isinstance(v, float) and math.isnan(v):
            v = float("nan")
        if all(isinstance(d, int) for d in out.shape):
            return imp.b.add(Op.CONSTANT, [], {"value": v, "dtype": out.dtype, "shape": list(out.shape)}, name="c")
        one = imp.b.add(Op.CONSTANT, [], {"value": v, "dtype": out.dtype, "shape": []}, name="c")
        return imp.emit(node, Op.EXPAND, [one], {"shape": out.shape})
    return conv


ATEN = {
    "add": _binary(Op.ADD), "sub": _binary(Op.SUB), "mul": _binary(Op.MUL), "div": _div,
    "multiply": _binary(Op.MUL), "subtract": _binary(Op.SUB), "divide": _div,
    "neg": _unary(Op.NEG), "exp": _unary(Op.EXP), "rsqrt": _unary(Op.RSQRT), "sigmoid": _unary(Op.SIGMOID),
    "silu": _unary(Op.SILU), "tanh": _unary(Op.TANH), "cos": _unary(Op.COS), "sin": _unary(Op.SIN),
    "pow": _pow, "sqrt": _sqrt, "gelu": _gelu, "layer_norm": _layer_norm,
    "mean": _reduce(Op.MEAN), "sum": _reduce(Op.SUM), "_softmax": _softmax, "softmax": _softmax,
    "_to_copy": _to_copy, "clone": _identity, "alias": _identity, "contiguous": _identity, "detach": _identity,
    "lift_fresh_copy": _identity,
    "view": _reshape, "_unsafe_view": _reshape, "reshape": _reshape, "unsqueeze": _reshape, "squeeze": _reshape,
    "flatten": _reshape,
    "expand": _expand, "transpose": _transpose, "permute": _permute, "t": _t,
    "slice": _slice, "select": _select, "slice_scatter": _slice_scatter, "select_scatter": _select_scatter,
    "copy": _copy, "cat": _cat, "concat": _cat,
    "split_with_sizes": _split, "split": _split, "unbind": _unbind,
    "topk": _topk, "sort": _sort, "argmax": _argmax, "mm": _matmul, "bmm": _matmul, "matmul": _matmul,
    "linear": _linear, "embedding": _embedding, "gather": _gather, "scatter": _scatter,
    "scalar_tensor": _scalar_tensor, "full": _filled(), "full_like": _filled(), "new_full": _filled(),
    "ones": _filled(1), "ones_like": _filled(1), "new_ones": _filled(1),
    "zeros": _filled(0), "zeros_like": _filled(0), "new_zeros": _filled(0),
    "relu": _unary(Op.RELU),
    "type_as": _type_as, "addmm": _addmm,
    "square": _square, "softplus": _softplus, "expm1": _unary(Op.EXPM1), "log": _unary(Op.LOG),
    "floor": _unary(Op.FLOOR), "abs": _unary(Op.ABS), "minimum": _binary(Op.MINIMUM), "maximum": _binary(Op.MAXIMUM),
    "min": _elementwise_or_reduction(Op.MINIMUM, "min"), "max": _elementwise_or_reduction(Op.MAXIMUM, "max"),
    "clamp": _clamp, "clamp_min": _clamp, "clamp_max": _clamp,
    **{pred: _compare(pred) for pred in COMPARISONS},
    "where": _where, "masked_fill": _masked_fill,
    "repeat": _repeat, "repeat_interleave": _repeat_interleave, "stack": _stack,
    "broadcast_tensors": _broadcast_tensors, "var": _var(False), "std": _var(True),
    "index": _index, "rms_norm": _rms_norm, "arange": _arange, "index_select": _index_select,
    "__and__": _logical("and"), "bitwise_and": _logical("and"), "logical_and": _logical("and"),
    "__or__": _logical("or"), "bitwise_or": _logical("or"), "logical_or": _logical("or"),
    "bitwise_not": _logical("not"), "logical_not": _logical("not"),
}


FOLD_ELEMENTS = 65536  # a value computed at compile time becomes a constant up to this size


def _folded(imp, node: fx.Node) -> str | None:
    """The value of an op the importer has no converter for, computed now, when it depends on no input and no
    parameter -- only on buffers and constants, which the trace cache's key holds by value (Gemma 3n's
    ``erfinv`` of its sparsity target) -- as a constant; else None."""
    from lowerlm.frontend.fx import ancestors, fx_eval
    from lowerlm.ir.fold import constant_attrs

    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape) or \
            val.numel() > FOLD_ELEMENTS:  # a symbolic size is no constant (and comparing it may raise)
        return None
    leaves = [n for n in ancestors(node) if n.op == "placeholder"]
    if any(imp.placeholders.get(n, ("",))[0] not in ("BUFFER", "CONSTANT_TENSOR") for n in leaves):
        return None
    try:
        value = fx_eval(node, imp.example_env())
    except Exception:  # noqa: BLE001 -- not computable here: the op stays unsupported
        return None
    t = _out(imp, node)
    return imp.b.add(Op.CONSTANT, [], constant_attrs(value.detach().cpu(), t), types=[t], name="const",
                     source=(imp.path(node),))


def convert(imp, node: fx.Node):
    """Convert one aten call to IR; raises UnsupportedOpError for ops with no IR equivalent. An op with no converter,
    or in a form its converter refuses, whose value depends only on buffers and constants is folded (``_folded``)."""
    target = node.target
    packet = getattr(getattr(target, "overloadpacket", None), "__name__", None)
    conv = ATEN.get(packet) if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten" else None
    if conv is None:
        from lowerlm.frontend import linear_attention, mla
        from lowerlm.frontend.capture import convert_captured

        out = linear_attention.convert(imp, node)
        if out is None:
            out = mla.convert(imp, node)
        if out is not None:
            return out
        out = convert_captured(imp, node)
        if out is not None:
            return out
        out = _folded(imp, node)
        if out is not None:
            return out
        raise UnsupportedOpError(op_name(node), imp.path(node),
                                 "lowerlm has no IR op for it; capture the module that uses it "
                                 "(lowerlm.frontend.capture) or file an issue with this message")
    try:
        return conv(imp, node, kwargs_of(node))
    except UnsupportedOpError:  # a form its converter refuses (a tensor exponent, a rounding mode) is still a
        out = _folded(imp, node)  # constant when it depends on buffers and constants only (Phi-MoE's inv_freq)
        if out is None:
            raise
        return out
