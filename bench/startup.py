"""Start-up of `lowerlm generate` on the CPU (SmolLM2-135M-Instruct, its default backend: auto, which is ONNX
Runtime on a CPU): the wall time of the whole command, from a cold cache and from a warm one, next to transformers
loading the same weights and generating the same tokens in a fresh process.

    python bench/startup.py [--runs 3] [--new-tokens 8] [--backend auto]

Cold: an empty ``LOWERLM_CACHE_DIR``, so the GGUF is converted, the model exported and its graphs lowered. Warm:
the same folder afterwards (the converted weights, the trace and the ONNX compile cache are read back). The
transformers peer loads the converted-weights folder lowerlm's cache holds and calls its eager ``generate``; its
own cold start (converting the GGUF) is the one lowerlm's cold run pays too, so it is not repeated. Each row is the
median of ``--runs`` processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "What is the capital of France?"

TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder)
ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
"""


def timed(cmd: list, env: dict) -> tuple:
    """(seconds, stdout) of one process; raises with its stderr when it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--backend", default="auto", help="lowerlm generate's --backend (auto: its default)")
    args = p.parse_args(argv)
    generate = [sys.executable, "-m", "lowerlm", "generate", "--backend", args.backend, "--max-new-tokens",
                str(args.new_tokens), PROMPT]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, LOWERLM_CACHE_DIR=tmp)
        cold, out = timed(generate, env)
        answer = out.splitlines()[0]
        rows.append(("lowerlm generate, cold cache (convert, export, lower)", [cold], answer))
        warm = [timed(generate, env) for _ in range(args.runs)]
        rows.append(("lowerlm generate, warm cache", [s for s, _ in warm], warm[-1][1].splitlines()[0]))
        folder = next(p for p in Path(tmp, "models").iterdir() if p.is_dir())  # beside it: its lock file
        peer = [timed([sys.executable, "-c", TRANSFORMERS, str(folder), PROMPT, str(args.new_tokens)], env)
                for _ in range(args.runs)]
        rows.append(("transformers: from_pretrained + eager generate", [s for s, _ in peer],
                     peer[-1][1].strip().splitlines()[0]))
    print(f"start-up, SmolLM2-135M-Instruct f32 on the CPU, backend {args.backend}, {args.new_tokens} new tokens, "
          "a fresh process per run "
          f"(median of {args.runs}; the cold run once)")
    print("| command | wall s | answer |")
    print("|---|---|---|")
    for name, seconds, text in rows:
        print(f"| {name} | {statistics.median(seconds):.1f} | {text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
