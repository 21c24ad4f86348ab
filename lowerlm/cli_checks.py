"""The CLI's checks: argparse ``type=`` functions that turn each bad flag into one line, and the checks of
flags, prompts and output paths against an HF folder's ``config.json`` that run before a model is loaded
(``lowerlm/cli.py`` says the rules)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from lowerlm.codegen.program import DEFAULT_MAX_SEQ_LEN  # (a module without torch)

DEFAULT_MODEL = "smollm2"  # lowerlm.models.DEFAULT_MODEL (not imported for it: the default model needs no check)
EXPORT_FILES = ("prefill.onnx", "prefill.onnx.data", "decode.onnx", "decode.onnx.data", "lowerlm_onnx.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
EXIT_USER_ERROR, EXIT_SIGPIPE, EXIT_INTERRUPTED = 2, 128 + 13, 128 + 2


# ---- argparse: one line per error ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (``lowerlm: error: …``, exit 2) instead of usage + message."""

    def error(self, message: str):
        see = "" if "`lowerlm " in message else f" (see `{self.prog} --help`)"
        self.exit(EXIT_USER_ERROR, f"lowerlm: error: {message}{see}\n")


def _flag(parse):
    """An argparse ``type=``: ``parse(text)`` raises ValueError with the message to show."""

    def check(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    check.__name__ = parse.__name__
    return check


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got '{text}'") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got '{text}'")
    return value


def _at_least(low: int, what: str = ""):
    def at_least(text: str) -> int:
        value = _int(text)
        if value < low:
            raise ValueError(f"must be >= {low}{what}, got {value}")
        return value

    return _flag(at_least)


@_flag
def _temperature(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise ValueError(f"must be >= 0 (0: greedy), got {text}")
    return value


@_flag
def _top_p(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1] (1: off), got {text}")
    return value


@_flag
def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2**63:
        raise ValueError(f"must be in [0, 2**63), got {text}")
    return value


def _sparsity_value(text: str) -> float:
    value = _float(text)
    if not 0 <= value < 1:
        raise ValueError(f"a sparsity is the share of activations zeroed, in [0, 1); got {text}")
    return value


_sparsity = _flag(_sparsity_value)


@_flag
def _sparsities(text: str) -> list:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(f"expected sparsities separated by commas, like 0.3,0.5; got '{text}'")
    return [_sparsity_value(p) for p in parts]


@_flag
def _model(text: str) -> str:
    """``lowerlm.models.resolve_model``'s checks (a GGUF's magic bytes included), so a wrong model is refused
    before anything loads; the default model is checked when it loads (its package's files)."""
    if text == DEFAULT_MODEL:
        return text
    from lowerlm.errors import ModelFileError
    from lowerlm.models import resolve_model

    try:
        resolve_model(text)
    except ModelFileError as e:
        raise ValueError(str(e)) from None
    return text


@_flag
def _ir_text(text: str) -> tuple:
    """(path, its text): read now, so a missing or binary file is refused at once."""
    try:
        data = Path(text).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read IR file '{text}': {e.strerror}") from None
    try:
        return text, data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"IR file '{text}' is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); give "
                         "a file of lowerlm IR text, as `lowerlm dump-ir --after none` prints") from None


@_flag
def _after(text: str) -> str:
    """'all', 'none' or a pass dump-ir can run (upcast and arm need data it does not have: why, and what to do)."""
    from lowerlm.passes import PASSES, TP_PASSES

    if text in ("all", "none") or text in PASSES or text in TP_PASSES:  # TP_PASSES: with --tp
        return text
    if text == "arm":
        raise ValueError("pass 'arm' runs only with calibration data, which dump-ir does not take; use "
                         "lowerlm.compile_model(model, arm=lowerlm.calibrate(model)).dump(after='arm')")
    if text == "upcast":
        raise ValueError("pass 'upcast' runs only when a bf16/f16 model is computed in float32, and dump-ir never "
                         "does that (lowerlm.load gives float32 models; --ir keeps the file's dtypes); use "
                         "lowerlm.compile_model(model.to(torch.bfloat16), dtype=torch.float32).dump(after='upcast')")
    raise ValueError(f"unknown pass '{text}'; give all, none or one of: {', '.join(PASSES)} (see `lowerlm passes`)")


def _writable(folder: Path) -> None:
    """Raise unless a file can be created in ``folder`` (tried and removed: permissions and read-only mounts
    alike, for root too)."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lowerlm-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot create a file in {folder} ({e.strerror or e}); give a path in a writable "
                         "folder") from None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@_flag
def _figure_out(text: str) -> Path:
    """arm-hist's image: a .png/.svg/.pdf path in an existing, writable folder."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"'{text}' is a folder; give the image file to write, like {path / 'hist.png'}")
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise ValueError(f"'{text}' should end in {', '.join(FIGURE_SUFFIXES)}: the image format is the suffix's")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"folder {parent} does not exist; create it or write the image elsewhere")
    _writable(parent)
    return path


@_flag
def _export_out(text: str) -> Path:
    """export-onnx's folder: new, empty, or a previous export (replaced); its nearest existing ancestor writable."""
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"'{text}' exists and is not a folder; give a new folder to write the ONNX models in")
        try:
            names = {p.name for p in path.iterdir()}
        except OSError as e:
            raise ValueError(f"cannot read folder '{text}': {e.strerror}") from None
        if names and "lowerlm_onnx.json" not in names:
            raise ValueError(f"folder '{text}' holds other files; give a new or empty folder (a previous "
                             "export-onnx folder is replaced)")
        _writable(path.absolute().parent)
        return path
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise ValueError(f"{ancestor} is not a folder, so '{text}' cannot be created in it")
    _writable(ancestor)
    return path


class _Version(argparse.Action):
    """``--version``: lowerlm's version and those of the libraries it compiles with (read from the installed
    packages' metadata, without importing them)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    from importlib import metadata

    import lowerlm

    def version(*dists: str) -> str:
        for dist in dists:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return "not installed"

    libs = [("torch", ("torch",)), ("transformers", ("transformers",)),
            ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")), ("triton", ("triton",))]
    return (f"lowerlm {lowerlm.__version__} (" + ", ".join(f"{name} {version(*dists)}" for name, dists in libs)
            + f"; python {sys.version.split()[0]})")


# ---- checks before loading ---------------------------------------------------------------------------------------
def _hf_config(model: str) -> dict | None:
    """An HF folder's config.json, read before loading the model (None for a GGUF or the default model, whose
    config exists only once loaded)."""
    import json

    path = Path(model)
    if model == DEFAULT_MODEL or path.suffix == ".gguf":
        return None
    from lowerlm.errors import ModelFileError

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot read {path / 'config.json'}: {e}".splitlines()[0]) from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{path / 'config.json'} is not a JSON object")
    return _text_config(cfg)


def _text_config(cfg: dict) -> dict:
    """A multimodal config's language model part, else the config."""
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


def _loaded_config(model) -> dict:
    cfg = getattr(model, "config", None)
    return _text_config(cfg.to_dict()) if hasattr(cfg, "to_dict") else {}


def _max_positions(cfg: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = cfg.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _index_topk(cfg: dict) -> int | None:
    """DeepSeek sparse attention's index_topk: lowerlm computes it exactly (densely) up to that many tokens."""
    value = cfg.get("index_topk")
    return value if isinstance(value, int) and value > 0 else None


def _context_limit(cfg: dict) -> int | None:
    """The most tokens lowerlm runs the model for: its positions, and DSA's index_topk."""
    limits = [v for v in (_max_positions(cfg), _index_topk(cfg)) if v is not None]
    return min(limits) if limits else None


def _check_max_seq_len(max_seq_len: int | None, cfg: dict, model: str) -> None:
    from lowerlm.errors import InputError

    limit = _max_positions(cfg)
    if max_seq_len is not None and limit is not None and max_seq_len > limit:
        raise InputError(f"--max-seq-len {max_seq_len} is more than the {limit} positions {model} was made for "
                         f"(max_position_embeddings in its config); pass --max-seq-len {limit} or less")
    topk = _index_topk(cfg)
    if max_seq_len is not None and topk is not None and max_seq_len > topk:
        raise InputError(f"--max-seq-len {max_seq_len} is more than {model}'s sparse attention selects (index_topk "
                         f"{topk} in its config): lowerlm computes it exactly as dense attention up to there; pass "
                         f"--max-seq-len {topk} or less")


def _check_prompt_ids(prompts: list, cfg: dict, max_seq_len: int | None) -> None:
    """Token-id prompts against the vocabulary and the sequence limit (the checks generation makes, before
    compiling)."""
    from lowerlm.errors import InputError

    vocab = cfg.get("vocab_size")
    limit = max_seq_len or DEFAULT_MAX_SEQ_LEN
    for i, p in enumerate(prompts):
        if len(p) >= limit:
            which = f"--max-seq-len {limit}" if max_seq_len else f"the default --max-seq-len {limit}"
            raise InputError(f"prompt {i} is {len(p)} tokens, longer than {which} allows (the prompt and one new "
                             f"token must fit); shorten it or pass --max-seq-len {len(p) + 1} or more")
        if isinstance(vocab, int):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise InputError(f"token id {bad[0]} in prompt {i} is outside the vocabulary [0, {vocab})")


def _check_layer(layer: int, cfg: dict, model: str) -> None:
    from lowerlm.errors import InputError

    layers = cfg.get("num_hidden_layers")
    if isinstance(layers, int) and layer >= layers:
        raise InputError(f"--layer {layer}: {model} has {layers} layers; give --layer 0 to {layers - 1}")


def _need_tokenizer(model: str, what: str) -> None:
    """An HF folder must hold a tokenizer (a GGUF carries its own, known only once loaded)."""
    from lowerlm.errors import InputError

    path = Path(model)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{model} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}){what}")
