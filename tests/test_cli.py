"""The command line through a subprocess: listings, IR dumps and one-line errors with exit code 2."""

from __future__ import annotations

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


def test_dump_ir_after_all_and_one_pass():
    example = str(ROOT / "examples" / "tiny_llama.ir")
    out = lowerlm("dump-ir", "--ir", example, "--after", "all")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("// imported\n")
    assert "// after canonicalize (5 rewrites)" in out.stdout
    assert "%q4" in out.stdout.split("// after")[0] and "%q4" not in out.stdout.split("// after")[1]
    one = lowerlm("dump-ir", "--ir", example, "--after", "canonicalize", "--format", "dot")
    assert one.returncode == 0 and one.stdout.startswith("// after canonicalize") and "digraph" in one.stdout


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


@pytest.mark.parametrize("args, message", [
    (("--token-ids", "--max-seq-len", "4", "1,2,3,4,5"), "longer than max_seq_len 4"),
    (("--token-ids", "1,2,999"), "token id 999 in prompt 0 is outside the vocabulary [0, 64)"),
    (("--token-ids", " "), "the prompt is empty"),
    (("--max-new-tokens", "0", "hi"), "--max-new-tokens must be >= 1"),
    (("--max-batch", "1", "--token-ids", "1", "2"), "2 prompts are more than --max-batch 1"),
    (("hello",), "this model has no tokenizer"),
    (("--backend", "reference", "--weight-bits", "4", "--token-ids", "1,2"),
     "weight_bits quantizes weights for the ONNX backend"),
])
def test_generate_errors_are_one_line_with_exit_code_2(tiny_dir, args, message):
    out = lowerlm("generate", "--model", tiny_dir, *args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert [line for line in lines if line.startswith("lowerlm: error: ")] == [f"lowerlm: error: {lines[-1][16:]}"]
    assert message in lines[-1], out.stderr


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.ir"
    bad.write_text("graph f(%x: f32[2]) {\n  %y = nope(%x) : f32[2]\n  return %y\n}\n")
    invalid = tmp_path / "invalid.ir"
    invalid.write_text("graph f(%x: f32[2]) {\n  %y = neg(%x) : f32[3]\n  return %y\n}\n")
    example = str(ROOT / "examples" / "tiny_llama.ir")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\x00" * 64)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 40)
    dynamic = tmp_path / "dynamic"
    tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
               ).save_pretrained(dynamic)
    cases = [
        (("dump-ir", "--model", "gpt-17"), "unknown model 'gpt-17'"),
        (("dump-ir", "--model", str(tmp_path / "missing.gguf")), "GGUF file not found"),
        (("dump-ir", "--model", str(garbage)), "not a GGUF file"),
        (("dump-ir", "--model", str(truncated)), "cannot read GGUF file"),
        (("dump-ir", "--model", str(dynamic)), "unsupported op 'dynamic NTK rotary embedding' in module "
                                               "'model.rotary_emb'"),
        (("dump-ir", "--ir", example, "--after", "fuse_all"), "unknown pass 'fuse_all'"),
        (("dump-ir", "--ir", str(tmp_path / "missing.ir")), "cannot read IR file"),
        (("dump-ir", "--ir", str(bad)), "2:8: unknown op 'nope'"),
        (("dump-ir", "--ir", str(invalid)), "neg yields f32[2] but the node declares f32[3]"),
    ]
    for args, message in cases:
        out = lowerlm(*args)
        assert out.returncode == 2, (args, out.stderr)
        # progress lines ("lowerlm: converting …") may come first; the error is one line, no traceback
        lines = out.stderr.splitlines()
        errors = [line for line in lines if line.startswith("lowerlm: error: ")]
        assert len(errors) == 1 and message in errors[0], out.stderr
        assert all(line.startswith("lowerlm: ") for line in lines), out.stderr


@pytest.mark.slow
def test_arm_hist_and_arm_eval(tmp_path):
    out = lowerlm("arm-hist", "--model", "smollm2", "--layer", "15", "--out", str(tmp_path / "h.png"))
    assert out.returncode == 0, out.stderr
    assert "skew of a" in out.stdout and (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    out = lowerlm("arm-eval", "--model", "smollm2", "--sparsities", "0.5", "--max-tokens", "128")
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1].strip() for line in out.stdout.splitlines()[2:]]
    assert rows == ["dense", "arm", "arm, centre only", "plain"]
    bad = lowerlm("arm-hist", "--model", "smollm2", "--layer", "99", "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "no gated MLP at layer 99" in bad.stderr


def test_export_onnx(tiny_dir, tmp_path):
    out = lowerlm("export-onnx", "--model", tiny_dir, "--out", str(tmp_path / "x"), "--max-seq-len", "64")
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert names == ["decode.onnx", "decode.onnx.data", "lowerlm_onnx.json", "prefill.onnx", "prefill.onnx.data"]


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
