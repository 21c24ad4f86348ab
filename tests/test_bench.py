"""The benchmark scripts run (their speed claims come from GPU runs recorded in BENCHMARKS.md, not from tests)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_decode_bench_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--smoke"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| lowerlm-reference |" in out.stdout and "| transformers eager |" in out.stdout
    assert "prefill 16 tokens" in out.stdout and "compile: cold" in out.stdout


def test_moe_bench_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "moe.py"), "--smoke"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| lowerlm-reference |" in out.stdout and "| transformers eager |" in out.stdout
    assert "prefill 16 tokens: lowerlm" in out.stdout and "floor (bytes read / copy bandwidth)" in out.stdout
