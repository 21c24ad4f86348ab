"""``TritonProgram``: runs a module's graphs with the Triton kernels.

Each fused op goes to its kernel's launcher; ``rope`` whose k result only feeds a cache write, together with the
matching v write, becomes one launch (``rope_cache_write``). Weights are evaluated once (weight expressions
included) and kept on the program's device; state is updated in place (the runtime owns the buffers). Views,
constants and the remaining core ops run as torch ops on the same device.
"""

from __future__ import annotations

import os

import torch

from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.ir.errors import CompileError
from lowerlm.ir.graph import Graph, Node
from lowerlm.ir.ops import Op


def available(device) -> bool:
    """Whether Triton kernels can run on ``device`` here."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


class TritonProgram(ReferenceProgram):
    """A module ready to run with Triton kernels: ``run(graph, inputs, state, inplace=True)``."""

    def __init__(self, module, weights, device=None):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if not available(device):
            raise CompileError("the Triton backend needs a CUDA GPU; on a CPU set TRITON_INTERPRET=1 (before lowerlm "
                               "is imported) to run its kernels in Triton's slow interpreter")
        super().__init__(module, {n: w.to(device) for n, w in weights.items()})
        self.device = device
        self._plans: dict = {}

    def plan(self, g: Graph) -> dict:
        """rope → (k cache write, v cache write) fusions, by rope name; the fused writes by name."""
        if g.name in self._plans:
            return self._plans[g.name]
        plan: dict = {}
        index = {n.name: i for i, n in enumerate(g.nodes)}
        writes = [n for n in g.nodes if n.op is Op.KV_CACHE_WRITE]
        owners = {s.name: s.owner for s in g.state}
        for rope in (n for n in g.nodes if n.op is Op.ROPE):
            k_out = rope.results[1].name
            users = g.users.get(k_out, [])
            if len(users) != 1 or users[0].op is not Op.KV_CACHE_WRITE or users[0].inputs[1] != k_out \
                    or g.use_count(k_out) != 1:
                continue
            kwrite = users[0]
            owner = owners.get(kwrite.inputs[0])
            vwrites = [w for w in writes if w is not kwrite and owners.get(w.inputs[0]) == owner and owner
                       and w.inputs[2] == kwrite.inputs[2] and index.get(w.inputs[1], -1) < index[rope.name]]
            if len(vwrites) != 1:
                continue
            plan[rope.name] = (kwrite, vwrites[0])
            plan[kwrite.name] = plan[vwrites[0].name] = "fused"
        self._plans[g.name] = plan
        return plan

    def execute(self, node: Node, args: list, env: dict, inplace: bool, values: dict, plan: dict):
        from lowerlm.codegen.triton import arm_mlp, attention, embedding, gemv, rms_norm, rope, swiglu

        op, a = node.op, node.all_attrs()
        if plan.get(node.name) == "fused":
            return values[node.inputs[0]]  # written by the rope launch, in place
        if op is Op.ROPE and node.name in plan and inplace:
            kwrite, vwrite = plan[node.name]
            q, k, positions = args
            q_out = rope.rope_cache_write(q, k, values[vwrite.inputs[1]], positions, a["heads"],
                                          self._inv_freq(a["inv_freq"]), values[kwrite.inputs[0]],
                                          values[vwrite.inputs[0]], a["scaling"], a["layout"])
            return q_out, None
        if op is Op.EMBEDDING:
            return embedding.embedding(*args)
        if op is Op.RMS_NORM:
            return rms_norm.rms_norm(*args, a["eps"])
        if op is Op.LINEAR:
            x, w, bias, residual = self._slots(node, args)
            return gemv.linear(x, w, bias, residual)
        if op is Op.RMS_NORM_LINEAR:
            x, nw, w, bias, residual = self._slots(node, args)
            return gemv.rms_norm_linear(x, nw, w, bias, residual, a["eps"], a["splits"], a["act"])
        if op is Op.SWIGLU:
            return swiglu.swiglu(*args, a["act"])
        if op is Op.ARM_MLP:
            return arm_mlp.arm_mlp(*self._slots(node, args), a["eps"], a["tau"], a["act"])
        if op is Op.ROPE:
            return rope.rope(*args, a["heads"], self._inv_freq(a["inv_freq"]), a["scaling"], a["layout"])
        if op is Op.KV_CACHE_WRITE:
            cache = args[0] if inplace else args[0].clone()
            return rope.kv_cache_write(cache, args[1], args[2])
        if op is Op.ATTENTION:
            return attention.attention(*args, a["heads"], a["scale"], a["causal"], a["window"])
        if op is Op.CACHED_ATTENTION:
            return attention.cached_attention(*args, a["scale"], a["causal"], a["window"])
        return super().execute(node, args, env, inplace, values, plan)

    @staticmethod
    def _slots(node: Node, args: list) -> list:
        from lowerlm.ir.fold import by_slot

        return by_slot(node, args)

    def _inv_freq(self, values) -> torch.Tensor:
        key = ("inv_freq", values)
        if key not in self._constants:
            self._constants[key] = torch.tensor(values, dtype=torch.float32, device=self.device)
        return self._constants[key]
