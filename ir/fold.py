"""Torch semantics of the core ops, on concrete tensors.

Canonicalization folds constants with it, and the reference backend runs every core op through it (the LLM ops
live in ``codegen/reference.py``). torch is imported when a function here first runs, not when ``lowerlm.ir`` is
imported.
"""

from __future__ import annotations

from lowerlm.ir.graph import Node
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import evaluate
from lowerlm.ir.types import TensorType

# constant folding makes constants of at most this many elements
FOLD_LIMIT = 4096


def _torch():
    import torch

    return torch


def constant_tensor(node: Node):
    """The tensor a ``constant`` node holds."""
    torch = _torch()
    t = node.results[0].type
    value = node.attrs["value"]
    if isinstance(value, tuple):
        return torch.tensor(value, dtype=t.dtype.to_torch()).reshape(t.shape)
    return torch.full(t.shape, value, dtype=t.dtype.to_torch())


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


def _dims(dims, env):
    return [evaluate(d, env) for d in dims]


def _run(node: Node, args: list, env: dict):
    torch = _torch()
    F = torch.nn.functional
    op, a = node.op, node.all_attrs()
    x = args[0] if args else None
    if op is Op.CONSTANT:
        return constant_tensor(node)
    if op is Op.ADD:
        return x + args[1]
    if op is Op.SUB:
        return x - args[1]
    if op is Op.MUL:
        return x * args[1]
    if op is Op.DIV:
        return x / args[1]
    if op is Op.NEG:
        return -x
    if op is Op.EXP:
        return torch.exp(x)
    if op is Op.RSQRT:
        return torch.rsqrt(x)
    if op is Op.POW:
        e = a["exponent"]
        return x.pow(int(e) if float(e).is_integer() else e)
    if op is Op.SILU:
        return F.silu(x)
    if op is Op.GELU:
        return F.gelu(x, approximate=a["approximate"])
    if op is Op.SIGMOID:
        return torch.sigmoid(x)
    if op is Op.TANH:
        return torch.tanh(x)
    if op is Op.COS:
        return torch.cos(x)
    if op is Op.SIN:
        return torch.sin(x)
    if op is Op.CAST:
        return x.to(a["dtype"].to_torch())
    if op is Op.MEAN:
        return x.mean(dim=list(a["dims"]), keepdim=a["keepdim"])
    if op is Op.SUM:
        return x.sum(dim=list(a["dims"]), keepdim=a["keepdim"])
    if op is Op.SOFTMAX:
        return torch.softmax(x, dim=a["dim"])
    if op is Op.ARGMAX:
        return torch.argmax(x, dim=a["dim"], keepdim=a["keepdim"])
    if op is Op.TOPK:
        out = torch.topk(x, a["k"], dim=a["dim"], largest=a["largest"], sorted=True)
        return out.values, out.indices
    if op is Op.RESHAPE:
        return x.reshape(_dims(a["shape"], env))
    if op is Op.TRANSPOSE:
        return x.permute(*a["perm"])
    if op is Op.EXPAND:
        return x.expand(_dims(a["shape"], env))
    if op is Op.CONCAT:
        return torch.cat(args, dim=a["dim"])
    if op is Op.SPLIT:
        return tuple(torch.split(x, _dims(a["sizes"], env), dim=a["dim"]))
    if op is Op.SLICE:
        start, end = evaluate(a["start"], env), evaluate(a["end"], env)
        return x[(slice(None),) * (a["dim"] % x.dim()) + (slice(start, end, a["step"]),)]
    if op is Op.GATHER:
        return torch.gather(x, a["dim"], args[1])
    if op is Op.EMBEDDING:
        return F.embedding(args[1], x)
    if op is Op.LINEAR:
        out = F.linear(x, args[1], args[2])
        if args[3] is not None:
            out = out + args[3]
        return out
    if op is Op.MATMUL:
        return torch.matmul(x, args[1])
    raise NotImplementedError(op)


CORE_OPS = frozenset({
    Op.CONSTANT, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.EXP, Op.RSQRT, Op.POW, Op.SILU, Op.GELU, Op.SIGMOID,
    Op.TANH, Op.COS, Op.SIN, Op.CAST, Op.MEAN, Op.SUM, Op.SOFTMAX, Op.ARGMAX, Op.TOPK, Op.RESHAPE, Op.TRANSPOSE,
    Op.EXPAND, Op.CONCAT, Op.SPLIT,
    Op.SLICE, Op.GATHER, Op.EMBEDDING, Op.LINEAR, Op.MATMUL,
})


def by_slot(node: Node, args: list) -> list:
    """The present inputs' values ``args`` placed in the node's input slots, None for absent optional ones."""
    it = iter(args)
    return [next(it) if v is not None else None for v in node.inputs]


def run_core(node: Node, args: list, env: dict | None = None):
    """Evaluate a core op on tensors; ``args`` holds the present inputs in input order (absent optional inputs
    are skipped), ``env`` binds shape symbols. Returns a tensor, or a tuple for multi-result ops."""
    if node.op not in CORE_OPS:
        raise NotImplementedError(f"{node.op} is not a core op")
    return _run(node, by_slot(node, args), env or {})


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
