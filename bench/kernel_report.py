"""The Triton kernels a real model's decode step launches (and its prefill's attention), compiled for an H100
without one: launches per step and per layer, and each kernel's grid, warps, registers, stack, spills and shared
memory from Triton's compiler (sm_90).

    python bench/kernel_report.py                             # SmolLM2-135M and Llama-3.2-1B shapes, bf16
    python bench/kernel_report.py --shapes qwen3-30b-a3b-12l  # the MoE shapes of bench/moe.py
    python bench/kernel_report.py --triton-path DIR           # compile with the Triton installed in DIR
                                                              # (pip install --target DIR triton==3.6.0)

Launches are recorded under Triton's interpreter without running them (2 layers of the real shapes; a layer's
launches repeat), so this runs on a CPU in seconds; no timing here — bench/decode.py measures on the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from decode import SHAPES  # noqa: E402
from moe import SHAPES as _MOE  # noqa: E402

MOE_SHAPES = {("tiny-moe" if name == "tiny" else name): shape for name, shape in _MOE.items()}

LAYERS = 2


def build(shape: str):
    import transformers

    if shape in MOE_SHAPES:
        cfg = transformers.Qwen3MoeConfig(**{**MOE_SHAPES[shape], "num_hidden_layers": LAYERS})
        cls = transformers.Qwen3MoeForCausalLM
    else:
        cfg = transformers.LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": LAYERS})
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)  # initialised for real: the frontend reads buffers such as RoPE's inv_freq
    return cls(cfg).to(torch.bfloat16).eval(), cfg


def prefill_attention_launches(cfg, tokens: int, max_seq_len: int) -> list:
    """The causal attention launch of a prefill of ``tokens`` over the cache (the prefill's projections go through
    cuBLAS; this is its one Triton kernel that grows with the prompt's square)."""
    from lowerlm.codegen.triton import attention
    from lowerlm.codegen.triton.aot import Recorder

    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    q = torch.empty(1, tokens, hq * d, dtype=torch.bfloat16)
    kc, vc = (torch.empty(1, hk, max_seq_len, d, dtype=torch.bfloat16) for _ in range(2))
    positions, lens = torch.arange(tokens)[None], torch.tensor([tokens], dtype=torch.int32)
    with Recorder(execute=False) as rec:
        attention.cached_attention(q, kc, vc, positions, lens, d ** -0.5, True, 0)
    return rec.launches


def report(shape: str, args) -> None:
    import lowerlm
    from lowerlm.codegen.triton.aot import compile_launches, decode_step_launches, unique

    model, cfg = build(shape)
    cm = lowerlm.compile_model(model, backend="triton", max_batch=max(args.batches), max_seq_len=args.max_seq_len)
    layers = {**SHAPES, **MOE_SHAPES}[shape]["num_hidden_layers"]
    print(f"\n## {shape} ({LAYERS} of {layers} layers recorded, bf16, max_seq_len {args.max_seq_len})")
    launches = []
    for batch in args.batches:
        step, torch_ops = decode_step_launches(cm, batch, args.position)
        per_layer = (len(step) - 2) / LAYERS
        print(f"batch {batch}: {len(step)} kernel launches per step recorded ({per_layer:g} per layer + embedding "
              f"and lm_head), torch ops launching kernels: {len(torch_ops)} {dict(Counter(torch_ops))}")
        launches += step
    launches += prefill_attention_launches(cfg, args.prefill, args.max_seq_len)
    distinct = unique(launches)
    env = {"PYTHONPATH": args.triton_path} if args.triton_path else None
    results = compile_launches(distinct, env=env)
    print(f"\nTriton {results[0]['triton'] if results else '?'}, target {results[0]['target'] if results else '?'}")
    print("| kernel | key constexprs | grid | warps | regs | stack | spills | shared B | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for launch, r in zip(distinct, results):
        meta = {k: v for k, v in launch.constexprs.items() if k.startswith("BLOCK") or k in ("SPLITS", "ROPE_APPEND")}
        print(f"| {launch.name} | {meta} | {launch.grid} | {r.get('num_warps')} | {r.get('regs')} | {r.get('stack')} "
              f"| {r.get('spills')} "
              f"| {r.get('shared')} | {'yes' if r['ok'] else r['error'][:200]} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--position", type=int, default=200)
    p.add_argument("--max-seq-len", type=int, default=2049)
    p.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the recorded prefill attention")
    p.add_argument("--triton-path", help="a directory holding another Triton to compile with (PYTHONPATH)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    for shape in args.shapes.split(","):
        report(shape, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
