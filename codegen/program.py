"""What a program is, and the one registry of backends that build programs.

``Program`` states everything the runtime, ``CompiledModel`` and the CLI may call on a program; every backend's
program class defines each of its members (docs/backends.md). ``BACKENDS`` names the backends in the order the CLI
shows them, and ``build_program`` builds one, importing its module only then.

This module imports neither torch nor a backend when it is imported: the CLI reads ``BACKENDS`` and
``DEFAULT_MAX_SEQ_LEN`` from it before it has a reason to load either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from lowerlm.ir.graph import Graph, Module

BACKENDS = ("auto", "onnx", "triton", "reference")
DEFAULT_MAX_SEQ_LEN = 2048  # compile_model's max_seq_len (the caches' T) unless a learned position table is shorter


@runtime_checkable
class Program(Protocol):
    """A module's graphs ready to run on one backend."""

    module: Module  # the module whose graphs ``run`` runs (the runtime reads its prefill's inputs)
    device: torch.device  # where inputs, state buffers and outputs live
    device_sampling: bool  # the runtime samples on this device with codegen/triton/sampling.py (not on the host)

    def run(self, graph: str | Graph, inputs: Mapping[str, torch.Tensor] | list,
            state: Mapping[str, torch.Tensor] | None = None, symbols: Mapping[str, int] | None = None,
            inplace: bool = False, observe: Callable | None = None) -> tuple[list, dict]:
        """Run one graph: (its outputs, the final version of each state), state written in place if ``inplace``."""
        ...

    def prefill_chunk(self, s: int) -> int | None:
        """Tokens per prefill call for prompts ``s`` tokens long, or None to prefill them in one call."""
        ...

    def prepare(self) -> None:
        """Build now what the program would build on first use (ONNX sessions); a no-op where nothing is deferred."""
        ...


def check_backend(backend: str, *, weight_bits: int | None = None) -> None:
    """Refuse an unknown backend, or an option the backend does not take (``compile_model`` asks before tracing,
    ``build_program`` again)."""
    from lowerlm.ir.errors import CompileError

    if backend not in BACKENDS:
        raise CompileError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    if weight_bits is not None and backend not in ("onnx", "auto"):
        raise CompileError(f"weight_bits quantizes weights for the ONNX backend; backend '{backend}' runs the "
                           "model's own precision")


def preferred(device=None) -> str:
    """The backend ``auto`` prefers on ``device`` (default: the GPU if there is one): "triton" on a CUDA device,
    else "onnx"."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return "triton" if device.type == "cuda" else "onnx"


def fusing_backend(backend: str, device=None) -> str:
    """The backend whose pass tail a compile for ``backend`` runs: itself, or for ``auto`` the one it prefers."""
    return preferred(device) if backend == "auto" else backend


def build_program(backend: str, module: Module, weights: Mapping, device=None, *, weight_bits: int | None = None,
                  cache: bool = True, progress: Callable[[str], None] | None = None) -> Program:
    """The program of ``backend`` for ``module`` and ``weights`` (param name -> tensor).

    ``device``: where it runs (Triton: the GPU by default; reference: the CPU by default, weights moved there; auto:
    picks its preferred backend by it; ONNX Runtime is bound to host memory and ignores it). ``weight_bits``: 4 or 8,
    quantized weights (onnx and auto only). ``cache``: the ONNX compile cache and Triton's generated kernel sources.
    ``progress(message)``: told about each graph ONNX lowers (onnx and auto)."""
    from lowerlm.ir.ops import COLLECTIVES

    check_backend(backend, weight_bits=weight_bits)
    if backend == "auto":
        from lowerlm.codegen.auto import AutoProgram

        return AutoProgram(module, weights, device, weight_bits=weight_bits, cache=cache, progress=progress)
    if backend == "onnx" and any(n.op in COLLECTIVES for g in module.graphs for n in g.nodes):
        from lowerlm.codegen.auto import AutoProgram  # a tensor-parallel shard: ONNX sessions, collectives between

        return AutoProgram(module, weights, "cpu", weight_bits=weight_bits, cache=cache, progress=progress,
                           collectives_only=True)
    if backend == "onnx":
        from lowerlm.codegen.onnx.program import OnnxProgram

        return OnnxProgram(module, weights, weight_bits=weight_bits, cache=cache, progress=progress)
    if backend == "triton":
        from lowerlm.codegen.triton.program import TritonProgram

        return TritonProgram(module, weights, device, cache=cache)
    from lowerlm.codegen.reference import ReferenceProgram

    if device is not None:
        weights = {n: w.to(device) for n, w in weights.items()}
    return ReferenceProgram(module, weights, device=device)
