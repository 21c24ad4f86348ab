"""The command line through a subprocess: listings, IR dumps and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def lowerlm(*args: str, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "lowerlm", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_passes_lists_the_pipeline():
    out = lowerlm("passes")
    assert out.returncode == 0
    assert out.stdout.split()[0] == "canonicalize" and "default" in out.stdout


def test_dump_ir_after_all_and_one_pass():
    example = str(ROOT / "examples" / "tiny_llama.ir")
    out = lowerlm("dump-ir", "--ir", example, "--after", "all")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("// imported\n")
    assert "// after canonicalize (5 rewrites)" in out.stdout
    assert "%q4" in out.stdout.split("// after")[0] and "%q4" not in out.stdout.split("// after")[1]
    one = lowerlm("dump-ir", "--ir", example, "--after", "canonicalize", "--format", "dot")
    assert one.returncode == 0 and one.stdout.startswith("// after canonicalize") and "digraph" in one.stdout


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.ir"
    bad.write_text("graph f(%x: f32[2]) {\n  %y = nope(%x) : f32[2]\n  return %y\n}\n")
    invalid = tmp_path / "invalid.ir"
    invalid.write_text("graph f(%x: f32[2]) {\n  %y = neg(%x) : f32[3]\n  return %y\n}\n")
    example = str(ROOT / "examples" / "tiny_llama.ir")
    cases = [
        (("dump-ir", "--ir", example, "--after", "fuse_all"), "unknown pass 'fuse_all'"),
        (("dump-ir", "--ir", str(tmp_path / "missing.ir")), "cannot read IR file"),
        (("dump-ir", "--ir", str(bad)), "2:8: unknown op 'nope'"),
        (("dump-ir", "--ir", str(invalid)), "neg yields f32[2] but the node declares f32[3]"),
    ]
    for args, message in cases:
        out = lowerlm(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
