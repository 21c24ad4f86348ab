"""What a warm start spends checking the caches by content (docs/caches.md): the default model's converted weights
(every file hashed), its prefill and decode ONNX entries (model files and every blob, as a fresh process sees them)
and its trace entry, each timed on its own with the page cache warm. Needs a warm cache: run
`lowerlm generate --max-new-tokens 4 "Hi"` once first.

    python bench/cache_check.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from lowerlm import models
from lowerlm.codegen.onnx import cache as onnx_cache
from lowerlm.ir.cache import HASH, bytes_digest, cache_root


def _time(fn, runs: int) -> tuple:
    """(best, median) wall seconds of ``fn()``; it must return True (the entry is whole)."""
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        ok = fn()
        seconds.append(time.perf_counter() - start)
        assert ok, "the cache entry did not check out whole"
    return min(seconds), statistics.median(seconds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    root = cache_root()
    folder = models.weight_cache(models.smollm2_gguf())  # the default model's entry (converted if missing)
    graphs = sorted((root / "onnx").glob("*.onnx"), key=lambda f: f.stat().st_mtime)[-2:]
    traces = sorted((root / "traces").glob("*.ir"), key=lambda f: f.stat().st_size)
    if len(graphs) < 2 or not traces:
        print("no warm cache: run `lowerlm generate --max-new-tokens 4 \"Hi\"` first", file=sys.stderr)
        return 2
    mb = lambda files: sum(f.stat().st_size for f in files) / 1e6  # noqa: E731
    blobs = {}  # name -> size, over both entries' manifests (shared blobs once)
    for g in graphs:
        manifest = json.loads(g.with_suffix(".json").read_text())
        blobs.update({name: rec["size"] for name, rec in manifest["blobs"].items()})
    blob_bytes = sum(blobs.values())

    def trace_hash(path) -> bool:  # what read_entry checks before it parses (the parse a warm start always did)
        header, body = path.read_bytes().split(b"\n", 1)
        return header.decode().endswith("=" + bytes_digest(body))

    def onnx_entries() -> bool:
        onnx_cache._digests.clear()  # a fresh process: nothing hashed yet (prefill and decode share blobs)
        return all(onnx_cache._check(g.stem) is not None for g in graphs)

    rows = [(f"converted weights, {mb(folder.iterdir()):.0f} MB", lambda: models.check_entry(folder) is None),
            (f"ONNX prefill + decode entries, {blob_bytes / 1e6:.0f} MB of blobs", onnx_entries),
            (f"trace entry, {mb(traces[-1:]):.2f} MB: its header's hash", lambda: trace_hash(traces[-1]))]
    print(f"cache checks of a warm start ({HASH}), best and median of {args.runs}")
    print("| entry | best ms | median ms |\n|---|---|---|")
    total = 0.0
    for name, fn in rows:
        best, median = _time(fn, args.runs)
        total += best
        print(f"| {name} | {best * 1e3:.0f} | {median * 1e3:.0f} |")
    print(f"| total | {total * 1e3:.0f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
