"""``backend="auto"``: each graph is split at op level between the device's preferred backend (a CUDA GPU: Triton;
a CPU: ONNX) and the reference backend, which runs the ops the preferred one lacks (codegen/partition.py).

A graph the preferred backend runs whole stays one program call. A bf16 graph reaches a CPU's auto only when asked
for (``compile_model`` otherwise computes a bf16 model in f32 there, the upcast pass); the ONNX lowering refuses all
of it, so it runs whole on the reference backend. Otherwise its partitions run in order, values handed from one to the
next (copied only where their devices differ, which ``describe()`` lists and ``copies`` counts), state updated in
place by whichever partition writes it. ``describe()`` is what ``lowerlm dump-ir --backend auto`` prints.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowerlm.codegen.partition import Plan, assign, build, describe
from lowerlm.codegen.program import build_program, preferred
from lowerlm.codegen.reference import bind_inputs
from lowerlm.ir.abi import PREFILL
from lowerlm.ir.errors import CompileError
from lowerlm.ir.graph import Module
from lowerlm.ir.ops import COLLECTIVES


def _reason(backend: str, graph):
    """``reason(node)``: None when ``backend`` runs the node, else why not."""
    if backend == "onnx":
        from lowerlm.codegen.onnx.lower import unsupported

        return unsupported(graph)
    # the Triton program runs every op: those without a kernel of their own run as torch ops on its device
    return lambda node: None


def _refuse_off_onnx(plan: Plan) -> None:
    """The ONNX backend's refusal of the first node other than a collective that a plan puts off ONNX."""
    for p in plan.parts:
        for node in p.nodes:
            if p.backend != "onnx" and node.op not in COLLECTIVES:
                raise CompileError(f"the ONNX backend cannot run {node.op} ('{node.name}'): "
                                   f"{p.reasons.get(node.name, 'no lowering')}; use backend='auto', which runs it on "
                                   "the reference backend")


class AutoProgram:
    """Runs each graph's partitions on their programs; they share the weights and the runtime's state buffers. A
    ``Program`` (codegen/program.py)."""

    device_sampling = False  # set per instance: the preferred program's, when no partition falls back

    def __init__(self, module: Module, weights, device=None, exclude=None, weight_bits: int | None = None,
                 cache: bool = True, progress: Callable[[str], None] | None = None, collectives_only: bool = False):
        """``exclude(node)``: a reason to keep a node off the preferred backend, or None (to work around a
        backend's problem with one op, or to test partitioning). ``weight_bits``: the ONNX backend's quantized
        weights (ONNX only). ``cache``: the ONNX backend's compile cache. ``progress(message)``: passed to the ONNX
        program, which reports each graph it lowers (not those it loads from the cache). ``collectives_only``:
        ``backend="onnx"`` of a tensor-parallel shard: the collectives alone run off ONNX (between its sessions),
        and any other op ONNX cannot run is refused as the ONNX backend refuses it."""
        self.module = module
        self.weight_bits = weight_bits
        self.cache = cache
        self.progress = progress
        self.backend = "onnx" if collectives_only else preferred(device)
        if weight_bits is not None and self.backend != "onnx":
            raise CompileError("weight_bits quantizes weights for the ONNX backend; on a GPU auto prefers Triton, "
                               "which runs the model's own precision")
        self.copies = 0  # cross-device copies made so far
        self.plans: dict = {}
        for g in module.graphs:
            reason = _reason(self.backend, g)
            self.plans[g.name] = assign(g, [self.backend, "reference"],
                                        lambda b, node, reason=reason: (exclude and exclude(node)) or reason(node))
        if self.backend == "triton":
            from lowerlm.codegen.triton.program import TritonProgram

            self.device = TritonProgram.resolve_device(device)
        else:
            self.device = torch.device("cpu")  # ONNX Runtime is bound to host memory
        devices = {"": self.device, self.backend: self.device, "reference": self.device}
        for plan in self.plans.values():
            build(plan, devices)
            if collectives_only:
                _refuse_off_onnx(plan)
        main_graphs = [p.graph for plan in self.plans.values() for p in plan.parts if p.backend == self.backend]
        self.main = self._program(self.backend, main_graphs, weights)
        if self.backend == "onnx":  # a partition ONNX Runtime rejects as a whole (a shape it cannot read) falls back
            for plan in self.plans.values():
                for p in plan.parts:
                    if p.backend == "onnx":
                        try:
                            self.main.session(p.graph.name)
                        except CompileError as e:  # the lowering's own reason, without the hint to use auto
                            if collectives_only:
                                raise
                            p.backend = "reference"
                            p.reasons = {n.name: str(e.__cause__ or e) for n in p.nodes}
        ref_graphs = [p.graph for plan in self.plans.values() for p in plan.parts if p.backend == "reference"]
        self.fallback = self._program("reference", ref_graphs, weights) if ref_graphs else None
        self.device_sampling = self.main.device_sampling and self.fallback is None

    def _program(self, backend: str, graphs: list, weights):
        """``backend``'s program for ``graphs`` (partitions), on this program's device."""
        return build_program(backend, Module(tuple(graphs), self.module.params), weights, self.device,
                             weight_bits=self.weight_bits if backend == "onnx" else None, cache=self.cache,
                             progress=self.progress)

    def plan(self) -> dict:
        """Graph name -> its ``Plan`` (partitions, their backends and devices, the copies)."""
        return dict(self.plans)

    def describe(self) -> list:
        lines = [f"preferred backend: {self.backend} on {self.device}"]
        for plan in self.plans.values():
            lines += describe(plan)
        return lines

    def prefill_chunk(self, s: int) -> int | None:
        """The preferred program's prefill chunking (runtime/generate.py) when it runs the prefill whole."""
        plan = self.plans.get(PREFILL)
        if plan is None or not plan.whole or plan.parts[0].backend != self.backend:
            return None
        return self.main.prefill_chunk(s)

    def prepare(self) -> None:
        """Both programs' ``prepare`` (ONNX: every partition's session, most already opened in ``__init__``)."""
        self.main.prepare()
        if self.fallback is not None:
            self.fallback.prepare()

    def _runner(self, backend: str):
        return self.main if backend == self.backend else self.fallback

    def run(self, graph, inputs, state=None, symbols=None, inplace=False, observe=None):
        name = graph if isinstance(graph, str) else graph.name
        plan: Plan | None = self.plans.get(name)
        if plan is None or (not isinstance(graph, str) and graph is not plan.graph):
            raise CompileError(f"graph '{name}' is not one of this program's graphs")
        g = plan.graph
        if plan.whole:
            return self._runner(plan.parts[0].backend).run(g.name, inputs, state, symbols, inplace, observe)
        values, env = bind_inputs(g, inputs, state, symbols, self.device)
        for p in plan.parts:
            sub = p.graph
            dev = torch.device(p.device)
            part_inputs = {v.name: self._move(values[v.name], dev) for v in sub.inputs}
            part_state = {s.name: values[s.name] for s in sub.state}
            outs, new_state = self._runner(p.backend).run(sub.name, part_inputs, part_state, env, inplace, observe)
            values.update(zip(sub.outputs, outs))
            values.update({o: new_state[s.name] for s, o in zip(sub.state, sub.state_outputs)})
        return ([self._move(values[o], self.device) for o in g.outputs],
                {s.name: values[o] for s, o in zip(g.state, g.state_outputs)})

    def _move(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if t.device == device:
            return t
        self.copies += 1
        return t.to(device)
