"""Helpers over torch.fx graphs from torch.export: module paths, normalised arguments, symbolic shapes, and a
small evaluator for sub-graphs (the numeric checks behind raising run the model's own nodes on test inputs)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from lowerlm.ir.dtypes import DType
from lowerlm.ir.errors import UnsupportedOpError
from lowerlm.ir.shapes import Sym
from lowerlm.ir.types import TensorType


def module_path(node: fx.Node, prefix: str = "") -> str:
    """The innermost nn.Module path a node came from, without the export wrapper's own attribute ``prefix``."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]
    path = paths[-1] if paths else ""
    if prefix and (path == prefix or path.startswith(prefix + ".")):
        path = path[len(prefix) + 1:]
    return path


def kwargs_of(node: fx.Node) -> dict:
    """The node's arguments by the op schema's names (``self``, ``other``, …), defaults filled in."""
    out = dict(node.kwargs)
    if isinstance(node.target, torch._ops.OpOverload):
        for i, arg in enumerate(node.target._schema.arguments):
            if i < len(node.args) and not arg.kwarg_only:
                out[arg.name] = node.args[i]
            elif arg.name not in out and arg.has_default_value():
                out[arg.name] = arg.default_value
    return out


def op_name(node: fx.Node) -> str:
    """``aten.add.Tensor`` style name of a call."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def is_tensor(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


class SymbolMap:
    """Maps torch's symbolic sizes (sympy expressions over s0, s1, …) to IR dimensions over named symbols."""

    def __init__(self):
        self.names: dict = {}

    def bind(self, size, name: str) -> None:
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            if getattr(expr, "is_Symbol", False):
                self.names.setdefault(expr, Sym.symbol(name))

    def dim(self, size):
        if isinstance(size, int):
            return size
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            if getattr(expr, "is_number", False):
                return int(expr)
            return self._convert(expr)
        raise UnsupportedOpError(f"dimension {size!r}", hint="only integer and symbolic sizes are supported")

    def _convert(self, expr):
        import sympy
        from torch.utils._sympy.functions import FloorDiv

        if expr in self.names:
            return self.names[expr]
        if isinstance(expr, sympy.Integer):
            return int(expr)
        if isinstance(expr, sympy.Add):
            out = 0
            for a in expr.args:
                out = self._convert(a) + out
            return out
        if isinstance(expr, sympy.Mul):
            out = 1
            for a in expr.args:
                v = self._convert(a)
                out = v * out if isinstance(v, Sym) else out * v
            return out
        if isinstance(expr, sympy.Pow) and isinstance(expr.exp, sympy.Integer) and expr.exp > 0:
            base, out = self._convert(expr.base), 1
            for _ in range(int(expr.exp)):
                out = base * out if isinstance(base, Sym) else out * base
            return out
        if isinstance(expr, FloorDiv) and isinstance(expr.args[1], sympy.Integer) and expr.args[1] > 0:
            return self._convert(expr.args[0]) // int(expr.args[1])
        if expr.is_Symbol:
            raise UnsupportedOpError(f"size symbol {expr}", hint="a size that does not come from the batch or "
                                     "sequence dimension of input_ids (data-dependent shape?)")
        raise UnsupportedOpError(f"size expression {expr}", hint="only +, *, and floor-division by constants")

    def shape(self, shape) -> tuple:
        return tuple(self.dim(s) for s in shape)


def tensor_type(node: fx.Node, symbols: SymbolMap) -> TensorType:
    val = node.meta["val"]
    return TensorType(DType.from_torch(val.dtype), symbols.shape(val.shape))


def fx_eval(target: fx.Node, env: dict):
    """Evaluate ``target`` by running the graph's own ops; ``env`` maps the nodes to start from (placeholders and
    any node to substitute) to values. Iterative, so long chains do not hit the recursion limit."""
    values = dict(env)
    stack = [target]
    while stack:
        node = stack[-1]
        if node in values:
            stack.pop()
            continue
        if node.op != "call_function":
            raise KeyError(f"no value for {node.op} '{node.name}'")
        missing = [a for a in node.all_input_nodes if a not in values]
        if missing:
            stack.extend(missing)
            continue
        args = fx.node.map_arg(node.args, values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
        values[node] = node.target(*args, **kwargs)
        stack.pop()
    return values[target]


def ancestors(node: fx.Node, stop=()) -> set:
    """All nodes ``node`` depends on (not crossing ``stop`` nodes)."""
    seen: set = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in stop:
            stack.extend(n.all_input_nodes)
    return seen


GETITEM = operator.getitem
