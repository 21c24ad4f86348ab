"""``OnnxProgram``: each graph of a module lowered to one ONNX model and run by ONNX Runtime (CPU).

State is returned by the models as new tensors and copied into the runtime's buffers when it runs in place (one
copy per call; binding the same buffer in and out is the next step for decode speed).
"""

from __future__ import annotations

import numpy as np
import torch

from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.ir.graph import Node
from lowerlm.ir.ops import Op


class OnnxProgram(ReferenceProgram):
    def __init__(self, module, weights, threads: int | None = None):
        super().__init__(module, weights)
        self.threads = threads
        self._sessions: dict = {}

    def _constant(self, node: Node):
        return self._constants[self._weight_key(node)]

    def session(self, name: str):
        if name not in self._sessions:
            import onnxruntime as ort

            from lowerlm.codegen.onnx.lower import lower_graph

            model = lower_graph(self.module.graph(name), self._constant)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if self.threads:
                options.intra_op_num_threads = self.threads
            self._sessions[name] = ort.InferenceSession(model.SerializeToString(), options,
                                                        providers=["CPUExecutionProvider"])
        return self._sessions[name]

    def run(self, graph, inputs, state=None, symbols=None, inplace=False, observe=None):
        g = self.module.graph(graph) if isinstance(graph, str) else graph
        if observe is not None or not isinstance(graph, str):
            return super().run(graph, inputs, state, symbols, inplace, observe)
        if not isinstance(inputs, dict):
            inputs = dict(zip((v.name for v in g.inputs), inputs))
        state = state or {}
        env = dict(symbols or {})
        feed = {v.name: self._check(v.name, v.type, inputs, env, "input").numpy() for v in g.inputs}
        feed.update({s.name: self._check(s.name, s.type, state, env, "state").numpy() for s in g.state})
        results = self.session(g.name).run(None, feed)
        outputs = [torch.from_numpy(np.asarray(r)) for r in results[:len(g.outputs)]]
        new_state = {}
        for s, r in zip(g.state, results[len(g.outputs):]):
            value = torch.from_numpy(np.asarray(r))
            if inplace:
                state[s.name].copy_(value)
                value = state[s.name]
            new_state[s.name] = value
        return outputs, new_state


SUPPORTED = frozenset(Op) - {Op.PARAM}  # every op lowers (ARM included); RoPE's interleaved layout does not yet
