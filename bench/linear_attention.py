"""The delta rule's prefill on ONNX Runtime, form against form, in one process on the CPU: a Scan over the tokens
(the recurrence) against the chunked form (a Scan over chunks, chunk sizes 8 to 64), for KDA's per-channel gate and
gated DeltaNet's per-head gate; the reference's chunked form for scale. Medians of repeated runs, ratios to the
token Scan.

    python bench/linear_attention.py            # B=1, H=4, K=V=64, S=512 and 2048, one ORT thread
    python bench/linear_attention.py --smoke    # tiny shapes: checks the script runs (no speed claim)

codegen/onnx/linear_attention.py's ``PREFILL`` and ``CHUNK`` are the forms this measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _text(h: int, k: int, v: int, per_channel: bool) -> str:
    gw = h * k if per_channel else h
    return (f"graph g(%q: f32[B,S,{h * k}], %k: f32[B,S,{h * k}], %v: f32[B,S,{h * v}], %g: f32[B,S,{gw}], "
            f"%beta: f32[B,S,{h}], %positions: i64[B,S], %seq_lens: i32[B])\n"
            f"    state(%st: f32[B,{h},{k},{v}] recurrent @layer0) {{\n"
            f"  %o, %st1 = cached_delta_rule(%q, %k, %v, %g, %beta, %st, %positions, %seq_lens) "
            f"{{heads={h}, scale={k ** -0.5}, l2norm}} : f32[B,S,{h * v}], f32[B,{h},{k},{v}]\n"
            f"  return %o state(%st1)\n}}\n")


def _feeds(b: int, s: int, h: int, k: int, v: int, per_channel: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    gate = torch.nn.functional.logsigmoid(torch.randn(b, s, h * k if per_channel else h, generator=g) * 2 + 4)
    return {"q": torch.randn(b, s, h * k, generator=g), "k": torch.randn(b, s, h * k, generator=g),
            "v": torch.randn(b, s, h * v, generator=g), "g": gate, "beta": torch.rand(b, s, h, generator=g),
            "positions": torch.arange(s).repeat(b, 1), "seq_lens": torch.full((b,), s, dtype=torch.int32),
            "st": torch.zeros(b, h, k, v)}


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def run(b: int, s: int, h: int, k: int, v: int, repeat: int) -> None:
    import onnxruntime as ort

    import lowerlm.ir as ir
    from lowerlm.codegen.onnx import linear_attention as la
    from lowerlm.codegen.onnx.lower import lower_graph
    from lowerlm.ir.fold import run_op

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    for per_channel in (True, False):
        g = ir.verify_module(ir.parse_module(_text(h, k, v, per_channel))).graphs[0]
        feeds = _feeds(b, s, h, k, v, per_channel)
        np_feeds = {n: t.numpy() for n, t in feeds.items()}
        forms = [("scan", None)] + [("chunked", c) for c in (8, 16, 32, 64)]
        results = {}
        saved = (la.PREFILL, dict(la.CHUNK))
        try:
            for form, chunk in forms:
                la.PREFILL = form
                if chunk:
                    la.CHUNK[per_channel] = chunk
                model = lower_graph(g, constants=None, contrib=False)
                session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                results[f"{form}" + (f" C={chunk}" if chunk else "")] = _median_ms(
                    lambda session=session, np_feeds=np_feeds: session.run(None, np_feeds), repeat)
        finally:
            la.PREFILL, la.CHUNK = saved[0], saved[1]
        node = g.nodes[0]
        args = [feeds[n] for n in node.inputs]
        results["reference (torch, chunk 64)"] = _median_ms(
            lambda node=node, args=args: run_op(node, args, {"B": b, "S": s}), max(1, repeat // 10))
        gate = "per channel (KDA)" if per_channel else "per head (gated DeltaNet)"
        print(f"\ncached_delta_rule prefill, B={b} H={h} K={k} V={v} S={s}, gate {gate}, one ORT thread:")
        base = results["scan"]
        for name, ms in results.items():
            print(f"  {name:28s} {ms:9.2f} ms   {base / ms:5.2f}x the token Scan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script runs)")
    a = p.parse_args(argv)
    if a.smoke:
        run(1, 20, 2, 8, 8, 2)
        return 0
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    for s in (512, 2048):
        run(1, s, 4, 64, 64, 20 if s == 512 else 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
