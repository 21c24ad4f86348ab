"""Raise RMSNorm: ``w * to(x32 * rsqrt(mean(x32^2, -1, keepdim) + eps), dtype)`` with ``x32 = to(x, f32)``.

The decomposed graph has ``pow, mean, add eps, rsqrt, mul, mul w``, with or without ``_to_copy`` casts around
the normalisation (they vanish when the model runs in f32). The weight must be a 1-D parameter of the input's
dtype; anything else (Gemma's ``1 + w``, a norm without weight) stays core ops.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lowerlm.frontend.fx import kwargs_of
from lowerlm.frontend.importer import Raised
from lowerlm.ir.ops import Op

aten = torch.ops.aten


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _strip_cast(node):
    while _is(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"}:
        node = node.args[0]
    return node


def _match(imp, node: fx.Node):
    if not _is(node, aten.mul.Tensor):
        return None
    for w, y in (node.args, node.args[::-1]):
        if not (isinstance(w, fx.Node) and w.op == "placeholder" and imp.placeholders[w][0] == "PARAMETER"):
            continue
        normed = _strip_cast(y)
        if not _is(normed, aten.mul.Tensor):
            continue
        for x32, r in (normed.args, normed.args[::-1]):
            if not _is(r, aten.rsqrt.default) or not _is(r.args[0], aten.add.Tensor):
                continue
            mean, eps = r.args[0].args
            if not isinstance(eps, float) or not _is(mean, aten.mean.dim):
                continue
            mk = kwargs_of(mean)
            if list(mk["dim"]) != [-1] and list(mk["dim"]) != [mean.args[0].meta["val"].dim() - 1]:
                continue
            if not mk["keepdim"] or not _is(mean.args[0], aten.pow.Tensor_Scalar):
                continue
            sq = mean.args[0]
            if sq.args[0] is not x32 or sq.args[1] != 2 or x32.meta["val"].dtype != torch.float32:
                continue
            x = _strip_cast(x32)
            xv, wv, out = x.meta["val"], w.meta["val"], node.meta["val"]
            if wv.dim() != 1 or not (xv.dtype == wv.dtype == out.dtype) or wv.shape[0] != xv.shape[-1]:
                continue
            return x, w, eps
    return None


def raise_rms_norm(imp) -> dict:
    """RMSNorm blocks of the graph, keyed by the aten node that yields each result."""
    out = {}
    for node in imp.graph.nodes:
        m = _match(imp, node)
        if m is None:
            continue
        x, w, eps = m

        def build(imp, node=node, x=x, w=w, eps=eps):
            return imp.emit(node, Op.RMS_NORM, [imp.value(x), imp.value(w)], {"eps": eps})

        out[node] = Raised([x, w], build, "rms_norm")
    return out
