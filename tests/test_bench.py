"""The benchmark scripts run (their speed claims come from GPU runs recorded in BENCHMARKS.md, not from tests)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def _smoke(script: str) -> str:
    """The stdout of ``bench/<script> --smoke``, which must exit 0 and print both decode peers."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| lowerlm-reference |" in out.stdout and "| transformers eager |" in out.stdout
    return out.stdout


def test_decode_bench_smoke():
    out = _smoke("decode.py")
    assert "prefill 16 tokens, every row's logits: lowerlm" in out and "compile: cold" in out
    assert "prefill 16 tokens, the last row's logits (time to first token): lowerlm" in out


def test_moe_bench_smoke():
    out = _smoke("moe.py")
    assert "prefill 16 tokens, every row's logits: lowerlm" in out and "floor (bytes read / copy bandwidth)" in out
    assert "prefill 16 tokens, the last row's logits (time to first token): lowerlm" in out


def test_kernel_report_on_tiny_shapes():
    """bench/kernel_report.py compiles a decode step's kernels for sm_90 (no GPU) and reports their resources."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--shapes", "tiny",
                          "--batches", "1,2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "batch 1: 12 kernel launches per step recorded (5 per layer" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "_kernel" in line]
    assert {row.split(" | ")[0][2:] for row in rows} >= {"gemv_kernel", "decode_attention_kernel", "embedding_kernel"}
    assert all(row.endswith("| yes |") for row in rows), rows


def test_arch_coverage_smoke():
    """bench/arch_coverage.py builds architectures tiny, compiles them and compares with eager (the fast subset CI
    runs; the full table is COVERAGE.md)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "arch_coverage.py"), "--smoke"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| llama | match | match | match |" in out.stdout and "| gpt2 | match | match | match |" in out.stdout
    assert "silent mismatches: 0." in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "arch_coverage.py"), "--only", "nonesuch"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "not in transformers' causal-LM registry: nonesuch" in bad.stderr


def test_linear_attention_bench_smoke():
    """bench/linear_attention.py times the ONNX delta rule's prefill forms against each other."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "linear_attention.py"), "--smoke"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("1.00x the token Scan") == 2 and "chunked C=64" in out.stdout


def test_tp_bench_smoke():
    """bench/tp.py times tp=1 (the whole machine, one thread) against tp=2 (two ranks over gloo) and checks that
    tp=2's greedy tokens are tp=1's."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "tp.py"), "--smoke"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| peer | decode ms/token (median) | ratio to tp=1 (" in out.stdout
    assert "| tp=1, 1 thread |" in out.stdout and "| tp=2, " in out.stdout
    assert "greedy tokens agree: every peer (tp=2 included)" in out.stdout and "MISMATCH" not in out.stdout
