"""Kimi Linear on this CPU: lowerlm (auto) against transformers eager (its torch fallback for KDA), interleaved in
one process: a Kimi-Linear-shaped model with random weights -- vocab 32000, hidden 1024, 8 layers in the 3:1
KDA:MLA pattern, 16 heads, 32 experts of 256 (top 4) + 1 shared, the first layer dense -- in f32.

    python bench/kimi.py            # batch-1 greedy decode (prompt 64, 32 new tokens) and a 512-token prefill
    python bench/kimi.py --smoke    # tiny shapes: checks the script runs (no speed claim)
    python bench/kimi.py --expanded --prompt 1024   # also lowerlm without raise_mla: MLA's cache expanded, as before

Decode: ms per token = (time the last of n tokens arrived - time the first arrived) / (n - 1), taken from each
peer's own stream of tokens (transformers: a streamer; lowerlm: generate_ids), so the prompt's prefill and its
noise stay out; the peers in alternation, median of the rounds. Prefill: one forward over the prompt, every row's
logits, alternating, median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SHAPES = {
    "kimi-8l": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=256,
                    num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, linear_num_heads=16,
                    linear_head_dim=64, linear_conv_kernel_dim=4, num_local_experts=32, num_experts_per_tok=4,
                    n_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=512, q_lora_rank=None,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=4096,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "tiny": dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
                 num_attention_heads=2, num_key_value_heads=2, linear_num_heads=2, linear_head_dim=8,
                 linear_conv_kernel_dim=4, num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
                 topk_group=2, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4,
                 v_head_dim=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def build(shape: str):
    import transformers

    kw = dict(SHAPES[shape])
    n = kw["num_hidden_layers"]
    kw["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
    kw["mlp_layer_types"] = ["dense"] + ["sparse"] * (n - 1)
    torch.manual_seed(0)
    model = transformers.KimiLinearForCausalLM(transformers.KimiLinearConfig(**kw)).eval()
    with torch.no_grad():  # gates and routers with real spread (the default init makes them nearly constant)
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", "A_log")):
                p.normal_(0, 0.5)
            elif name.endswith("mlp.gate.weight"):  # router logits of order 1 (std 1/sqrt(hidden))
                p.normal_(0, p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():  # the router's correction bias is a buffer
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.5)
    return model


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    import lowerlm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script runs")
    p.add_argument("--expanded", action="store_true",
                   help="a third peer: lowerlm without raise_mla (MLA's keys and values expanded into the cache)")
    args = p.parse_args(argv)
    shape = "tiny" if args.smoke else "kimi-8l"
    if args.smoke:
        args.prompt, args.new_tokens, args.prefill, args.rounds = 8, 4, 16, 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shape {shape}, f32, cpu")
    model = build(shape)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g)
    long = torch.randint(0, vocab, (1, args.prefill), generator=g)
    start = time.perf_counter()
    cm = lowerlm.compile_model(model, backend="auto", max_batch=1, max_seq_len=max(args.prompt + args.new_tokens,
                                                                                    args.prefill) + 1)
    cm.generator  # noqa: B018  (state buffers)
    print(f"compile (auto): {time.perf_counter() - start:.1f} s")
    ids = prompt[0].tolist()
    peers = {"transformers eager": None, "lowerlm auto": cm}
    if args.expanded:
        from lowerlm.codegen.program import fusing_backend
        from lowerlm.passes import PIPELINE, TAILS

        names = [n for n, fn in PIPELINE if fn is not None and n != "raise_mla"]
        names += [n for n, _ in TAILS.get(fusing_backend("auto", None), [])]
        peers["lowerlm auto, MLA cache expanded"] = lowerlm.compile_model(
            model, backend="auto", max_batch=1, max_seq_len=cm.max_seq_len, passes=names)

    class _Clock:
        """A transformers streamer noting when each new token arrives (its first ``put`` is the prompt)."""

        def __init__(self):
            self.times, self.prompt = [], True

        def put(self, value):
            if not self.prompt:
                self.times.append(time.perf_counter())
            self.prompt = False

        def end(self):
            pass

    def eager(k, times=None):
        clock = _Clock()
        with torch.no_grad():
            # an explicit mask: generate would take the padding token's id inside a random prompt for padding
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k, min_new_tokens=k,
                                 do_sample=False, streamer=clock)[0, args.prompt:].tolist()
        if times is not None:
            times += clock.times
        return out

    def ours(compiled):
        def run(k, times=None):
            out = []
            for step in compiled.generate_ids([ids], k, stop_ids=[]):
                out.append(step[0])
                if times is not None:
                    times.append(time.perf_counter())
            return out
        return run

    runs = {name: eager if c is None else ours(c) for name, c in peers.items()}
    want = eager(args.new_tokens)
    for name, fn in runs.items():
        if fn is not eager:  # eager's own tokens are the reference
            assert fn(args.new_tokens) == want, f"{name}: greedy tokens differ"
    n = args.new_tokens
    decode = {name: [] for name in peers}
    prefill = {name: [] for name in peers}
    for _ in range(args.rounds):  # alternating: the peers see the same machine state
        for name, fn in runs.items():
            times = []
            fn(n, times)
            decode[name].append((times[-1] - times[0]) / (n - 1))
        for name, c in peers.items():
            with torch.no_grad():
                prefill[name].append(_timed(lambda c=c: model(long, use_cache=False) if c is None else c(long)))
    base_d, base_p = (statistics.median(decode["transformers eager"]), statistics.median(prefill["transformers eager"]))
    print(f"\n| peer | decode ms/token (prompt {args.prompt}, {n} new) | vs eager | prefill {args.prefill} tokens, s "
          "| vs eager |\n|---|---|---|---|---|")
    for name in decode:
        d, f = statistics.median(decode[name]), statistics.median(prefill[name])
        print(f"| {name} | {d * 1e3:.1f} | {base_d / d:.2f}x | {f:.2f} | {base_p / f:.2f}x |")
    plan = cm.program.plan() if hasattr(cm.program, "plan") else {}
    for graph, p_ in plan.items():
        print(f"{graph}: " + ", ".join(f"{part.backend} ({len(part.nodes)} nodes)" for part in p_.parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
