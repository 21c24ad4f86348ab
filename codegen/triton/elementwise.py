"""Generated Triton for ``ew_chain`` nodes (the Triton tail's ``fuse_ew_chains`` makes one of every single-use
chain of float element-wise nodes, a lone node included): the chain's body becomes one kernel that reads each
operand once (broadcast through strides, 0 on broadcast axes) and writes only the body's result.

``EXPRS`` holds each element-wise op's Triton expression, one line per op. Each step of the body is rounded to its
IR dtype, as torch rounds op by op, so bf16 chains match eager. The source is generated from the body and the
operands' dtypes, written to the compile cache (``<cache>/triton/chain_<digest>.py``, atomically) and imported from
there, so a warm compile only imports it. Without a compile cache (``use_cache=False``, or a cache that cannot be
written) the module is made from the source in memory, with a loader that hands the source to ``inspect`` (Triton
reads a kernel's source through it): nothing is written.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Callable

import torch
import triton

from lowerlm.ir.body import Apply, steps, types
from lowerlm.ir.cache import atomic_write, cache_root
from lowerlm.ir.dtypes import DType
from lowerlm.ir.ops import Op
from lowerlm.ir.types import TensorType

_TL_DTYPE = {DType.F32: "tl.float32", DType.F16: "tl.float16", DType.BF16: "tl.bfloat16", DType.F64: "tl.float64",
             DType.I64: "tl.int64", DType.I32: "tl.int32", DType.I16: "tl.int16", DType.I8: "tl.int8",
             DType.U8: "tl.uint8", DType.BOOL: "tl.int1"}


def _pow(x: str, e: float) -> str:
    if float(e).is_integer() and 0 <= e <= 4:
        return "(" + " * ".join([x] * int(e)) + ")" if e else "1.0"
    if e == 0.5:
        return f"tl.sqrt({x})"
    if e == -1:
        return f"(1.0 / {x})"
    return f"tl.exp({e!r} * tl.log({x}))"


def _gelu(x: str, approximate: str) -> str:
    if approximate == "none":
        return f"(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))"
    return f"(0.5 * {x} * (2.0 * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x}))))"


def _expm1(x: str) -> str:
    """e^x - 1 without exp's cancellation near 0: its Taylor series to x^4 there (error below x^5 / 120)."""
    small = f"({x} * (1.0 + {x} * (0.5 + {x} * (0.16666666666666666 + {x} * 0.041666666666666664))))"
    return f"tl.where(tl.abs({x}) < 0.01, {small}, tl.exp({x}) - 1.0)"


def _softplus(x: str, beta: float, threshold: float) -> str:
    bx = f"({beta!r} * {x})"
    return f"tl.where({bx} > {threshold!r}, {x}, tl.log(1.0 + tl.exp({bx})) / {beta!r})"


# op -> expression(argument expressions, attributes with defaults), computed in f32; the step's rounding to its
# dtype is added around it (a cast is that rounding alone)
EXPRS: dict[Op, Callable[[list, dict], str]] = {
    Op.ADD: lambda a, at: f"({a[0]} + {a[1]})",
    Op.SUB: lambda a, at: f"({a[0]} - {a[1]})",
    Op.MUL: lambda a, at: f"({a[0]} * {a[1]})",
    Op.DIV: lambda a, at: f"({a[0]} / {a[1]})",
    Op.NEG: lambda a, at: f"(-{a[0]})",
    Op.EXP: lambda a, at: f"tl.exp({a[0]})",
    Op.RSQRT: lambda a, at: f"(1.0 / tl.sqrt({a[0]}))",
    Op.POW: lambda a, at: _pow(a[0], at["exponent"]),
    Op.SILU: lambda a, at: f"({a[0]} * tl.sigmoid({a[0]}))",
    Op.GELU: lambda a, at: _gelu(a[0], at["approximate"]),
    Op.SIGMOID: lambda a, at: f"tl.sigmoid({a[0]})",
    Op.TANH: lambda a, at: f"(2.0 * tl.sigmoid(2.0 * {a[0]}) - 1.0)",
    Op.COS: lambda a, at: f"tl.cos({a[0]})",
    Op.SIN: lambda a, at: f"tl.sin({a[0]})",
    Op.RELU: lambda a, at: f"tl.where({a[0]} < 0.0, 0.0, {a[0]})",
    Op.MINIMUM: lambda a, at: f"tl.where(({a[0]} < {a[1]}) | ({a[0]} != {a[0]}), {a[0]}, {a[1]})",
    Op.MAXIMUM: lambda a, at: f"tl.where(({a[0]} > {a[1]}) | ({a[0]} != {a[0]}), {a[0]}, {a[1]})",
    Op.SOFTPLUS: lambda a, at: _softplus(a[0], at["beta"], at["threshold"]),
    Op.EXPM1: lambda a, at: _expm1(a[0]),
    Op.LOG: lambda a, at: f"tl.log({a[0]})",
    Op.FLOOR: lambda a, at: f"tl.floor({a[0]})",
    Op.ABS: lambda a, at: f"tl.abs({a[0]})",
    Op.CAST: lambda a, at: a[0],
}


def chain_source(body: Apply, dtypes: list, rank: int) -> str:
    """Kernel source for an ``ew_chain`` body over operands of ``dtypes`` (IR dtypes, operand order) broadcast to
    an output of ``rank`` axes."""
    n = len(dtypes)
    dims = [f"d{i}" for i in range(rank)]
    strides = [f"s{j}_{i}" for j in range(n) for i in range(rank)]
    lines = [
        "import triton", "import triton.language as tl", "", "",
        "@triton.jit",
        f"def chain_kernel({', '.join([f'in{j}' for j in range(n)] + ['out', 'numel'] + dims + strides)}, "
        "BLOCK: tl.constexpr):",
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < numel",
        "    rem = offs",
    ]
    for i in reversed(range(rank)):
        lines.append(f"    i{i} = rem % d{i}" if i else f"    i{i} = rem")
        if i:
            lines.append(f"    rem = rem // d{i}")
    for j in range(n):
        index = " + ".join(f"i{i} * s{j}_{i}" for i in range(rank)) or "0"
        lines.append(f"    x{j} = tl.load(in{j} + {index}, mask=mask).to(tl.float32)")
    typed = types(body, [TensorType(d, ()) for d in dtypes])  # each step's dtype (shapes do not matter here)
    names: dict = {}
    for k, step in enumerate(steps(body)):
        expr = EXPRS[step.op]([names[id(a)] if isinstance(a, Apply) else f"x{a}" for a in step.args],
                              step.all_attrs())
        lines.append(f"    v{k} = ({expr}).to({_TL_DTYPE[typed[id(step)].dtype]}).to(tl.float32)  # {step.op.value}")
        names[id(step)] = f"v{k}"
    lines.append(f"    tl.store(out + offs, {names[id(body)]}.to(out.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


_LOADED: dict = {}


class _MemoryLoader(importlib.abc.InspectLoader):
    """Executes generated source kept in memory and gives it to ``inspect``/``linecache`` on request."""

    def __init__(self, source: str):
        self.source = source

    def get_source(self, fullname: str) -> str:
        return self.source

    def exec_module(self, module) -> None:
        exec(compile(self.source, module.__spec__.origin, "exec"), module.__dict__)


def load_kernel(source: str, cache: bool = True):
    """The kernel for generated source: from the compile cache (written there on first use), or, with ``cache``
    off or a cache that cannot be written, from memory."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    if digest in _LOADED:
        return _LOADED[digest]
    name = f"lowerlm_chain_{digest}"
    spec = None
    if cache:
        path = cache_root() / "triton" / f"chain_{digest}.py"
        try:
            if not path.exists() or path.read_text() != source:
                atomic_write(path, source)
            spec = importlib.util.spec_from_file_location(name, path)
        except OSError as e:  # a read-only or full cache
            warnings.warn(f"lowerlm: cannot write the Triton kernel cache ({e}); generated kernels stay in memory",
                          stacklevel=2)
    if spec is None:  # a file name that exists nowhere: linecache asks the loader for the source
        spec = importlib.util.spec_from_loader(name, _MemoryLoader(source), origin=f"lowerlm-generated/{name}.py")
        spec.has_location = True
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    _LOADED[digest] = module.chain_kernel
    return module.chain_kernel


def run_chain(kernel, args: list, out_shape: list, out_dtype: torch.dtype, device) -> torch.Tensor:
    """Launch a chain kernel: ``args`` broadcast to ``out_shape`` through strides."""
    out = torch.empty(out_shape, dtype=out_dtype, device=device)
    rank = len(out_shape)
    strides = []
    for t in args:
        t = t.expand(out_shape) if t.dim() <= rank else t
        strides += [t.stride(i) if t.shape[i] != 1 else 0 for i in range(rank)]
    n = out.numel()
    if n:
        kernel[(triton.cdiv(n, 1024),)](*args, out, n, *out_shape, *strides, BLOCK=1024)
    return out
