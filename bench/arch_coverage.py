"""Which of transformers' causal-LM architectures lowerlm compiles exactly, per backend.

Enumerates transformers' causal-LM registry, builds each architecture tiny with random weights (hidden 32, 2 layers,
4 query and 2 kv heads of 8, vocab 64; windows smaller than the test length; every 1-D parameter -- norm weights,
biases -- randomised, so a dropped term cannot match by accident), compiles it on each backend and compares with
eager: logits of a 2x9 batch (max abs error <= 1e-4 x max |logit|, f32) and 8 greedy tokens. Each architecture x
backend is one of:

- ``match``: both agree;
- ``refused: <reason>``: compile_model (or the first call) raised lowerlm's one-line error;
- ``MISMATCH <err>``: compiled and ran, and gave other logits or tokens: a silent wrong result, the worst defect;
- ``error: <type>``: anything else (a crash lowerlm should have turned into a refusal).

``--write COVERAGE.md`` writes the table; ``--only a,b`` runs some architectures; ``--smoke`` runs two, on the
reference backend. The full run is one command: ``python bench/arch_coverage.py --write COVERAGE.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings

import torch

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, head_dim=8, max_position_embeddings=128, sliding_window=4, n_embd=32, n_layer=2,
            n_head=4, n_positions=128, d_model=32, ffn_dim=64, moe_intermediate_size=32, num_experts=4,
            num_local_experts=4, num_experts_per_tok=2, n_routed_experts=4, first_k_dense_replace=1)
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
MAX_PARAMS = 20_000_000  # a tiny build larger than this kept a size the config names differently
TIMEOUT_S = 120  # per architecture and backend


def registry() -> dict:
    """model_type -> causal-LM class name, as transformers maps them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny(model_type: str):
    """The architecture built tiny with random weights, in eval mode; raises when transformers cannot build it so
    or its own forward fails on a 2x9 batch (then it is not counted as buildable)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type)
    text = getattr(cfg, "text_config", None) or cfg  # a multimodal config's language model
    for k, v in TINY.items():
        if hasattr(text, k):
            with contextlib.suppress(Exception):
                setattr(text, k, v)
    if hasattr(text, "is_decoder"):  # encoder families (RoBERTa, …) run causally only as decoders
        text.is_decoder = True
    for k in SPECIAL_IDS:
        v = getattr(text, k, None)
        if isinstance(v, int) and v >= TINY["vocab_size"]:
            setattr(text, k, 1)
    with torch.device("meta"):  # sized first: a config that ignores the tiny sizes could fill the memory
        size = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(cfg).parameters())
    if size > MAX_PARAMS:
        raise ValueError(f"{size / 1e6:.0f}M parameters after shrinking the config (over {MAX_PARAMS / 1e6:.0f}M)")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in name or "ln" in name else p.uniform_(-0.2, 0.2)
        model(torch.randint(0, TINY["vocab_size"], (2, 9)))  # eager itself must run the tiny config
    return model


def _greedy(model, prompt: list, n: int) -> list:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def check(model, backend: str) -> str:
    """``match``, ``refused: …``, ``MISMATCH …`` or ``error: …`` for one built model on one backend."""
    import lowerlm
    from lowerlm.errors import LowerlmError

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    prompt = [5, 7, 9, 11, 3]
    try:
        cm = lowerlm.compile_model(model, backend=backend, max_seq_len=64, use_cache=False, tokenizer=False)
        got = cm(ids).float()
        tokens = [s[0] for s in cm.generate_ids([prompt], 8, stop_ids=[])]
    except LowerlmError as e:
        return f"refused: {_first_line(e)}"
    except Exception as e:  # noqa: BLE001 -- reported, not hidden: a crash lowerlm should refuse cleanly
        return f"error: {type(e).__name__}: {_first_line(e)}"
    with torch.no_grad():
        want = model(ids).logits.float()
    err = float((got - want).abs().max() / max(float(want.abs().max()), 1e-30))
    if err > 1e-4 or tokens != _greedy(model, prompt, 8):
        return f"MISMATCH logits {err:.1e}" + ("" if tokens == _greedy(model, prompt, 8) else ", tokens differ")
    return "match"


@contextlib.contextmanager
def _deadline(seconds: int):
    """TimeoutError in the main thread after ``seconds`` (SIGALRM; where there is none, no limit)."""
    import signal

    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(*_):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run(types: list, backends: list, out=sys.stdout) -> dict:
    results: dict = {}
    for i, model_type in enumerate(types):
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                model = tiny(model_type)
        except Exception as e:  # noqa: BLE001 -- not buildable tiny as a causal LM: reported as such
            results[model_type] = {"build": f"{type(e).__name__}: {_first_line(e)}"}
            print(f"[{i + 1}/{len(types)}] {model_type}: not built ({results[model_type]['build'][:80]})", file=out,
                  flush=True)
            continue
        row = {}
        for backend in backends:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), _deadline(TIMEOUT_S):
                warnings.simplefilter("ignore")
                try:
                    row[backend] = check(model, backend)
                except TimeoutError:
                    row[backend] = f"error: over {TIMEOUT_S} s"
        results[model_type] = row
        print(f"[{i + 1}/{len(types)}] {model_type} ({time.perf_counter() - start:.1f} s): "
              + "; ".join(f"{b}: {r[:90]}" for b, r in row.items()), file=out, flush=True)
    return results


def table(results: dict, backends: list, seconds: float) -> str:
    import transformers

    built = {t: r for t, r in results.items() if "build" not in r}
    counts = {b: sum(r[b] == "match" for r in built.values()) for b in backends}
    silent = sorted(t for t, r in built.items() for b in backends if r[b].startswith("MISMATCH"))
    lines = ["# Architecture coverage", "",
             f"`python bench/arch_coverage.py --write COVERAGE.md` (transformers {transformers.__version__}, torch "
             f"{torch.__version__}; {seconds / 60:.0f} min on this machine). Each causal-LM architecture built tiny "
             "with random weights, compiled per backend, compared with eager: logits (max abs error <= 1e-4 x max "
             "|logit|) and 8 greedy tokens.", "",
             f"{len(results)} architectures checked, {len(built)} built tiny; matching: "
             + ", ".join(f"{b} {counts[b]}" for b in backends)
             + f"; silent mismatches: {len(silent)}{' (' + ', '.join(silent) + ')' if silent else ''}.", "",
             "| architecture | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    for t, r in sorted(results.items()):
        if "build" in r:
            lines.append(f"| {t} | " + " | ".join(["not built tiny"] * len(backends)) + " |")
        else:
            lines.append(f"| {t} | " + " | ".join(r[b].replace("|", "/") for b in backends) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated model types (default: the whole registry)")
    p.add_argument("--backends", default="reference,onnx")
    p.add_argument("--write", default="", help="write the table to this file (e.g. COVERAGE.md)")
    p.add_argument("--smoke", action="store_true", help="two architectures on the reference backend")
    args = p.parse_args(argv)
    names = registry()
    types = [t.strip() for t in args.only.split(",") if t.strip()] or sorted(names)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.smoke:
        types, backends = ["llama", "gpt2"], ["reference"]
    unknown = [t for t in types if t not in names]
    if unknown:
        print(f"arch_coverage.py: error: not in transformers' causal-LM registry: {', '.join(unknown)}",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = run(types, backends)
    text = table(results, backends, time.perf_counter() - start)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
