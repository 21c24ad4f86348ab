"""What the GPU would compile, checked without a GPU: the kernel launches a workload makes, recorded under Triton's
interpreter, then compiled by Triton's real compiler for a GPU target (sm_90 by default) in a process without the
interpreter, with registers and spills from ptxas.

The interpreter runs kernels as numpy programs, so it accepts code the compiler rejects (checked: ``lo = 0`` then
``if w > 0: lo = tl.maximum(v - w, 0)`` with an int64 ``v`` runs there and fails to compile, "the then block
redefines it as int64") and cannot show shared memory or register spills. Each launch is recorded
as the JIT would specialise it — argument types, 16-divisibility of pointers and integers, integers equal to 1
and None as constants, constexpr values, the evaluated grid — so compiling the records compiles what a GPU run
would. Recording can also skip execution (``execute=False``) to see the launches of real model shapes in seconds.

    with Recorder() as rec:      # under TRITON_INTERPRET=1
        program.run(...)
    results = compile_launches(unique(rec.launches))   # [{"kernel", "ok", "error", "regs", "spills", ...}]

``python -m lowerlm.codegen.triton.aot launches.json`` is the compiling side (one JSON line per kernel out).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowerlm.ir.abi import DECODE, INPUT_IDS, POSITIONS, SEQ_LENS

DEFAULT_TARGET = "cuda:90:32"  # H100: backend, compute capability, warp size
OPTIONS = ("num_warps", "num_stages")  # launch keywords that are compile options, not kernel arguments


@dataclass
class Launch:
    """One kernel launch as the JIT specialises it."""

    module: str  # the kernel's module name
    file: str  # its source file (a generated kernel without a compile cache has none: compile_launches writes it)
    name: str
    signature: dict  # parameter -> Triton type ("*bf16", "i32", "fp32", "u1") or "constexpr"
    constexprs: dict  # parameter -> value
    divisible: list  # parameters specialised as divisible by 16
    grid: list
    scalars: dict = field(default_factory=dict)  # non-constexpr scalar arguments' values (frozen in a CUDA graph)
    options: dict = field(default_factory=dict)  # compile options given at the launch (num_warps, num_stages)

    @property
    def key(self) -> tuple:
        """What makes a distinct compiled kernel."""
        return (self.file, self.name, json.dumps(self.signature, sort_keys=True),
                json.dumps(self.constexprs, sort_keys=True, default=str), tuple(sorted(self.divisible)),
                json.dumps(self.options, sort_keys=True))


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def specialise(fn, args: tuple, kwargs: dict, grid) -> Launch:
    """The launch of the Python kernel function ``fn`` with these arguments, as the JIT specialises it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args))
    bound.update(kwargs)
    signature, constexprs, divisible, scalars = {}, {}, [], {}
    for name, param in params.items():
        value = bound[name] if name in bound else param.default
        if _is_constexpr(param):
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # integers equal to 1 and None
            constexprs[name] = key
        elif key == "D":
            divisible.append(name)
        if not isinstance(value, torch.Tensor):
            scalars[name] = value
    if callable(grid):
        grid = grid({**bound, **constexprs})
    grid = [int(g) for g in grid]
    options = {name: kwargs[name] for name in OPTIONS if name in kwargs}
    return Launch(fn.__module__, inspect.getsourcefile(fn), fn.__name__, signature, constexprs, divisible, grid,
                  scalars, options)


class Recorder:
    """Records every Triton launch made inside ``with Recorder():`` (Triton's interpreter must be on, i.e.
    ``TRITON_INTERPRET=1`` before the kernels were defined). ``execute=False`` records without running, with the
    launchers choosing what they choose on a GPU (``codegen.triton.interpreted``): outputs stay uninitialised,
    which is enough to see the launches a model's shapes make on the GPU."""

    def __init__(self, execute: bool = True):
        self.execute = execute
        self.launches: list[Launch] = []

    def __enter__(self) -> Recorder:
        from triton.runtime.interpreter import InterpretedFunction

        from lowerlm.codegen import triton as backend

        self._gpu_flag = backend._RECORDING_FOR_GPU
        self._was = self._gpu_flag[0]
        self._gpu_flag[0] = not self.execute  # nothing runs: launchers choose their GPU variants

        self._cls, self._run = InterpretedFunction, InterpretedFunction.run
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            if not warmup:
                recorder.launches.append(specialise(fn_self.fn, args, kwargs, grid))
            if recorder.execute:
                return recorder._run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            return None

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc) -> None:
        self._cls.run = self._run
        self._gpu_flag[0] = self._was


def unique(launches: list) -> list[Launch]:
    """The first launch of each distinct compiled kernel, in launch order."""
    first: dict = {}
    for launch in launches:
        first.setdefault(launch.key, launch)
    return list(first.values())


class TorchOps(TorchDispatchMode):
    """Counts the torch ops run inside it that would launch a GPU kernel (views, allocations and metadata queries
    launch none) and refuses the ones that read device data on the host (``.item()``, ``bool(t)``, ``nonzero``):
    each is a host synchronisation, and inside a CUDA graph capture an error."""

    SYNCS = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "allclose", "masked_select",
                       "unique_dim", "_unique2", "unique_consecutive", "item"})
    FREE = frozenset({"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "sym_size",
                      "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous", "set_"})

    def __init__(self):
        super().__init__()
        self.launches: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCS:
            raise RuntimeError(f"host synchronisation: aten.{name} reads device data on the host")
        if not func.is_view and name not in self.FREE:
            self.launches.append(name)
        return func(*args, **(kwargs or {}))


def decode_step_launches(cm, batch: int, position: int) -> tuple:
    """(Triton launches, kernel-launching torch ops) of one decode step of the compiled model ``cm`` for ``batch``
    sequences at ``position``, recorded as a GPU makes them without running, after one warm-up step (as before a
    capture: one-time allocations happen there)."""
    dev = cm.program.device
    positions = torch.full((batch, 1), position, dtype=torch.long, device=dev)
    inputs = {INPUT_IDS: torch.zeros(batch, 1, dtype=torch.long, device=dev), POSITIONS: positions,
              SEQ_LENS: (positions[:, 0] + 1).to(torch.int32)}
    state = {name: buf[:batch] for name, buf in cm.generator.state.items()}
    with Recorder(execute=False):
        cm.program.run(DECODE, inputs, state, inplace=True)
    with Recorder(execute=False) as rec, TorchOps() as ops:
        cm.program.run(DECODE, inputs, state, inplace=True)
    return rec.launches, ops.launches


def compile_launches(launches: list, target: str = DEFAULT_TARGET, env: dict | None = None,
                     timeout: float = 900) -> list[dict]:
    """Compile each launch's kernel with Triton's compiler for ``target`` ("cuda:90:32") in a fresh process
    without the interpreter; one result dict per launch, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        records = []
        for launch in launches:
            record = asdict(launch)
            if not os.path.exists(launch.file):  # a generated kernel kept in memory (no compile cache)
                record["file"] = os.path.join(tmp, f"{launch.module}.py")
                with open(record["file"], "w") as f:
                    f.write(inspect.getsource(sys.modules[launch.module]))
            records.append(record)
        path = os.path.join(tmp, "launches.json")
        with open(path, "w") as f:
            json.dump(records, f, default=str)
        child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        child_env.update(env or {})
        proc = subprocess.run([sys.executable, "-m", "lowerlm.codegen.triton.aot", path, "--target", target],
                              capture_output=True, text=True, env=child_env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"the Triton compile process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _load(module: str, file: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        spec = importlib.util.spec_from_file_location(module, file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        spec.loader.exec_module(mod)
        return mod


def _resources(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spill bytes, from ptxas's verbose report on the kernel's PTX."""
    from triton.backends.nvidia import compiler as nvidia

    tool = nvidia.get_ptxas(arch).path  # the one Triton itself assembles this arch with
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([tool, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    found = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else None  # noqa: E731
    return {"regs": found(r"Used (\d+) registers"), "stack": found(r"(\d+) bytes stack frame"),
            "spills": found(r"(\d+) bytes spill stores")}


def _compile_one(record: dict, target) -> dict:
    import triton

    fn = getattr(_load(record["module"], record["file"]), record["name"])
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in record["divisible"]}
    src = triton.compiler.ASTSource(fn=fn, signature=record["signature"], constexprs=record["constexprs"],
                                    attrs=attrs)
    start = time.perf_counter()
    kernel = triton.compile(src, target=target, options=record.get("options", {}))
    out = {"seconds": round(time.perf_counter() - start, 3), "shared": kernel.metadata.shared,
           "num_warps": kernel.metadata.num_warps, "num_stages": kernel.metadata.num_stages}
    if "ptx" in kernel.asm:
        out.update(_resources(kernel.asm["ptx"], target.arch))
    return out


def main(argv=None) -> None:
    import argparse

    import triton
    from triton.backends.compiler import GPUTarget

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launches", help="JSON list of recorded launches")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="backend:arch:warp_size, e.g. cuda:90:32")
    args = parser.parse_args(argv)
    backend, arch, warp = args.target.split(":")
    target = GPUTarget(backend, int(arch), int(warp))
    with open(args.launches) as f:
        records = json.load(f)
    for record in records:
        result = {"kernel": record["name"], "triton": triton.__version__, "target": args.target}
        try:
            result.update(ok=True, **_compile_one(record, target))
        except Exception as e:  # noqa: BLE001  (every failure is reported, the next launch still compiles)
            result.update(ok=False, error=f"{type(e).__name__}: {e}"[-2000:])
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
