"""CPU decode of SmolLM2-135M-Instruct (real weights, f32, greedy): lowerlm-onnx versus transformers eager versus
ONNX Runtime GenAI (its model builder's output, built here from the same weights), interleaved in one process.

    python bench/cpu.py [--new-tokens 128] [--rounds 3] [--weight-bits 8,4] [--long-prompt 512] [--bf16]
    python bench/cpu.py --moe [--new-tokens 128] [--rounds 3]

Prints ms/token of decode ((time for N tokens - time for 1) / (N - 1), so the prefill is not in it), tokens/s,
lowerlm's ratio to each peer, the share of the bandwidth floor (weight bytes read per step / measured read
bandwidth; for lowerlm-onnx the bytes of its packed decode model), and
whether every peer produced the same tokens. ``--weight-bits`` adds lowerlm-onnx with quantized projection
weights (MatMulNBits), reported separately: where its greedy tokens first differ from the f32 ones, and its
teacher-forced top-1 agreement (its argmax at every position of the f32 continuation). Then the time to first
token (generating 1 token: the prefill and the first draw) of the chat prompt and of a ``--long-prompt`` of random
tokens, per peer. ``--bf16`` adds the model converted to bf16 (what transformers 5 loads from a bf16 checkpoint):
transformers eager in bf16, and lowerlm's default (auto, which computes a bf16 model in f32 on a CPU). Needs
`pip install onnxruntime-genai onnx_ir` for the GenAI peer
(reported as unavailable otherwise). ``--moe`` times a random-weight Qwen3-MoE of SmolLM2's width instead (the MoE
path: route, sort, grouped GEMMs, combine), against transformers eager only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def read_bandwidth() -> float:
    """Bytes per second reading a 512 MB tensor with torch's multi-threaded sum (every byte read once)."""
    x = torch.ones(128 * 2**20, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def genai_peer(weights_dir: Path, workdir: Path):
    """(generate(ids, n) -> tokens) for ONNX Runtime GenAI, or a reason it is unavailable."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return None, f"onnxruntime-genai not installed ({e})"
    src = workdir / "hf"
    shutil.copytree(weights_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.setdefault("architectures", ["LlamaForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    out = workdir / "genai"
    build = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
                            "-p", "fp32", "-e", "cpu", "-c", str(workdir / "cache")], capture_output=True, text=True)
    if build.returncode != 0:
        return None, "model builder failed: " + build.stderr.strip().splitlines()[-1]
    model = og.Model(str(out))

    def generate(ids, n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        tokens = []
        while not gen.is_done() and len(tokens) < n:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        return tokens

    return generate, None


def onnx_weight_bytes(cm) -> int:
    """Bytes of the weights (initializers) lowerlm-onnx's decode model reads per step: all but the tables only
    ever indexed by a Gather (the embedding: one row per token)."""
    from lowerlm.codegen.onnx.lower import lower_graph

    model = lower_graph(cm.ir.graph("decode"), cm.program._constant, packer=cm.program.packer)
    readers: dict = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(node.op_type)
    return sum(len(t.raw_data) for t in model.graph.initializer if readers.get(t.name) != {"Gather"})


def moe_model():
    """Qwen3-MoE at SmolLM2-135M's width and depth (576 hidden, 30 layers, 9/3 heads), 16 experts of 256, top 4,
    random weights (routers at unit scale, so routing is decisive)."""
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if name.endswith("mlp.gate.weight") else 0.02)
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    return model


def moe_main(args) -> int:
    """``--moe``: decode ms/token of the MoE model, lowerlm-onnx against transformers eager, interleaved."""
    import lowerlm

    model = moe_model()
    cm = lowerlm.compile_model(model, backend="onnx", max_batch=1, max_seq_len=1024, use_cache=False)
    ids = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    n = args.new_tokens
    peers = {
        "lowerlm-onnx": lambda k: [s[0] for s in cm.generate_ids([ids], k) if s[0] is not None],
        "transformers eager": lambda k: model.generate(torch.tensor([ids]), max_new_tokens=k, do_sample=False,
                                                       eos_token_id=None)[0, len(ids):].tolist(),
    }
    tokens = {name: fn(n) for name, fn in peers.items()}  # also the warm-up
    times: dict = {name: [] for name in peers}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in peers.items():
                t1 = _timed(lambda fn=fn: fn(1))
                tn = _timed(lambda fn=fn: fn(n))
                times[name].append((tn - t1) / (len(tokens[name]) - 1))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in name)
    step_bytes = weight_bytes - experts + experts * 4 // 16  # a decode step reads 4 of the 16 experts per layer
    bandwidth = read_bandwidth()
    print(f"Qwen3-MoE (random weights) f32, {weight_bytes / 1e6:.0f} MB, {n} new tokens, prompt {len(ids)} tokens, "
          f"torch threads {torch.get_num_threads()}; read bandwidth {bandwidth / 1e9:.1f} GB/s, floor "
          f"{step_bytes / bandwidth * 1e3:.1f} ms/token ({step_bytes / 1e6:.0f} MB read per step: 4 of 16 experts)")
    ours = statistics.median(times["lowerlm-onnx"])
    print("| peer | ms/token (median) | tokens/s | lowerlm speed-up | share of floor | tokens |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        sec = statistics.median(ts)
        same = "identical" if tokens[name] == tokens["lowerlm-onnx"] else "DIFFER"
        print(f"| {name} | {sec * 1e3:.1f} | {1 / sec:.1f} | {sec / ours:.2f}x | {step_bytes / bandwidth / sec:.0%} | "
              f"{len(tokens[name])}, {same} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--weight-bits", default="8,4", help="quantized variants to add ('' for none)")
    p.add_argument("--long-prompt", type=int, default=512, help="tokens of the long prompt timed for first token")
    p.add_argument("--bf16", action="store_true", help="add the bf16 model: transformers eager and lowerlm auto")
    p.add_argument("--moe", action="store_true",
                   help="a random-weight Qwen3-MoE (SmolLM2's width, 16 experts, top 4) instead of SmolLM2; "
                        "lowerlm-onnx against transformers eager only")
    args = p.parse_args(argv)
    bits = [int(b) for b in args.weight_bits.split(",") if b.strip()]
    if args.moe:
        return moe_main(args)
    import lowerlm
    from lowerlm.models import resolve_model, weight_cache
    from lowerlm.runtime.text import encode

    model = lowerlm.load("smollm2")
    cm = lowerlm.compile_model(model, backend="onnx", max_batch=1, max_seq_len=1024)
    ids = encode(cm.tokenizer, PROMPT, chat=True)
    n = args.new_tokens
    long = torch.randint(0, model.config.vocab_size, (args.long_prompt,),
                         generator=torch.Generator().manual_seed(0)).tolist()

    def lowerlm_peer(c):
        return lambda k, p=ids: [s[0] for s in c.generate_ids([p], k) if s[0] is not None]

    peers = {
        "lowerlm-onnx": lowerlm_peer(cm),
        "transformers eager": lambda k, p=ids: model.generate(torch.tensor([p]), max_new_tokens=k,
                                                              do_sample=False)[0, len(p):].tolist(),
    }
    quantized = {}
    for b in bits:
        q = lowerlm.compile_model(model, backend="onnx", max_batch=1, max_seq_len=1024, weight_bits=b)
        quantized[f"lowerlm-onnx int{b}"] = q
        peers[f"lowerlm-onnx int{b}"] = lowerlm_peer(q)
    narrow = {}  # peers that run the model converted to bf16: name -> weight bytes they read per step
    if args.bf16:
        import copy
        import warnings

        m16 = copy.deepcopy(model).to(torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto says it computes in f32: this table says so too
            c16 = lowerlm.compile_model(m16, max_batch=1, max_seq_len=1024)
        bf16_bytes = sum(p.numel() * p.element_size() for p in m16.parameters())
        narrow = {"transformers eager, bf16 model": bf16_bytes,
                  "lowerlm auto, bf16 model (f32 compute)": 2 * bf16_bytes}
        peers["lowerlm auto, bf16 model (f32 compute)"] = lowerlm_peer(c16)
        peers["transformers eager, bf16 model"] = lambda k, p=ids: m16.generate(
            torch.tensor([p]), max_new_tokens=k, do_sample=False)[0, len(p):].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        genai, why = genai_peer(weight_cache(resolve_model("smollm2")[1]), Path(tmp))
        if genai is not None:
            peers["onnxruntime-genai"] = lambda k, p=ids: genai(p, k)
        tokens = {name: fn(n) for name, fn in peers.items()}  # also the warm-up
        for fn in peers.values():
            fn(1, long)  # the long prompt's shapes, warmed up too
        times: dict = {name: [] for name in peers}
        ttft: dict = {name: ([], []) for name in peers}  # time to first token: chat prompt, long prompt
        with torch.no_grad():
            for _ in range(args.rounds):  # interleaved: every peer sees the same machine state
                for name, fn in peers.items():
                    t1 = _timed(lambda fn=fn: fn(1))
                    tn = _timed(lambda fn=fn: fn(n))
                    times[name].append((tn - t1) / (len(tokens[name]) - 1))
                    ttft[name][0].append(t1)
                    ttft[name][1].append(_timed(lambda fn=fn: fn(1, long)))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied embedding counted once
    bandwidth = read_bandwidth()
    floor = weight_bytes / bandwidth
    ours_bytes = onnx_weight_bytes(cm)
    print(f"SmolLM2-135M-Instruct f32, {n} new tokens, prompt {len(ids)} tokens, torch threads "
          f"{torch.get_num_threads()}; read bandwidth {bandwidth / 1e9:.1f} GB/s, floor {floor * 1e3:.1f} ms/token "
          f"({weight_bytes / 1e6:.0f} MB of f32 weights)")
    print(f"lowerlm-onnx reads {ours_bytes / 1e6:.0f} MB of weights per step (weights on 4/8-bit grids packed as "
          f"exact 4-bit MatMulNBits): its own floor {ours_bytes / bandwidth * 1e3:.1f} ms/token, which its share uses")
    if genai is None:
        print(f"onnxruntime-genai: unavailable ({why})")
    reference = tokens["lowerlm-onnx"]
    agreement = {}
    with torch.no_grad():
        for name, q in quantized.items():
            logits = q(torch.tensor([ids + reference]))[0, len(ids) - 1:-1]
            agreement[name] = (logits.argmax(-1) == torch.tensor(reference)).float().mean().item()
    ours = statistics.median(times["lowerlm-onnx"])
    print("| peer | ms/token (median) | tokens/s | lowerlm speed-up | share of floor | tokens |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        sec = statistics.median(ts)
        same = "identical" if tokens[name] == reference else "DIFFER"
        first = next((i for i, (a, b) in enumerate(zip(tokens[name], reference)) if a != b), len(reference))
        if name in agreement:
            same = f"first differs at {first}; teacher-forced top-1 agreement {agreement[name]:.1%}"
        elif name in narrow and same == "DIFFER":
            same = f"first differs at {first} (bf16-rounded weights)"
        own = ours_bytes / bandwidth if name == "lowerlm-onnx" else floor  # the bytes each peer reads
        own = narrow[name] / bandwidth if name in narrow else own
        share = "—" if name in quantized else f"{own / sec:.0%}"
        print(f"| {name} | {sec * 1e3:.1f} | {1 / sec:.1f} | {sec / ours:.2f}x | {share} | "
              f"{len(tokens[name])}, {same} |")
    print("\ntime to first token (median; the prefill and the first draw, generating 1 token):")
    print(f"| peer | chat prompt, {len(ids)} tokens | lowerlm speed-up | long prompt, {len(long)} tokens | "
          "lowerlm speed-up |")
    print("|---|---|---|---|---|")
    mine = [statistics.median(t) for t in ttft["lowerlm-onnx"]]
    for name, (short_t, long_t) in ttft.items():
        a, b = statistics.median(short_t), statistics.median(long_t)
        print(f"| {name} | {a * 1e3:.1f} ms | {a / mine[0]:.2f}x | {b * 1e3:.1f} ms | {b / mine[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
