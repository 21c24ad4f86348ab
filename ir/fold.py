"""Running one node on concrete tensors with its row's implementation (``ir/compute.py`` and the lambdas of
``ir/opdefs.py``), and constant folding of the core ops (``Trait.FOLDS``).

Canonicalization folds constants with it, and the reference backend runs every op through it. torch is imported
when an implementation first runs, not when ``lowerlm.ir`` is imported.
"""

from __future__ import annotations

from lowerlm.ir.graph import Node
from lowerlm.ir.opdefs import OPDEFS, AttrKind, Trait, ops_with
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import evaluate
from lowerlm.ir.types import TensorType

# constant folding makes constants of at most this many elements
FOLD_LIMIT = 4096


def constant_tensor(node: Node):
    """The tensor a ``constant`` node holds."""
    return run_op(node, [])


def constant_attrs(tensor, type_: TensorType) -> dict:
    """Attributes of a ``constant`` node holding ``tensor``: one value when all are equal, else all of them."""
    flat = tensor.detach().reshape(-1).tolist()
    if type_.dtype.is_float:
        flat = [float(v) for v in flat]
    elif type_.dtype.value == "bool":
        flat = [int(v) for v in flat]
    uniform = len(flat) > 0 and all(repr(v) == repr(flat[0]) for v in flat)
    value = flat[0] if uniform else tuple(flat)
    return {"value": value, "dtype": type_.dtype, "shape": tuple(type_.shape)}


def by_slot(node: Node, args: list) -> list:
    """The present inputs' values ``args`` placed in the node's input slots, None for absent optional ones."""
    it = iter(args)
    return [next(it) if v is not None else None for v in node.inputs]


def run_op(node: Node, args: list, env: dict | None = None, inplace: bool = False):
    """Evaluate any op but param/weight with its row's ``impl``: ``args`` holds the present inputs in input order
    (absent optional ones skipped), ``env`` binds shape symbols (symbolic dimension attributes are evaluated
    here), ``inplace`` lets a state-writing op update its state input. A tensor, or a tuple for multi-result ops."""
    d = OPDEFS[node.op]
    if d.impl is None:
        raise NotImplementedError(f"{node.op} has no implementation: the program evaluates it from the weights")
    attrs = node.all_attrs()
    for name, spec in d.attrs.items():
        if spec.kind is AttrKind.DIM:
            attrs[name] = evaluate(attrs[name], env or {})
        elif spec.kind is AttrKind.DIMS:
            attrs[name] = [evaluate(x, env or {}) for x in attrs[name]]
    if d.writes:
        attrs["inplace"] = inplace
    return d.impl(*by_slot(node, args), **attrs)


CORE_OPS = ops_with(Trait.FOLDS)


def run_core(node: Node, args: list, env: dict | None = None):
    """Evaluate a core op on tensors; ``args`` holds the present inputs in input order (absent optional inputs
    are skipped), ``env`` binds shape symbols. Returns a tensor, or a tuple for multi-result ops."""
    if node.op not in CORE_OPS:
        raise NotImplementedError(f"{node.op} is not a core op")
    return run_op(node, args, env)


def fold(node: Node, args: list):
    """The results of ``node`` on constant tensors, or None when they are too large or symbolic."""
    if node.op not in CORE_OPS or node.op is Op.CONSTANT:
        return None
    for r in node.results:
        n = r.type.numel
        if not isinstance(n, int) or n > FOLD_LIMIT:
            return None
    out = run_core(node, args)
    return out if isinstance(out, tuple) else (out,)
