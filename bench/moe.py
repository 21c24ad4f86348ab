"""MoE decode and prefill, lowerlm-triton versus transformers eager versus transformers + torch.compile, in one
process on one GPU: Qwen3-30B-A3B shapes cut to 12 layers (128 experts of 768, top 8), random weights, bf16.

    python bench/moe.py                 # batch-1 greedy decode (prompt 128, 128 new tokens), prefill of 2048
                                        # (every row's logits, and the last row's only: time to first token)
    python bench/moe.py --smoke         # tiny shapes on the CPU: checks the script runs (no speed claim)

The share of the bandwidth floor counts the bytes a decode step must read: every weight except the embedding
table (one row is read) and, of the experts, only the top_k selected per layer — (non-expert weights + top_k/E of
the expert weights) / measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import copy_bandwidth, per_token, print_peers, print_prefill  # noqa: E402

SHAPES = {
    "qwen3-30b-a3b-12l": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                              num_experts_per_tok=8, num_hidden_layers=12, num_attention_heads=32,
                              num_key_value_heads=4, head_dim=128, vocab_size=151936, norm_topk_prob=True,
                              decoder_sparse_step=1, rms_norm_eps=1e-6, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                              max_position_embeddings=40960),
    "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                 num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, vocab_size=256, norm_topk_prob=True, decoder_sparse_step=1,
                 max_position_embeddings=512),
}


def build(shape: str, dtype, device):
    import transformers

    cfg = transformers.Qwen3MoeConfig(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen3MoeForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # routers with real spread (the default init makes them nearly uniform)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return model


def decode_bytes(model) -> int:
    """Bytes one batch-1 decode step reads: all weights but the embedding table, experts only top_k of E."""
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.endswith("embed_tokens.weight"):
            continue
        if "experts." in name:
            size = size * cfg.num_experts_per_tok // cfg.num_experts
        total += size
    return total


def main(argv=None) -> int:
    import lowerlm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen3-30b-a3b-12l")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.prompt, args.new_tokens, args.prefill = "tiny", 8, 4, 16
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("bench/moe.py measures on a CUDA GPU; use --smoke on a CPU", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
    bandwidth = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s; torch {torch.__version__}")
    model = build(args.shape, dtype, device)
    floor = decode_bytes(model) / bandwidth
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    n = args.new_tokens
    rows = {}

    def hf(m):
        return lambda k: m.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False)

    compiled = None
    with torch.no_grad():
        rows["transformers eager"] = per_token(hf(model), n, device)
        if device.type == "cuda":
            compiled = build(args.shape, dtype, device)
            compiled.generation_config.cache_implementation = "static"
            compiled.forward = torch.compile(compiled.forward, mode="reduce-overhead")
            rows["transformers + torch.compile"] = per_token(hf(compiled), n, device)
    backend = "triton" if device.type == "cuda" else "reference"
    start = time.perf_counter()
    cm = lowerlm.compile_model(model, backend=backend, max_batch=1, max_seq_len=max(args.prompt + n + 1,
                                                                                    args.prefill + 1))
    cm.generator.decode  # noqa: B018  (state buffers, kernels, CUDA graphs)
    compile_s = time.perf_counter() - start
    ids = prompt[0].tolist()
    rows[f"lowerlm-{backend}"] = per_token(lambda k: list(cm.generate_ids([ids], k, stop_ids=[])), n, device)
    print(f"\n## {args.shape} ({decode_bytes(model) / 1e6:.0f} MB read per decode step, {dtype}, {device})")
    print_peers(rows, f"lowerlm-{backend}", floor, "bytes read / copy bandwidth", cm, device)
    peers = {"transformers eager": model} | ({"transformers + torch.compile": compiled} if compiled is not None else {})
    print_prefill(cm, peers, args.prefill, model.config.vocab_size, device)
    print(f"compile: {compile_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
