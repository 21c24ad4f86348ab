"""Weight expressions: weights computed from parameters once, when a program is loaded.

Passes that need new weights (q/k/v concatenated, ARM's ``W_d·diag(s)`` and ``M = W_d·diag(μ)·W_u``) emit a
``weight`` node holding an expression over ``param`` leaves and ``data`` leaves (constants handed to a pass, such
as calibration statistics). Expressions are immutable, print as text, have a result type computed from the
parameter table, a fingerprint that covers the values of every leaf, and evaluate to a tensor with torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

from lowerlm.ir.dtypes import DType
from lowerlm.ir.errors import ShapeError
from lowerlm.ir.types import TensorType


@dataclass(frozen=True)
class Param:
    """An entry of the module's weight table."""

    name: str


@dataclass(frozen=True)
class Data:
    """A constant handed to a pass. ``values`` is a tuple of numbers (row-major); it is None after parsing text,
    which records only the ``digest`` of the values."""

    key: str
    type: TensorType
    digest: str
    values: tuple | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def of(key: str, type: TensorType, values) -> Data:
        flat = tuple(float(v) if type.dtype.is_float else int(v) for v in values)
        if not isinstance(type.numel, int) or len(flat) != type.numel:
            raise ShapeError(f"data '{key}' has {len(flat)} values for type {type}")
        return Data(key, type, hashlib.sha256(repr(flat).encode()).hexdigest()[:16], flat)


@dataclass(frozen=True)
class Concat:
    """Concatenation along ``axis``."""

    args: tuple
    axis: int = 0


@dataclass(frozen=True)
class Transpose:
    """Swap of the last two axes (a matrix's two; each matrix of a stack of them, as experts' [E, H, N])."""

    arg: WeightExpr


@dataclass(frozen=True)
class Deinterleave:
    """The entries along ``axis`` at even indices, then those at odd ones (gpt-oss's interleaved gate|up columns
    made [gate; up])."""

    arg: WeightExpr
    axis: int


@dataclass(frozen=True)
class Slice:
    """Entries ``start`` to ``end`` (exclusive) along ``axis``: one rank's shard of a weight (tensor parallelism), so
    a rank evaluates only its part."""

    arg: WeightExpr
    axis: int
    start: int
    end: int


@dataclass(frozen=True)
class MatMul:
    """Matrix product of two matrices."""

    lhs: WeightExpr
    rhs: WeightExpr


@dataclass(frozen=True)
class Scale:
    """``arg`` times a vector ``by`` broadcast along ``axis`` (``W·diag(s)`` is axis 1)."""

    arg: WeightExpr
    by: WeightExpr
    axis: int


@dataclass(frozen=True)
class Cast:
    """Conversion to another dtype."""

    arg: WeightExpr
    dtype: DType


WeightExpr = Union[Param, Data, Concat, Transpose, Deinterleave, Slice, MatMul, Scale, Cast]


def children(expr: WeightExpr) -> tuple:
    if isinstance(expr, Concat):
        return expr.args
    if isinstance(expr, (Transpose, Deinterleave, Slice, Cast)):
        return (expr.arg,)
    if isinstance(expr, MatMul):
        return (expr.lhs, expr.rhs)
    if isinstance(expr, Scale):
        return (expr.arg, expr.by)
    return ()


def params_of(expr: WeightExpr) -> list[str]:
    """Names of the parameters an expression reads, in order of appearance."""
    if isinstance(expr, Param):
        return [expr.name]
    return [p for c in children(expr) for p in params_of(c)]


def weight_type(expr: WeightExpr, params: Mapping[str, TensorType]) -> TensorType:
    """The result type of ``expr``; raises ShapeError for operands that do not fit."""
    if isinstance(expr, Param):
        if expr.name not in params:
            raise ShapeError(f"param '{expr.name}' is not in the weight table")
        return params[expr.name]
    if isinstance(expr, Data):
        return expr.type
    kids = [weight_type(c, params) for c in children(expr)]
    if isinstance(expr, Concat):
        if not kids:
            raise ShapeError("weight concat needs at least one operand")
        first = kids[0]
        if not -first.rank <= expr.axis < first.rank:
            raise ShapeError(f"weight concat axis {expr.axis} out of range for rank {first.rank}")
        axis = expr.axis % first.rank
        total = 0
        for k in kids:
            if k.dtype != first.dtype or k.rank != first.rank or any(
                    a != b for i, (a, b) in enumerate(zip(k.shape, first.shape)) if i != axis):
                raise ShapeError(f"weight concat operands {first} and {k} do not fit along axis {expr.axis}")
            total = total + k.shape[axis]
        return first.with_shape(first.shape[:axis] + (total,) + first.shape[axis + 1:])
    if isinstance(expr, Transpose):
        (a,) = kids
        if a.rank < 2:
            raise ShapeError(f"weight transpose needs a matrix or a stack of them, got {a}")
        return a.with_shape(a.shape[:-2] + a.shape[:-3:-1])
    if isinstance(expr, Deinterleave):
        (a,) = kids
        if not 0 <= expr.axis < a.rank or not isinstance(a.shape[expr.axis], int) or a.shape[expr.axis] % 2:
            raise ShapeError(f"weight deinterleave along axis {expr.axis} needs an even length there, got {a}")
        return a
    if isinstance(expr, Slice):
        (a,) = kids
        if not 0 <= expr.axis < a.rank or not isinstance(a.shape[expr.axis], int) or \
                not 0 <= expr.start < expr.end <= a.shape[expr.axis]:
            raise ShapeError(f"weight slice [{expr.start}:{expr.end}] along axis {expr.axis} does not fit {a}")
        return a.with_shape(a.shape[:expr.axis] + (expr.end - expr.start,) + a.shape[expr.axis + 1:])
    if isinstance(expr, MatMul):
        a, b = kids
        if a.rank != 2 or b.rank != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype:
            raise ShapeError(f"weight matmul operands {a} and {b} do not fit")
        return a.with_shape((a.shape[0], b.shape[1]))
    if isinstance(expr, Scale):
        a, s = kids
        if s.rank != 1 or not 0 <= expr.axis < a.rank or a.shape[expr.axis] != s.shape[0]:
            raise ShapeError(f"weight scale of {a} by {s} along axis {expr.axis} does not fit")
        return a
    if isinstance(expr, Cast):
        return kids[0].with_dtype(expr.dtype)
    raise ShapeError(f"not a weight expression: {expr!r}")


def weight_fingerprint(expr: WeightExpr, param_digest: Callable[[str], str]) -> str:
    """A digest of the expression's structure and of every leaf's values (params through ``param_digest``)."""
    h = hashlib.sha256(expr_str(expr).encode())
    for name in params_of(expr):
        h.update(param_digest(name).encode())
    return h.hexdigest()[:16]


def evaluate_weight(expr: WeightExpr, get_param: Callable[[str], object]):
    """Compute the tensor for ``expr``; ``get_param(name)`` returns a parameter's tensor."""
    import torch

    if isinstance(expr, Param):
        return get_param(expr.name)
    if isinstance(expr, Data):
        if expr.values is None:
            raise ShapeError(f"data '{expr.key}' has no values (it was parsed from text); hand the pass its data")
        return torch.tensor(expr.values, dtype=expr.type.dtype.to_torch()).reshape(expr.type.shape)
    kids = [evaluate_weight(c, get_param) for c in children(expr)]
    # data leaves are made on the CPU: compute where the first operand (a parameter, usually) lives
    kids = [k.to(kids[0].device) for k in kids]
    if isinstance(expr, Concat):
        return torch.cat(kids, dim=expr.axis)
    if isinstance(expr, Transpose):
        return kids[0].transpose(-2, -1).contiguous()
    if isinstance(expr, Deinterleave):
        a, lead = kids[0], (slice(None),) * expr.axis
        return torch.cat([a[lead + (slice(0, None, 2),)], a[lead + (slice(1, None, 2),)]], dim=expr.axis)
    if isinstance(expr, Slice):
        return kids[0].narrow(expr.axis, expr.start, expr.end - expr.start).contiguous()
    if isinstance(expr, MatMul):
        return kids[0] @ kids[1]
    if isinstance(expr, Scale):
        a, s = kids
        view = [1] * a.dim()
        view[expr.axis] = -1
        return a * s.to(a.dtype).reshape(view)
    if isinstance(expr, Cast):
        return kids[0].to(expr.dtype.to_torch())
    raise TypeError(f"not a weight expression: {expr!r}")


def expr_str(expr: WeightExpr) -> str:
    """Canonical text: ``concat(param "a", param "b") {axis=0}`` style, nested without attributes braces."""
    import json

    if isinstance(expr, Param):
        return f"param {json.dumps(expr.name)}"
    if isinstance(expr, Data):
        return f"data {json.dumps(expr.key)} : {expr.type} sha {json.dumps(expr.digest)}"
    if isinstance(expr, Concat):
        return f"concat[{expr.axis}](" + ", ".join(expr_str(a) for a in expr.args) + ")"
    if isinstance(expr, Transpose):
        return f"transpose({expr_str(expr.arg)})"
    if isinstance(expr, Deinterleave):
        return f"deinterleave[{expr.axis}]({expr_str(expr.arg)})"
    if isinstance(expr, Slice):
        return f"slice[{expr.axis},{expr.start},{expr.end}]({expr_str(expr.arg)})"
    if isinstance(expr, MatMul):
        return f"matmul({expr_str(expr.lhs)}, {expr_str(expr.rhs)})"
    if isinstance(expr, Scale):
        return f"scale[{expr.axis}]({expr_str(expr.arg)}, {expr_str(expr.by)})"
    if isinstance(expr, Cast):
        return f"cast[{expr.dtype}]({expr_str(expr.arg)})"
    raise TypeError(f"not a weight expression: {expr!r}")


def tensor_digest(tensor) -> str:
    """A digest of a tensor's dtype, shape and bytes (for weight fingerprints)."""
    import torch

    t = tensor.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    h = hashlib.sha256(f"{tensor.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().reshape(-1).view("uint8"))  # the bytes in place: no copy of a large weight
    return h.hexdigest()[:16]
