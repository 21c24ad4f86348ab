"""ONNX Runtime's profile of one lowerlm-onnx decode step of SmolLM2 (CPU): time per op type, per step.

    python bench/profile_cpu_decode.py [--steps 20] [--position 40]
    python bench/profile_cpu_decode.py --lm-head     # SmolLM2's lm_head alone in each weight format

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


def lm_head_formats(cm, repeat: int = 50) -> None:
    """ms per call of SmolLM2's lm_head (a Q8_0 weight) for one token: f32 MatMul, the exact two 4-bit
    MatMulNBits terms the backend uses, and one 8-bit MatMulNBits (codes + 128, no zero point) with f32 compute
    (accuracy level 1) and int8 compute (level 4)."""
    import time

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lowerlm.codegen.onnx.quantize import grid8

    w = cm.weights["lm_head.weight"].numpy()
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    step = np.abs(blocks).max(-1) / np.float32(127)
    codes8 = (np.rint(blocks / step[..., None]) + 128).astype(np.uint8)
    terms, offsets = grid8(w)
    ind = (np.arange(k)[:, None] // 32 == np.arange(k // 32)[None, :]).astype(np.float32)

    def nbits(x, codes, scales, y, bits, level):
        return helper.make_node("MatMulNBits", [x, codes, scales], [y], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=32, accuracy_level=level)

    two_terms = ([nbits("x", "c0", "s0", "a", 4, 1), nbits("x", "c1", "s1", "b", 4, 1),
                  helper.make_node("MatMul", ["x", "ind"], ["sums"]), helper.make_node("MatMul", ["sums", "o"], ["c"]),
                  helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "c"], ["y"])],
                 {"c0": terms[0][0], "s0": terms[0][1], "c1": terms[1][0], "s1": terms[1][1], "o": offsets,
                  "ind": ind})
    forms = {"f32 MatMul": ([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": np.ascontiguousarray(w.T)}),
             "two exact 4-bit terms (the backend's)": two_terms,
             "8-bit, f32 compute": ([nbits("x", "c", "s", "y", 8, 1)], {"c": codes8, "s": step}),
             "8-bit, int8 compute (lossy)": ([nbits("x", "c", "s", "y", 8, 4)], {"c": codes8, "s": step})}
    x = np.random.default_rng(0).standard_normal((1, 1, k), dtype=np.float32)
    want = x[0] @ w.T
    print("| lm_head form | ms per token | max error / max |logit| |")
    print("|---|---|---|")
    for name, (nodes, inits) in forms.items():
        graph = helper.make_graph(nodes, "lm_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])],
                                  [numpy_helper.from_array(v, key) for key, v in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x})[0][0]
        start = time.perf_counter()
        for _ in range(repeat):
            session.run(None, {"x": x})
        ms = (time.perf_counter() - start) / repeat * 1e3
        print(f"| {name} | {ms:.2f} | {np.abs(got - want).max() / np.abs(want).max():.1e} |")


def main(argv=None) -> int:
    import onnxruntime as ort

    import lowerlm
    from lowerlm.codegen.onnx.lower import lower_graph
    from lowerlm.runtime.generate import allocate_state

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--position", type=int, default=40)
    p.add_argument("--lm-head", action="store_true", help="time the lm_head alone in each weight format")
    args = p.parse_args(argv)
    cm = lowerlm.compile_model(lowerlm.load("smollm2"), backend="onnx", max_batch=1, max_seq_len=1024)
    if args.lm_head:
        lm_head_formats(cm)
        return 0
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
