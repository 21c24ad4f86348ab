"""Standalone ONNX export: the prefill and decode graphs as ONNX models (standard opset-24 ops only — attention is
``Attention`` with ``nonpad_kv_seqlen``, cache writes ``TensorScatter``, norms ``RMSNormalization``; no
com.microsoft ops — checked by ``onnx.checker``) plus ``lowerlm_onnx.json`` describing their
inputs, outputs and state, so plain ONNX Runtime can run the model without lowerlm.

How to drive them: allocate every state zeroed with its ``shape`` (``B`` = batch, ``T`` = max_seq_len), run
``prefill`` on the right-padded prompt with ``positions`` 0..S-1, ``seq_lens`` = prompt lengths and (when it has
that input) ``logit_index`` [B, L] = the prompt rows whose logits it returns (each prompt's last: length - 1), then
``decode`` one token per step at ``positions`` = tokens so far and ``seq_lens`` = positions + 1, feeding each state
output back as the next call's state input (bind it to the same buffer to update it in place). A state whose
``kind`` is ``recurrent`` (conv and delta-rule state) must be zeroed again before each new prompt; ``kv`` caches need
not be.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from lowerlm.codegen.onnx.lower import lower_graph
from lowerlm.ir.cache import atomic_write


def export(program, out_dir: str | Path, max_seq_len: int, vocab_size: int | None = None) -> Path:
    """Write ``<graph>.onnx`` (+ ``<graph>.onnx.data`` with the weights) for each graph and the JSON index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": "lowerlm-onnx/1", "max_seq_len": max_seq_len, "vocab_size": vocab_size, "graphs": {}}
    for g in program.module.graphs:
        model = lower_graph(g, program._constant, contrib=False)  # standard ops only, for any runtime
        onnx.checker.check_model(model)
        path = out / f"{g.name}.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{g.name}.onnx.data",
                        size_threshold=1024)
        index["graphs"][g.name] = {
            "file": path.name,
            "inputs": [{"name": v.name, "dtype": str(v.type.dtype), "shape": [str(d) for d in v.type.shape]}
                       for v in g.inputs],
            "outputs": [{"name": o, "dtype": str(g.type_of(o).dtype), "shape": [str(d) for d in g.type_of(o).shape]}
                        for o in g.outputs],
            "state": [{"name": s.name, "output": s.name + ".out", "dtype": str(s.type.dtype),
                       "shape": [str(d) for d in s.type.shape], "owner": s.owner, "kind": s.kind} for s in g.state],
        }
    atomic_write(out / "lowerlm_onnx.json", json.dumps(index, indent=1))
    return out / "lowerlm_onnx.json"
