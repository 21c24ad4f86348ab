"""Every bad input of the command line, as one table: each row runs ``python -m lowerlm …`` in a subprocess and
checks exit code 2, exactly one line on stderr (``lowerlm: error: …``, naming what was wrong), no traceback, and
nothing written in the working folder; the rows that must succeed check their result instead.

Rows marked ``PRE`` must be refused before the model is loaded: their model is a trap, an HF folder whose config
is a tiny Llama's but whose weights are garbage, so loading it first would print a different error ("cannot load
model"); they must also be fast (no torch import). Ctrl-C (SIGINT during a compile, on a pseudo-terminal so that
progress shows when the compile starts) exits with 130 and one line; a closed stdout exits quietly with 141.
The library's own checks (``lowerlm.compile_model``, ``cm.dump``, sampling) follow the table.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, tiny_model

PRE = "pre"  # refused before loading the model
FAST_S = 10.0  # a pre-load refusal imports neither torch nor transformers: ~0.2 s; generous for a loaded CI


def lowerlm(argv: list, env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowerlm", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def char_tokenizer():
    """A character tokenizer of 50 ids, so that a tiny model (vocabulary 64) can take text."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,;:'\"-()?!\n")
    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model folders and files the rows name, an environment with its own cache, and a working folder."""
    import transformers

    root = tmp_path_factory.mktemp("cli-errors")
    m = root / "models"
    tiny = tiny_model("llama")
    tiny.save_pretrained(m / "tiny")  # no tokenizer: token ids only
    tiny.save_pretrained(m / "tok")
    char_tokenizer().save_pretrained(m / "tok")
    tiny.config.save_pretrained(m / "trap")  # a tiny Llama's config, weights that cannot load
    (m / "trap" / "model.safetensors").write_bytes(b"not safetensors" * 64)
    transformers.DeepseekV32Config(index_topk=12).save_pretrained(m / "dsatrap")  # DSA's config, no weights
    (m / "dsatrap" / "model.safetensors").write_bytes(b"not safetensors" * 64)
    tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
               ).save_pretrained(m / "dynamic")
    torch.manual_seed(0)
    transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                           state_size=4)).save_pretrained(m / "mamba")
    (m / "noconfig").mkdir()
    (m / "garbage.gguf").write_bytes(b"\x00" * 64)
    (m / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 40)
    (m / "random.ir").write_bytes(bytes(range(128, 256)) * 4)
    (m / "bad.ir").write_text("graph f(%x: f32[2]) {\n  %y = nope(%x) : f32[2]\n  return %y\n}\n")
    (m / "invalid.ir").write_text("graph f(%x: f32[2]) {\n  %y = neg(%x) : f32[3]\n  return %y\n}\n")
    work = root / "work"  # the folder output-path rows write in (or must not)
    work.mkdir()
    (work / "existing").write_text("keep me\n")
    (work / "full").mkdir()
    (work / "full" / "notes.txt").write_text("mine\n")
    (work / "dir.png").mkdir()
    env = dict(os.environ, LOWERLM_CACHE_DIR=str(root / "cache"))
    env.pop("TRITON_INTERPRET", None)
    return {"root": root, "models": m, "work": work, "env": env, "example": str(ROOT / "examples" / "tiny_llama.ir")}


def fill(argv: tuple, w: dict) -> list:
    """The arguments with ``{name}`` replaced by the path of that file in the models folder (or work, example)."""
    names = {p.name: str(p) for p in w["models"].iterdir()}
    names.update(work=str(w["work"]), example=w["example"])
    out = []
    for a in argv:
        for name, path in names.items():
            a = a.replace("{" + name + "}", path)
        out.append(a)
    return out


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


G = ("generate", "--model", "{trap}")
GT = G + ("--token-ids",)
A = ("arm-hist", "--model", "{trap}")
X = ("export-onnx", "--model", "{trap}")

# (id, argv, what the error line must contain, PRE when it must come before loading)
ERRORS = [
    # generate: each flag alone
    ("temperature-nan", GT + ("--temperature", "nan", "1,2"), "argument --temperature: expected a finite number", PRE),
    ("temperature-inf", GT + ("--temperature", "inf", "1,2"), "expected a finite number, got 'inf'", PRE),
    ("temperature-negative", GT + ("--temperature", "-1", "1,2"), "must be >= 0 (0: greedy), got -1", PRE),
    ("temperature-word", GT + ("--temperature", "warm", "1,2"), "expected a number, got 'warm'", PRE),
    ("seed-huge", GT + ("--temperature", "1", "--seed", "100000000000000000000000", "1,2"),
     "argument --seed: must be in [0, 2**63)", PRE),
    ("seed-negative", GT + ("--temperature", "1", "--seed", "-5", "1,2"), "must be in [0, 2**63), got -5", PRE),
    ("seed-float", GT + ("--temperature", "1", "--seed", "1.5", "1,2"), "expected an integer, got '1.5'", PRE),
    ("max-seq-len-huge", GT + ("--max-seq-len", "1000000000", "1,2"),
     "--max-seq-len 1000000000 is more than the 128 positions", PRE),
    ("max-seq-len-index-topk", ("generate", "--model", "{dsatrap}", "--token-ids", "--max-seq-len", "13", "1,2"),
     "'s sparse attention selects (index_topk 12 in its config)", PRE),
    ("max-seq-len-1", GT + ("--max-seq-len", "1", "1,2"), "argument --max-seq-len: must be >= 2, got 1", PRE),
    ("max-seq-len-word", GT + ("--max-seq-len", "long", "1,2"), "expected an integer, got 'long'", PRE),
    ("max-new-tokens-0", GT + ("--max-new-tokens", "0", "1,2"), "argument --max-new-tokens: must be >= 1", PRE),
    ("max-batch-0", GT + ("--max-batch", "0", "1,2"), "argument --max-batch: must be >= 1", PRE),
    ("top-p-0", GT + ("--temperature", "1", "--top-p", "0", "1,2"), "argument --top-p: must be in (0, 1]", PRE),
    ("top-p-1.5", GT + ("--temperature", "1", "--top-p", "1.5", "1,2"), "must be in (0, 1] (1: off), got 1.5", PRE),
    ("top-p-nan", GT + ("--temperature", "1", "--top-p", "nan", "1,2"), "argument --top-p: expected a finite", PRE),
    ("top-k-negative", GT + ("--temperature", "1", "--top-k", "-1", "1,2"), "argument --top-k: must be >= 0", PRE),
    ("backend-unknown", GT + ("--backend", "tpu", "1,2"), "argument --backend: invalid choice: 'tpu'", PRE),
    ("weight-bits-3", GT + ("--weight-bits", "3", "1,2"), "argument --weight-bits: invalid choice: 3", PRE),
    ("unknown-flag", GT + ("--temprature", "1", "1,2"), "unrecognized arguments: --temprature", PRE),
    ("no-prompt", G, "the following arguments are required: prompt", PRE),
    # generate: flags together, prompts
    ("top-k-when-greedy", GT + ("--top-k", "5", "1,2"), "--top-k shape sampling, but --temperature 0", PRE),
    ("seed-when-greedy", GT + ("--seed", "7", "1,2"), "--seed shape sampling", PRE),
    ("weight-bits-reference", GT + ("--backend", "reference", "--weight-bits", "4", "1,2"),
     "--weight-bits quantizes weights for the ONNX backend", PRE),
    ("compare-eager-sampling", GT + ("--temperature", "1", "--compare-eager", "1,2"), "--compare-eager compares", PRE),
    ("raw-token-ids", GT + ("--raw", "1,2"), "--raw sends text without the chat template", PRE),
    ("token-ids-not-int", GT + ("1,a",), "--token-ids prompt 0 ('1,a') must be integers", PRE),
    ("token-ids-negative", GT + ("3 -1",), "token id -1 in prompt 0 is negative", PRE),
    ("token-ids-empty", GT + (" ",), "the prompt is empty", PRE),
    ("prompt-empty", G + ("",), "the prompt is empty", PRE),
    ("batch-over-max", GT + ("1", "2"), "2 prompts are more than --max-batch 1", PRE),
    ("prompt-too-long-ids", GT + ("--max-seq-len", "4", "1,2,3,4,5"), "prompt 0 is 5 tokens, longer than "
     "--max-seq-len 4 allows", PRE),
    ("token-out-of-vocab", GT + ("1,2,999",), "token id 999 in prompt 0 is outside the vocabulary [0, 64)", PRE),
    ("no-tokenizer", G + ("hello",), "has no tokenizer", PRE),
    ("prompt-too-long-text", ("generate", "--model", "{tok}", "--max-seq-len", "10", "hello there, how are you?"),
     "prompt 0 is 25 tokens, longer than --max-seq-len 10 allows", None),
    # models
    ("model-unknown", ("dump-ir", "--model", "gpt-17"), "unknown model 'gpt-17'", PRE),
    ("gguf-missing", ("dump-ir", "--model", "{work}/missing.gguf"), "GGUF file not found", PRE),
    ("gguf-garbage", ("dump-ir", "--model", "{garbage.gguf}"), "is not a GGUF file (bad magic)", PRE),
    ("gguf-truncated", ("dump-ir", "--model", "{truncated.gguf}"), "cannot read GGUF file", None),
    ("folder-no-config", ("dump-ir", "--model", "{noconfig}"), "is not an HF model directory (no config.json)", PRE),
    ("mamba", ("export-onnx", "--model", "{mamba}", "--out", "{work}/x"),
     "MambaForCausalLM cannot run scaled-dot-product attention", None),
    ("dynamic-rope", ("dump-ir", "--model", "{dynamic}"), "unsupported op 'dynamic NTK rotary embedding' in module "
     "'model.rotary_emb'", None),
    # dump-ir
    ("ir-binary", ("dump-ir", "--ir", "{random.ir}"), "is not UTF-8 text (byte 0x80 at offset 0)", PRE),
    ("ir-missing", ("dump-ir", "--ir", "{work}/missing.ir"), "cannot read IR file", PRE),
    ("ir-folder", ("dump-ir", "--ir", "{work}"), "cannot read IR file", PRE),
    ("ir-parse-error", ("dump-ir", "--ir", "{bad.ir}"), "2:8: unknown op 'nope'", PRE),
    ("ir-invalid", ("dump-ir", "--ir", "{invalid.ir}"), "neg yields f32[2] but the node declares f32[3]", PRE),
    ("after-unknown", ("dump-ir", "--model", "{trap}", "--after", "fuse_all"), "unknown pass 'fuse_all'", PRE),
    ("after-upcast", ("dump-ir", "--model", "{trap}", "--after", "upcast"), "pass 'upcast' runs only when", PRE),
    ("after-arm", ("dump-ir", "--model", "{trap}", "--after", "arm"), "pass 'arm' runs only with calibration", PRE),
    ("format-unknown", ("dump-ir", "--model", "{trap}", "--format", "xml"), "invalid choice: 'xml'", PRE),
    ("dump-backend-unknown", ("dump-ir", "--model", "{trap}", "--backend", "cuda"), "invalid choice: 'cuda'", PRE),
    ("model-and-ir", ("dump-ir", "--model", "{trap}", "--ir", "{example}"), "not allowed with argument", PRE),
    # commands
    ("no-command", (), "the following arguments are required: COMMAND", PRE),
    ("unknown-command", ("frobnicate",), "invalid choice: 'frobnicate'", PRE),
    ("passes-extra", ("passes", "--all"), "unrecognized arguments: --all", PRE),
    # arm-hist
    ("hist-sparsity-1.5", A + ("--layer", "0", "--out", "{work}/h.png", "--sparsity", "1.5"),
     "argument --sparsity: a sparsity is the share of activations zeroed, in [0, 1); got 1.5", PRE),
    ("hist-sparsity-nan", A + ("--layer", "0", "--out", "{work}/h.png", "--sparsity", "nan"), "expected a finite", PRE),
    ("hist-out-no-folder", A + ("--layer", "0", "--out", "/nonexistent/dir/x.png"),
     "folder /nonexistent/dir does not exist", PRE),
    ("hist-out-is-folder", A + ("--layer", "0", "--out", "{work}/dir.png"), "is a folder; give the image file", PRE),
    ("hist-out-folder", A + ("--layer", "0", "--out", "{work}"), "is a folder; give the image file", PRE),
    ("hist-out-format", A + ("--layer", "0", "--out", "{work}/h.txt"), "should end in .png, .svg, .pdf", PRE),
    ("hist-out-read-only", A + ("--layer", "0", "--out", "/proc/h.png"), "cannot create a file in /proc", PRE),
    ("hist-layer-negative", A + ("--layer", "-1", "--out", "{work}/h.png"), "argument --layer: must be >= 0", PRE),
    ("hist-layer-99", A + ("--layer", "99", "--out", "{work}/h.png"), "--layer 99: ", PRE),
    ("hist-no-layer", A + ("--out", "{work}/h.png"), "the following arguments are required: --layer", PRE),
    ("hist-no-tokenizer", A + ("--layer", "0", "--out", "{work}/h.png"), "has no tokenizer", PRE),
    # arm-eval
    ("eval-sparsities-words", ("arm-eval", "--model", "{trap}", "--sparsities", "a,b"), "expected a number, got 'a'",
     PRE),
    ("eval-sparsities-1.5", ("arm-eval", "--model", "{trap}", "--sparsities", "0.5,1.5"), "in [0, 1); got 1.5", PRE),
    ("eval-sparsities-empty", ("arm-eval", "--model", "{trap}", "--sparsities", ""), "separated by commas", PRE),
    ("eval-sparsities-gap", ("arm-eval", "--model", "{trap}", "--sparsities", "0.3,,0.5"), "separated by commas",
     PRE),
    ("eval-max-tokens-1", ("arm-eval", "--model", "{trap}", "--max-tokens", "1"), "argument --max-tokens: must be "
     ">= 2", PRE),
    ("eval-no-tokenizer", ("arm-eval", "--model", "{trap}"), "has no tokenizer", PRE),
    # export-onnx
    ("export-out-file", X + ("--out", "{work}/existing"), "exists and is not a folder", PRE),
    ("export-out-full", X + ("--out", "{work}/full"), "holds other files", PRE),
    ("export-out-read-only", X + ("--out", "/proc/lowerlm-export"), "cannot create a file in /proc", PRE),
    ("export-max-seq-len-1", X + ("--out", "{work}/x", "--max-seq-len", "1"), "must be >= 2", PRE),
    ("export-max-seq-len-huge", X + ("--out", "{work}/x", "--max-seq-len", "100000"), "more than the 128 positions",
     PRE),
    ("export-no-out", X, "the following arguments are required: --out", PRE),
]
# the rows that must work, or stop in a way of their own (see their checks below)
OTHERS = ["version", "broken-pipe", "sequence-limit-note", "ctrl-c"]


@pytest.mark.parametrize("case", [pytest.param(row, id=row[0]) for row in ERRORS] + OTHERS)
def test_cli(case, world):
    if isinstance(case, str):
        return OTHER_CHECKS[case](world)
    _, argv, message, when = case
    before = snapshot(world["work"])
    start = time.perf_counter()
    out = lowerlm(fill(argv, world), world["env"], world["work"])
    seconds = time.perf_counter() - start
    lines = out.stderr.splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("lowerlm: error: "), out.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert snapshot(world["work"]) == before, "an error left something written"
    if when == PRE:
        assert "cannot load model" not in lines[0]  # the trap model was not loaded first
        assert seconds < FAST_S, f"{seconds:.1f} s: checked after slow work"


def _version(w):
    out = lowerlm(["--version"], w["env"], w["work"])
    assert out.returncode == 0 and out.stderr == ""
    import lowerlm as pkg

    line = out.stdout.strip()
    # the installed distributions' versions (torch.__version__ may add a local label such as +cu130)
    torch_version = importlib.metadata.version("torch")
    assert line.startswith(f"lowerlm {pkg.__version__} (torch {torch_version}, transformers ")
    assert "onnxruntime " in line and "triton " in line


def _broken_pipe(w):
    """``lowerlm dump-ir … | head -1``: the reader goes away; no BrokenPipeError, exit 141 as SIGPIPE gives."""
    proc = subprocess.Popen([sys.executable, "-m", "lowerlm", "dump-ir", "--ir", w["example"]], cwd=w["work"],
                            env=w["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the first write: every write fails
    err = proc.stderr.read()
    assert proc.wait(60) == 141 and err == b"", err


def _sequence_limit_note(w):
    """20 tokens asked for with --max-seq-len 8: the 3-token prompt stops after 6, and stderr says why."""
    out = lowerlm(["generate", "--model", fill(("{tiny}",), w)[0], "--token-ids", "--max-new-tokens", "20",
                   "--max-seq-len", "8", "--backend", "reference", "1,2,3"], w["env"], w["work"])
    assert out.returncode == 0, out.stderr
    tokens = out.stdout.splitlines()[0]
    assert tokens.startswith("[0] [") and tokens.count(",") == 5, out.stdout
    assert out.stderr.splitlines() == [
        "lowerlm: note: generation stopped after 6 of --max-new-tokens 20 tokens at the sequence limit "
        "--max-seq-len 8 (prompt 3 tokens); pass --max-seq-len 22 or more for all 20"]


def _ctrl_c(w):
    """SIGINT once the compile has started (progress on a pseudo-terminal says when): one line, exit 130."""
    import pty

    env = dict(w["env"], LOWERLM_CACHE_DIR=str(w["root"] / "cache-ctrl-c"))  # a cold cache: the trace runs
    master, slave = pty.openpty()
    # the child gets SIGINT's default disposition, as from a terminal: a process that starts with SIGINT ignored
    # (inherited from whatever ran the suite) never turns it into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "lowerlm", "dump-ir", "--model", fill(("{tiny}",), w)[0]],
                            cwd=w["work"], env=env, stdout=subprocess.DEVNULL, stderr=slave,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    seen = b""

    def read() -> bytes:
        try:
            return os.read(master, 4096)
        except OSError:  # the pseudo-terminal closes with the process
            return b""

    try:
        deadline = time.monotonic() + 90
        while b"exporting LlamaForCausalLM" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += read()
        time.sleep(0.3)  # into the export
        proc.send_signal(signal.SIGINT)
        # keep draining the pseudo-terminal while it exits: a full one blocks the child's progress writes
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                seen += read()
        code = proc.wait(5)
        while select.select([master], [], [], 0.2)[0] and (chunk := read()):
            seen += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = seen.decode(errors="replace")
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert lines[-1].startswith("lowerlm: error: interrupted (Ctrl-C)"), text
    assert sum(line.startswith("lowerlm: error:") for line in lines) == 1


OTHER_CHECKS = {"version": _version, "broken-pipe": _broken_pipe, "sequence-limit-note": _sequence_limit_note,
                "ctrl-c": _ctrl_c}


def test_every_row_has_a_unique_id():
    ids = [row[0] for row in ERRORS] + OTHERS
    assert len(ids) == len(set(ids)) and len(ids) >= 40


def test_the_cli_constants_match_the_library():
    """The CLI takes the backends and the default max_seq_len from the registry (codegen/program.py, no torch), as
    compile_model does, and keeps a copy of the default model's name so that refusing a flag imports no torch."""
    import lowerlm.cli as cli
    import lowerlm.compile as compile_
    import lowerlm.models as models

    assert cli.BACKENDS is compile_.BACKENDS and cli.DEFAULT_MAX_SEQ_LEN == compile_.DEFAULT_MAX_SEQ_LEN
    assert cli.DEFAULT_MODEL == models.DEFAULT_MODEL


# ---- the library's own checks ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    import lowerlm

    return lowerlm.compile_model(tiny_model("llama"), backend="reference", max_batch=1)


def test_dump_names_the_choices(compiled):
    from lowerlm.errors import InputError

    with pytest.raises(InputError, match=r"'bogus' is not a pass; give 'all', 'none' \(as imported\) or one of the "
                                         r"passes that ran: canonicalize, "):
        compiled.dump(after="bogus")
    with pytest.raises(InputError, match="'arm' did not run in this compile"):
        compiled.dump(after="arm")
    with pytest.raises(InputError, match="'fuse_ew_chains' did not run in this compile"):  # the Triton tail's
        compiled.dump(after="fuse_ew_chains")
    out = io.StringIO()
    compiled.dump(after="none", file=out)
    assert out.getvalue().startswith("// imported\n") and "// after" not in out.getvalue()


def test_sampling_refuses_nan_and_a_seed_past_int64(compiled):
    from lowerlm.errors import InputError

    with pytest.raises(InputError, match="temperature must be a finite number"):
        list(compiled.generate_ids([[1, 2]], 2, temperature=float("nan")))
    with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        list(compiled.generate_ids([[1, 2]], 2, temperature=1.0, seed=10**23))


def test_a_kv_cache_larger_than_memory_is_refused_before_allocating():
    import lowerlm
    from lowerlm.errors import InputError

    with pytest.raises(InputError, match=r"max_seq_len 1000000000000 with max_batch 2 needs a 476837.2 GiB KV cache "
                                         r"\(256 bytes per token of each sequence\), more than this machine's"):
        lowerlm.compile_model(tiny_model("llama"), backend="reference", max_seq_len=10**12, max_batch=2)


def test_a_plain_module_wrapping_an_hf_model_compiles():
    """``forward(input_ids, position_ids)`` around a Llama that it calls without ``use_cache=False``: the model's
    DynamicCache used to reach the importer (a ShapeError naming no module); export turns the cache off."""
    import lowerlm

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = tiny_model("llama")

        def forward(self, input_ids, position_ids):
            return self.lm(input_ids, position_ids=position_ids).logits

    model = Wrapped().eval()
    cm = lowerlm.compile_model(model, backend="reference", max_batch=2, use_cache=False)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, torch.arange(7).repeat(2, 1))
    torch.testing.assert_close(cm(ids), expected, rtol=1e-4, atol=1e-5)
    assert model.lm.config.use_cache  # restored after export
    steps = [s[0] for s in cm.generate_ids([ids[0].tolist()], 4)]  # the wrapper has no stop tokens
    seq = ids[:1]
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq, torch.arange(seq.shape[1])[None])[:, -1:].argmax(-1)], 1)
    assert steps == seq[0, 7:].tolist()


def test_warnings_are_one_line_and_libraries_are_quiet(monkeypatch):
    """The CLI shows lowerlm's warnings as ``lowerlm: warning: …`` (no source line) and drops other libraries'."""
    import lowerlm.cli as cli
    from lowerlm.progress import Progress

    for key in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS",
                "TQDM_DISABLE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(key, os.environ.get(key, "x"))
    monkeypatch.setattr(sys, "warnoptions", [])
    stream = io.StringIO()
    with warnings.catch_warnings():
        cli._route_warnings(Progress(enabled=False, stream=stream))
        warnings.warn("lowerlm: trace cache entry x is corrupt (bad\nthings); tracing again", stacklevel=1)
        warnings.warn("`torch_dtype` is deprecated! Use `dtype` instead!", FutureWarning, stacklevel=1)
        warnings.warn("some library's advice", UserWarning, stacklevel=1)
    assert stream.getvalue() == "lowerlm: warning: trace cache entry x is corrupt (bad things); tracing again\n"


def test_quiet_goes_before_or_after_the_command():
    from lowerlm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-q", "passes"]).quiet and parser.parse_args(["passes", "--quiet"]).quiet
    assert not getattr(parser.parse_args(["passes"]), "quiet", False)


def test_progress_on_a_terminal_only():
    from lowerlm.progress import Progress

    assert not Progress.for_terminal(quiet=True).enabled
    stream = io.StringIO()
    p = Progress(enabled=True, stream=stream, interval=0.05)
    p("exporting")
    time.sleep(0.12)
    p("importing")
    p.line("lowerlm: note: something")
    p.done()
    lines = stream.getvalue().split("\n")
    assert lines[0].startswith("\rlowerlm: exporting … 0 s") and lines[0].endswith(" s\x1b[K")
    assert lines[1].startswith("\rlowerlm: importing … ") and lines[2] == "lowerlm: note: something"
    quiet = io.StringIO()
    q = Progress(enabled=False, stream=quiet)
    q("exporting")
    q.done()
    q.line("lowerlm: warning: kept")
    assert quiet.getvalue() == "lowerlm: warning: kept\n"
