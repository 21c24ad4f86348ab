"""ONNX Runtime's profile of one lowerlm-onnx decode step of SmolLM2 (CPU): time per op type, per step.

    python bench/profile_cpu_decode.py [--steps 20] [--position 40]
    python bench/profile_cpu_decode.py --lm-head     # SmolLM2's lm_head alone in each weight format
    python bench/profile_cpu_decode.py --prefill 512 [--without select_logits]
        # a prefill of 512 tokens: the runtime's time (best of 5) and ORT's profile, against transformers'
        # forward with logits_to_keep=1 (best of 5) and torch's profile of it; --without drops passes

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


def _ort_profile(model, feed, runs: int) -> tuple:
    """(kernel ms per run, Counter of µs and of calls per op type) of ``runs`` plain runs of ``model``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = tempfile.mkdtemp() + "/run"
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    return sum(total.values()) / runs / 1e3, total, count


def _best_ms(fn, repeat: int = 5) -> float:
    import time

    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def prefill_profile(model, cm, n: int) -> None:
    """A prefill of ``n`` random tokens: lowerlm's runtime prefill (in chunks where the program takes them, and as
    one call) and ONNX Runtime's profile of its graph as one call (plain ``run``, the caches fed), against
    transformers' forward with logits_to_keep=1 and torch's profile of it."""
    from torch.profiler import ProfilerActivity, profile

    from lowerlm.codegen.onnx.lower import lower_graph
    from lowerlm.runtime.generate import allocate_state, prefill, prefill_once, selects_logits

    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([n])
    ours = _best_ms(lambda: prefill(cm.program, cm.generator.state, ids, lengths))
    whole = _best_ms(lambda: prefill_once(cm.program, cm.generator.state, ids, 0, lengths))
    with torch.no_grad():
        theirs = _best_ms(lambda: model(ids, logits_to_keep=1))
    chunk = cm.program.prefill_chunk(n)
    how = f"in chunks of {chunk}" if chunk else "one call"
    print(f"prefill of {n} tokens (best of 5): lowerlm-onnx {ours:.1f} ms ({how}; {whole:.1f} ms as one call), "
          f"transformers eager (logits_to_keep=1) {theirs:.1f} ms")
    graph = lower_graph(cm.ir.graph("prefill"), cm.program._constant, packer=cm.program.packer)
    state = allocate_state(cm.ir, 1, cm.max_seq_len, torch.device("cpu"))
    feed = {"input_ids": ids.numpy(), "positions": np.arange(n)[None], "seq_lens": np.array([n], np.int32)}
    if selects_logits(cm.ir):
        feed["logit_index"] = np.array([[n - 1]])
    ms, total, count = _ort_profile(graph, feed | {k: v.numpy() for k, v in state.items()}, 3)
    print(f"\nONNX Runtime, kernel time per prefill: {ms:.1f} ms")
    print("| op | ms | calls |")
    print("|---|---|---|")
    for op, us in total.most_common(10):
        print(f"| {op} | {us / 3 / 1e3:.1f} | {count[op] // 3} |")
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(ids, logits_to_keep=1)
    print("\ntransformers eager, torch's profiler (one forward):")
    print("| op | ms | calls |")
    print("|---|---|---|")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.1f} | {e.count} |")


def main(argv=None) -> int:
    import lowerlm
    from lowerlm.codegen.onnx.lower import lower_graph
    from lowerlm.passes import resolve
    from lowerlm.runtime.generate import allocate_state

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--position", type=int, default=40)
    p.add_argument("--lm-head", action="store_true", help="time the lm_head alone in each weight format")
    p.add_argument("--prefill", type=int, default=0, help="profile a prefill of this many tokens instead")
    p.add_argument("--without", default="", help="passes to drop from the default pipeline (comma-separated)")
    args = p.parse_args(argv)
    dropped = {name for name in args.without.split(",") if name}
    passes = [name for name, _ in resolve("default") if name not in dropped]
    model = lowerlm.load("smollm2")
    cm = lowerlm.compile_model(model, backend="onnx", max_batch=1, max_seq_len=max(1024, args.prefill + 1),
                               passes=passes)
    if args.lm_head:
        lm_head_formats(cm)
        return 0
    if args.prefill:
        prefill_profile(model, cm, args.prefill)
        return 0
    graph = lower_graph(cm.ir.graph("decode"), cm.program._constant, packer=cm.program.packer)
    state = allocate_state(cm.ir, 1, 1024, torch.device("cpu"))
    feed = {"input_ids": np.array([[5]]), "positions": np.array([[args.position]]),
            "seq_lens": np.array([args.position + 1], np.int32)} | {k: v.numpy() for k, v in state.items()}
    ms, total, count = _ort_profile(graph, feed, args.steps)
    print(f"kernel time per step: {ms:.2f} ms")
    print("| op | ms per step | calls per step |")
    print("|---|---|---|")
    for op, us in total.most_common():
        print(f"| {op} | {us / args.steps / 1e3:.3f} | {count[op] // args.steps} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
