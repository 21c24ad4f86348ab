"""``backend="auto"``: every graph of the module goes to the device's preferred backend (a CUDA GPU: Triton; a
CPU: ONNX) and falls back to the reference backend when that backend cannot lower it (an op or attribute it
lacks). The choice is made per graph, once, and reported by ``plan()`` (``lowerlm dump-ir`` prints it).
"""

from __future__ import annotations

import torch

from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.ir.errors import CompileError


def preferred(device=None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return "triton" if device.type == "cuda" else "onnx"


class AutoProgram:
    """Runs each graph on its chosen program; graphs share the weights and the runtime's state buffers."""

    def __init__(self, module, weights, device=None):
        self.module = module
        self.backend = preferred(device)
        if self.backend == "triton":
            from lowerlm.codegen.triton.program import TritonProgram

            main = TritonProgram(module, weights, device)
        else:
            from lowerlm.codegen.onnx.program import OnnxProgram

            main = OnnxProgram(module, weights)
        self.device = main.device
        self.device_sampling = getattr(main, "device_sampling", False)
        self.programs: dict = {}
        self.reasons: dict = {}
        fallback = None
        for g in module.graphs:
            try:
                if self.backend == "onnx":
                    main.session(g.name)  # lowering errors show up here
                self.programs[g.name] = main
            except CompileError as e:
                if fallback is None:
                    fallback = ReferenceProgram(module, {n: w.to(self.device) for n, w in weights.items()})
                self.programs[g.name] = fallback
                self.reasons[g.name] = str(e)

    def plan(self) -> list:
        """(graph, backend, why) for every graph."""
        return [(name, self.backend if name not in self.reasons else "reference", self.reasons.get(name, ""))
                for name in self.programs]

    def run(self, graph, inputs, state=None, symbols=None, inplace=False, observe=None):
        name = graph if isinstance(graph, str) else graph.name
        return self.programs[name].run(graph, inputs, state, symbols, inplace, observe)
