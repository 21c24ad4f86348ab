"""Generated Triton for the element-wise chains the fusions leave (Gemma's ``1 + w``, a model's own activation):
a chain of single-use element-wise nodes becomes one kernel that reads each outside input once (broadcast
through strides, 0 on broadcast axes) and writes only the chain's last result.

Each node's result is rounded to its IR dtype, as torch rounds op by op, so bf16 chains match eager. The source
is generated from the chain's structure, written to the compile cache (``<cache>/triton/chain_<digest>.py``,
atomically) and imported from there, so a warm compile only imports it. Without a compile cache
(``use_cache=False``, or a cache that cannot be written) the module is made from the source in memory, with a
loader that hands the source to ``inspect`` (Triton reads a kernel's source through it): nothing is written.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import sys
import warnings

import torch
import triton

from lowerlm.ir.cache import atomic_write, cache_root
from lowerlm.ir.dtypes import DType
from lowerlm.ir.graph import Node
from lowerlm.ir.ops import Op

_TL_DTYPE = {DType.F32: "tl.float32", DType.F16: "tl.float16", DType.BF16: "tl.bfloat16", DType.F64: "tl.float64",
             DType.I64: "tl.int64", DType.I32: "tl.int32", DType.I16: "tl.int16", DType.I8: "tl.int8",
             DType.U8: "tl.uint8", DType.BOOL: "tl.int1"}
SUPPORTED = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.EXP, Op.RSQRT, Op.POW, Op.SILU, Op.GELU,
                       Op.SIGMOID, Op.TANH, Op.COS, Op.SIN, Op.CAST})


def _pow(x: str, e: float) -> str:
    if float(e).is_integer() and 0 <= e <= 4:
        return "(" + " * ".join([x] * int(e)) + ")" if e else "1.0"
    if e == 0.5:
        return f"tl.sqrt({x})"
    if e == -1:
        return f"(1.0 / {x})"
    return f"tl.exp({e!r} * tl.log({x}))"


def _expr(node: Node, a: list) -> str:
    op = node.op
    if op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV):
        return f"({a[0]} {dict([(Op.ADD, '+'), (Op.SUB, '-'), (Op.MUL, '*'), (Op.DIV, '/')])[op]} {a[1]})"
    x = a[0]
    return {
        Op.NEG: lambda: f"(-{x})",
        Op.EXP: lambda: f"tl.exp({x})",
        Op.RSQRT: lambda: f"(1.0 / tl.sqrt({x}))",
        Op.POW: lambda: _pow(x, node.attr("exponent")),
        Op.SILU: lambda: f"({x} * tl.sigmoid({x}))",
        Op.GELU: lambda: (f"(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))"
                          if node.attr("approximate") == "none" else
                          f"(0.5 * {x} * (2.0 * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x}))))"),
        Op.SIGMOID: lambda: f"tl.sigmoid({x})",
        Op.TANH: lambda: f"(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)",
        Op.COS: lambda: f"tl.cos({x})",
        Op.SIN: lambda: f"tl.sin({x})",
        Op.CAST: lambda: x,
    }[op]()


def chain_source(nodes: list, inputs: list, rank: int) -> str:
    """Kernel source for ``nodes`` (topological order; the last is the result) over outside ``inputs``
    (value names, in argument order) broadcast to an output of ``rank`` axes."""
    dims = [f"d{i}" for i in range(rank)]
    strides = [f"s{j}_{i}" for j in range(len(inputs)) for i in range(rank)]
    lines = [
        "import triton", "import triton.language as tl", "", "",
        "@triton.jit",
        f"def chain_kernel({', '.join([f'in{j}' for j in range(len(inputs))] + ['out', 'numel'] + dims + strides)}, "
        "BLOCK: tl.constexpr):",
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < numel",
        "    rem = offs",
    ]
    for i in reversed(range(rank)):
        lines.append(f"    i{i} = rem % d{i}" if i else f"    i{i} = rem")
        if i:
            lines.append(f"    rem = rem // d{i}")
    names = {}
    for j, v in enumerate(inputs):
        index = " + ".join(f"i{i} * s{j}_{i}" for i in range(rank)) or "0"
        lines.append(f"    x{j} = tl.load(in{j} + {index}, mask=mask).to(tl.float32)")
        names[v] = f"x{j}"
    for k, node in enumerate(nodes):
        expr = _expr(node, [names[i] for i in node.args])
        dtype = _TL_DTYPE[node.results[0].type.dtype]
        lines.append(f"    v{k} = ({expr}).to({dtype}).to(tl.float32)  # {node.op.value}")
        names[node.name] = f"v{k}"
    lines.append(f"    tl.store(out + offs, v{len(nodes) - 1}.to(out.dtype.element_ty), mask=mask)")
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
