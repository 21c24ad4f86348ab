"""ONNX Runtime's profile of one lowerlm-onnx decode step of SmolLM2 (CPU): time per op type, per step.

    python bench/profile_cpu_decode.py [--steps 20] [--position 40]

The session runs the decode model with plain ``InferenceSession.run`` (the caches are fed, not bound in place as
the runtime does), so GroupQueryAttention includes copying the caches; the projections' numbers are the
runtime's.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile

import numpy as np
import torch


def main(argv=None) -> int:
    import onnxruntime as ort

    import lowerlm
    from lowerlm.codegen.onnx.lower import lower_graph
    from lowerlm.runtime.generate import allocate_state

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--position", type=int, default=40)
    args = p.parse_args(argv)
    cm = lowerlm.compile_model(lowerlm.load("smollm2"), backend="onnx", max_batch=1, max_seq_len=1024)
    model = lower_graph(cm.ir.graph("decode"), cm.program._constant, packer=cm.program.packer)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = tempfile.mkdtemp() + "/decode"
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    state = allocate_state(cm.ir, 1, 1024, torch.device("cpu"))
    feed = {"input_ids": np.array([[5]]), "positions": np.array([[args.position]]),
            "seq_lens": np.array([args.position + 1], np.int32)} | {k: v.numpy() for k, v in state.items()}
    for _ in range(args.steps):
        session.run(None, feed)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    print(f"kernel time per step: {sum(total.values()) / args.steps / 1e3:.2f} ms")
    print("| op | ms per step | calls per step |")
    print("|---|---|---|")
    for op, us in total.most_common():
        print(f"| {op} | {us / args.steps / 1e3:.3f} | {count[op] // args.steps} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
