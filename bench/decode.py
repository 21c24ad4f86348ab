"""Batch-1 greedy decode, lowerlm-triton versus transformers eager versus transformers + torch.compile (static
cache, reduce-overhead), in one process on one GPU, random weights with real shapes, bf16.

    python bench/decode.py                     # SmolLM2-135M and Llama-3.2-1B shapes, prompt 128, 256 new tokens
    python bench/decode.py --smoke             # tiny shapes on the CPU: checks the script runs (no speed claim)

Prints ms/token and tokens/s of each peer, lowerlm's ratio to each, the share of the memory-bandwidth floor
(weight bytes / measured copy bandwidth), kernels per decode step, batch 8 and 32 decode throughput, the prefill
of 2048 tokens (every row's logits, as a forward; and the last row's only, as generation's time to first token),
and lowerlm's cold and warm compile time. Decode time per token is
(time for N new tokens - time for 1) / (N - 1), so the prefill is not in it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         max_position_embeddings=8192),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         max_position_embeddings=131072),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(256 * 2**20, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), device, repeat=10)
    return 2 * x.numel() * 4 / seconds


def per_token(generate, n, device) -> float:
    """Seconds per decode token: (time for n tokens - time for 1) / (n - 1)."""
    generate(2)  # warm up (compiles, captures)
    return (timed(lambda: generate(n), device) - timed(lambda: generate(1), device)) / (n - 1)


def build(shape: str, dtype, device):
    import transformers

    cfg = transformers.LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def kernels_per_step(cm, device) -> tuple:
    """CUDA kernels one uncaptured decode step launches (a captured step replays the same ones), and the time
    they run by kernel name, summed over the step (microseconds), longest first."""
    from torch.profiler import ProfilerActivity, profile

    from lowerlm.runtime.generate import decode_one

    gen = cm.generator
    tokens = torch.zeros(1, dtype=torch.long, device=device)
    positions = torch.full((1,), 5, dtype=torch.long, device=device)
    decode_one(cm.program, gen.state, tokens, positions)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode_one(cm.program, gen.state, tokens, positions)
        sync(device)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict = {}
    for e in kernels:
        count, total = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (count + 1, total + e.time_range.elapsed_us())
    return len(kernels), sorted(by_name.items(), key=lambda kv: -kv[1][1])


def print_peers(rows: dict, ours: str, floor: float, floor_what: str, cm, device) -> None:
    """The peer table (seconds per token by peer name; ``ours`` is lowerlm's row), the floor, and on a GPU the
    kernels per decode step."""
    print("| peer | ms/token | tokens/s | lowerlm speed-up | share of floor |")
    print("|---|---|---|---|---|")
    for name, sec in rows.items():
        print(f"| {name} | {sec * 1e3:.3f} | {1 / sec:.1f} | {sec / rows[ours]:.2f}x | {floor / sec:.1%} |")
    print(f"floor ({floor_what}): {floor * 1e3:.3f} ms/token")
    if device.type == "cuda":
        count, by_name = kernels_per_step(cm, device)
        busy = sum(total for _, total in by_name.values())
        print(f"kernels per decode step (uncaptured): {count}, running {busy:.0f} us of the "
              f"{rows[ours] * 1e6:.0f} us per token")
        print("| kernel | launches | us per step | share of kernel time |")
        print("|---|---|---|---|")
        for name, (launches, total) in by_name[:12]:
            print(f"| {name[:60]} | {launches} | {total:.1f} | {total / busy:.1%} |")


def bench_shape(shape, args, device, dtype, bandwidth):
    import lowerlm

    model = build(shape, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = weight_bytes / bandwidth
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    n = args.new_tokens
    rows = {}

    def hf(m):
        return lambda k: m.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False)

    compiled = None
    with torch.no_grad():
        rows["transformers eager"] = per_token(hf(model), n, device)
        if device.type == "cuda" and not args.smoke:
            compiled = build(shape, dtype, device)
            compiled.generation_config.cache_implementation = "static"
            compiled.forward = torch.compile(compiled.forward, mode="reduce-overhead", fullgraph=True)
            rows["transformers + torch.compile"] = per_token(hf(compiled), n, device)
    backend = "triton" if device.type == "cuda" else "reference"
    with tempfile.TemporaryDirectory() as cold:
        os.environ["LOWERLM_CACHE_DIR"] = cold

        def compile_ready():
            """Compile and build the generator (state buffers, kernels compiled, CUDA graphs captured)."""
            compiled = lowerlm.compile_model(model, backend=backend, max_batch=max(args.batches),
                                             max_seq_len=max(args.prompt + n + 1, args.prefill + 1))
            compiled.generator.decode  # noqa: B018  (building the generator is the point)
            return compiled

        start = time.perf_counter()
        cm = compile_ready()
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        compile_ready()
        warm_s = time.perf_counter() - start
    ids = prompt[0].tolist()
    rows[f"lowerlm-{backend}"] = per_token(lambda k: list(cm.generate_ids([ids], k, stop_ids=[])), n, device)
    print(f"\n## {shape} ({weight_bytes / 1e6:.0f} MB of weights, {dtype}, {device})")
    print_peers(rows, f"lowerlm-{backend}", floor, "weight bytes / copy bandwidth", cm, device)
    for b in args.batches[1:]:
        batch = [ids] * b
        sec = per_token(lambda k, batch=batch: list(cm.generate_ids(batch, k, stop_ids=[])), min(n, 64), device)
        print(f"batch {b} decode: {b / sec:.0f} tokens/s")
    peers = {"transformers eager": model} | ({"transformers + torch.compile": compiled} if compiled is not None else {})
    print_prefill(cm, peers, args.prefill, model.config.vocab_size, device)
    print(f"compile: cold {cold_s:.1f} s, warm {warm_s:.1f} s")


def print_prefill(cm, peers: dict, n: int, vocab: int, device) -> None:
    """Prefill of ``n`` random tokens (batch 1), lowerlm against each transformers peer (name -> model): every row's
    logits, as a forward computes them, then the last row's only, as generation needs them (time to first token:
    lowerlm's select_logits, transformers' logits_to_keep=1). Each call runs once (compiling for the shape), then
    is timed."""
    from lowerlm.runtime.generate import prefill

    long = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1)).to(device)
    lengths = torch.tensor([n])
    every = {"lowerlm": lambda: cm(long)} | {name: (lambda m=m: m(long, use_cache=False)) for name, m in peers.items()}
    first = {"lowerlm": lambda: prefill(cm.program, cm.generator.state, long, lengths)} | {
        name: (lambda m=m: m(long, use_cache=False, logits_to_keep=1)) for name, m in peers.items()}
    with torch.no_grad():
        for title, fns in ((f"prefill {n} tokens, every row's logits", every),
                           (f"prefill {n} tokens, the last row's logits (time to first token)", first)):
            times = {}
            for name, fn in fns.items():
                fn()
                times[name] = timed(fn, device)
            print(f"{title}: " + ", ".join(f"{name} {sec * 1e3:.1f} ms ({sec / times['lowerlm']:.2f}x lowerlm's time)"
                                           for name, sec in times.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        args.shapes, args.prompt, args.new_tokens, args.batches, args.prefill = "tiny", 8, 4, [1, 2], 16
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("bench/decode.py measures on a CUDA GPU; use --smoke on a CPU", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
    bandwidth = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s; torch {torch.__version__}")
    for shape in args.shapes.split(","):
        bench_shape(shape, args, device, dtype, bandwidth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
