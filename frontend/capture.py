"""Module capture: blocks that tracing would unroll or that change between library versions (transformers' MoE
experts, frontend/moe.py; a user's own ``Capture``) are swapped, before export, for a ``torch.library.custom_op``
and become one IR node whatever their implementation.

A ``Capture`` says which modules it takes (``matches``), how many of ``forward``'s leading arguments are the op's
tensor inputs (``args``: one for a block on the hidden states; transformers' experts take three), which of their
tensors the op reads (``weights``: names of parameters or buffers, passed as op inputs so export lifts them to
weights; a None name leaves an optional input slot empty), the IR attributes (``attrs``), the IR op, and the
result's shape (``fake``, default: like the first input). During export each matched module's ``forward`` calls
``torch.ops.lowerlm.<name>(xs, weights, key)``; in eager mode that runs the module's own forward (``key`` finds it),
under export the fake implementation gives the result's shape. The importer turns the op into
``op(*xs, *weights) {attrs}`` with the module path as its source.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import types
from dataclasses import dataclass
from typing import Callable

import torch

from lowerlm.ir.ops import Op


@dataclass(frozen=True)
class Capture:
    name: str
    matches: Callable[[torch.nn.Module], bool]
    weights: Callable[[torch.nn.Module], list]
    attrs: Callable[[torch.nn.Module], dict]
    op: Op
    fake: Callable | None = None  # (xs, weights) -> empty tensor of the result's shape and dtype
    args: int = 1  # forward's leading arguments that are the op's tensor inputs
    # per weight, None or a function of its Param giving the weight expression the op reads instead (a layout the
    # op takes otherwise: gpt-oss's transposed, interleaved experts), evaluated once at load
    layout: Callable[[torch.nn.Module], list] | None = None


_CAPTURES: dict = {}  # op name -> Capture, for the importer
_MODULES: dict = {}  # key -> (module, original forward), for the eager implementation
_KEYS = itertools.count()


def _define(cap: Capture):
    """The custom op for a capture, defined once per name."""
    qualname = f"lowerlm::{cap.name}"
    if cap.name in _CAPTURES:
        _CAPTURES[cap.name] = cap
        return getattr(torch.ops.lowerlm, cap.name)

    @torch.library.custom_op(qualname, mutates_args=())
    def op(xs: list[torch.Tensor], weights: list[torch.Tensor], key: int) -> torch.Tensor:
        module, forward = _MODULES[key]
        return forward(*xs).clone()

    @op.register_fake
    def _(xs, weights, key):
        fake = _CAPTURES[cap.name].fake
        return fake(xs, weights) if fake is not None else torch.empty_like(xs[0])

    _CAPTURES[cap.name] = cap
    return getattr(torch.ops.lowerlm, cap.name)


@contextlib.contextmanager
def captured(model: torch.nn.Module, captures: list):
    """Within the context, every module a capture matches runs as its custom op."""
    swapped = []
    try:
        for cap in captures:
            op = _define(cap)
            for path, module in model.named_modules():
                if not cap.matches(module) or any(path.startswith(p + ".") for p, _ in swapped):
                    continue
                key = next(_KEYS)
                original = module.forward
                _MODULES[key] = (module, original)
                names = cap.weights(module)
                signature = inspect.signature(original)

                # tensors are looked up on the module at call time so that export sees its own parameters
                def forward(self, *args, _op=op, _names=names, _key=key, _sig=signature, _n=cap.args, **kwargs):
                    xs = list(_sig.bind(*args, **kwargs).arguments.values())[:_n]
                    params = dict(self.named_parameters())
                    return _op(xs, [params[n] if n in params else self.get_buffer(n) for n in _names if n is not None],
                               _key)

                module.forward = types.MethodType(forward, module)
                swapped.append((path, (module, original, key)))
        yield
    finally:
        for _, (module, original, key) in swapped:
            module.forward = original
            _MODULES.pop(key, None)


def captured_module(node) -> tuple | None:
    """(Capture, module) for an fx node calling a lowerlm custom op."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "lowerlm":
        return None
    cap = _CAPTURES.get(target._opname)
    key = node.args[2]
    if cap is None or key not in _MODULES:
        return None
    return cap, _MODULES[key][0]


def convert_captured(imp, node):
    """The IR for a captured module's op, or None when the node is no capture."""
    found = captured_module(node)
    if found is None:
        return None
    cap, module = found
    xs, weights = node.args[0], iter(node.args[1])
    names = cap.weights(module)
    layout = cap.layout(module) if cap.layout is not None else [None] * len(names)
    # a None name is an absent optional input: its slot stays empty
    inputs = [_weight(imp, next(weights), fn) if n is not None else None for n, fn in zip(names, layout)]
    return imp.emit(node, cap.op, [imp.value(x) for x in xs] + inputs, cap.attrs(module))


def _weight(imp, node, fn) -> str:
    """The IR value of a captured module's weight: its param, or the weight expression ``fn`` makes of it."""
    if fn is None:
        return imp.value(node)
    from lowerlm.frontend.importer import short_name, tensor_type
    from lowerlm.ir.weights import Param, weight_type

    name = imp.param_name(node)
    imp.params[name] = tensor_type(node, imp.symbols)  # in the weight table, read only through the expression
    expr = fn(Param(name))
    return imp.b.add(Op.WEIGHT, [], {"expr": expr}, types=[weight_type(expr, imp.params)],
                     name=short_name(name) + "_layout", source=(imp.path(node),))
