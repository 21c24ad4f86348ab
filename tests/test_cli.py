"""The command line through a subprocess: listings, IR dumps and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from lowerlm.passes import resolve

from .conftest import ROOT, tiny_model


def lowerlm(*args: str, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "lowerlm", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_passes_lists_the_pipeline():
    out = lowerlm("passes")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["upcast", "dtype"], ["canonicalize", "default"],
                                                        ["arm", "data"]]
    assert "upcast: a bf16 or f16 model computed in f32" in lines[0]
    # whole first sentences, one line per pass when stdout is not a terminal
    assert len(lines) == 17 and all(line.endswith(".") for line in lines)
    assert lines[6].endswith("x is read once and normalised in the matmul's prologue.")
    # then each backend's tail, on the same screen
    assert [line.split()[:2] for line in lines[12:]] == [
        ["fuse_gqa_attention", "onnx"], ["fuse_decode_attention", "triton"], ["fuse_rope_cache_write", "triton"],
        ["fuse_route_norm", "triton"], ["fuse_ew_chains", "triton"]]


def test_dump_ir_after_all_and_one_pass():
    example = str(ROOT / "examples" / "tiny_llama.ir")
    out = lowerlm("dump-ir", "--ir", example, "--after", "all")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("// imported\n")
    assert "// after canonicalize (5 rewrites)" in out.stdout
    assert "%q4" in out.stdout.split("// after")[0] and "%q4" not in out.stdout.split("// after")[1]
    one = lowerlm("dump-ir", "--ir", example, "--after", "canonicalize", "--format", "dot")
    assert one.returncode == 0 and one.stdout.startswith("// after canonicalize") and "digraph" in one.stdout


def test_dump_ir_shows_a_backend_tail():
    example = str(ROOT / "examples" / "tiny_llama.ir")
    out = lowerlm("dump-ir", "--ir", example, "--backend", "triton", "--after", "fuse_decode_attention")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("// after fuse_decode_attention (1 rewrites)")
    assert " = rope_cached_attention(" in out.stdout and " = cached_attention(" in out.stdout  # decode; prefill
    wrong = lowerlm("dump-ir", "--ir", example, "--after", "fuse_ew_chains")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.strip() == ("lowerlm: error: --after fuse_ew_chains: that pass is in the triton backend's "
                                    "tail, not reference's; add --backend triton")


def test_dump_ir_diff_shows_what_a_pass_changed():
    out = lowerlm("dump-ir", "--ir", str(ROOT / "examples" / "tiny_llama.ir"), "--after", "canonicalize", "--diff")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "// after canonicalize (5 rewrites)"
    assert lines[1].startswith("--- imported") and lines[2].startswith("+++ after canonicalize")
    assert any(line.startswith("-  %q4 = reshape") for line in lines)


@pytest.mark.slow
def test_dump_ir_of_the_default_model():
    out = lowerlm("dump-ir", "--model", "smollm2", "--after", "all")
    assert out.returncode == 0, out.stderr
    stages = {}
    for chunk in out.stdout.split("// ")[1:]:
        header, text = chunk.split("\n", 1)
        stages[header.split(" (")[0]] = text
    assert list(stages) == ["imported"] + [f"after {name}" for name, _ in resolve("default")]
    for name in ("imported", "after canonicalize"):
        text = stages[name]
        assert text.count(" = attention(") == 30 and text.count(" = rms_norm(") == 61
        assert "# model.layers.29.self_attn" in text
    assert " = reshape(" in stages["imported"] and " = reshape(" not in stages["after canonicalize"]
    prefill, decode = stages["after specialize"].split("graph decode(")
    assert "graph prefill(%input_ids: i64[B,S]" in prefill and decode.startswith("%input_ids: i64[B,1]")
    assert decode.count(" = cached_attention(") == 30 and decode.count(" = kv_cache_write(") == 60
    # each layer: qkv and gate|up·swiglu norms fused, o_proj and down with the residual, the head fused too
    assert decode.count(" = rms_norm_linear(") == 61 and decode.count("act=silu") == 30
    assert decode.count(", residual=") == 60 and " = rms_norm(" not in decode
    # generation's prefill runs the lm_head on the rows it is asked for (the prompts' last)
    picked = stages["after select_logits"].split("graph decode(")[0]
    assert "%logit_index: i64[B,L]" in picked and "f32[B,L,49152]  # model.norm, lm_head\n" in picked


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(path)
    return str(path)


def test_generate_with_token_ids(tiny_dir):
    out = lowerlm("generate", "--model", tiny_dir, "--token-ids", "--max-batch", "2", "--max-new-tokens", "5",
                  "5,7,9", "8 1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("[0] [") and lines[1].startswith("[1] [")
    # the default backend: the device's fast one (a CPU: ONNX Runtime; a GPU: Triton)
    assert lines[2].endswith(f"tokens/s (lowerlm, auto: {'triton' if torch.cuda.is_available() else 'onnx'} backend)")


@pytest.mark.slow
def test_generate_answers_the_demo_prompt():
    out = lowerlm("generate", "--compare-eager", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "identical tokens" in out.stdout and "tokens/s (transformers eager)" in out.stdout


@pytest.mark.slow
def test_arm_hist_and_arm_eval(tmp_path):
    out = lowerlm("arm-hist", "--model", "smollm2", "--layer", "15", "--out", str(tmp_path / "h.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    stats = re.search(r"skew of a ([\d.-]+), .* mass of a_hat within \+-tau ([\d.]+);", out.stdout)
    assert stats and float(stats[1]) > 1 and abs(float(stats[2]) - 0.5) < 0.01, out.stdout  # tau: the median |a_hat|
    out = lowerlm("arm-eval", "--model", "smollm2", "--sparsities", "0.5", "--max-tokens", "32")
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1].strip() for line in out.stdout.splitlines()[2:]]
    assert rows == ["dense", "arm", "arm, centre only", "plain"]
    bad = lowerlm("arm-hist", "--model", "smollm2", "--layer", "99", "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "--layer 99: smollm2 has 30 layers; give --layer 0 to 29" in bad.stderr


def test_export_onnx(tiny_dir, tmp_path):
    """Written under a temporary name and renamed into place (nothing else is left in the parent), with the usual
    permissions; a previous export is replaced."""
    out = lowerlm("export-onnx", "--model", tiny_dir, "--out", str(tmp_path / "x"), "--max-seq-len", "64")
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert names == ["decode.onnx", "decode.onnx.data", "lowerlm_onnx.json", "prefill.onnx", "prefill.onnx.data"]
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o777 & ~umask
    again = lowerlm("export-onnx", "--model", tiny_dir, "--out", str(tmp_path / "x"), "--max-seq-len", "32")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "x" / "lowerlm_onnx.json").read_text())["max_seq_len"] == 32
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, auto prefers Triton")
def test_dump_ir_reports_the_auto_backend_plan(tiny_dir):
    out = lowerlm("dump-ir", "--model", tiny_dir, "--after", "specialize", "--backend", "auto")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    tail = lines[lines.index("// backend plan (auto)"):]
    assert tail[1:] == ["//   preferred backend: onnx on cpu",
                        "//   prefill: 1 partition, 0 cross-device copies per run",
                        "//     prefill: onnx on cpu, 21 nodes (%embed_tokens .. %lm_head)",
                        "//   decode: 1 partition, 0 cross-device copies per run",
                        "//     decode: onnx on cpu, 18 nodes (%embed_tokens .. %lm_head)"]
