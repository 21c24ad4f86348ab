"""The trace cache: export + import of SmolLM2 takes ~25 s, so the imported IR is kept on disk.

The key covers everything a trace depends on except weight values: the source of every module class in the
model, its parameter and buffer names, shapes and dtypes, the values of its buffers (``inv_freq``), its config,
the torch and transformers versions and the source of lowerlm's frontend and IR.

An entry is one file, ``traces/<key>.ir``: a first line ``// lowerlm-trace <hash>=<hex>`` holding the content hash
of the IR text after it, then that text. The header is an IR comment, so the file still reads with ``parse_module``
and ``lowerlm dump-ir --ir``; and being in the same file, written with one atomic rename, it cannot disagree with
the text the way a sidecar written separately could. Every load checks the hash before parsing: a changed digit in
a constant parses and verifies, and would compute other numbers. Processes tracing the same model at once take turns
on ``traces/<key>.lock``: one traces, the others read its entry.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import warnings
from pathlib import Path
from typing import Callable

import torch

from lowerlm.ir.cache import HASH, atomic_write, bytes_digest, cache_root, file_lock, source_digest
from lowerlm.ir.errors import LowerlmError
from lowerlm.ir.graph import Module
from lowerlm.ir.parser import parse_module
from lowerlm.ir.printer import print_module
from lowerlm.ir.verifier import verify_module
from lowerlm.ir.weights import Param, expr_str, tensor_digest


def _class_source(cls) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return cls.__module__ + "." + cls.__qualname__


def trace_key(model: torch.nn.Module, captures=()) -> str:
    import lowerlm.frontend as frontend
    import lowerlm.ir as ir

    h = hashlib.sha256()
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: c.__module__ + c.__qualname__):
        h.update(_class_source(cls).encode())
    for name, p in model.named_parameters(remove_duplicate=False):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    for name, b in model.named_buffers(remove_duplicate=False):
        h.update(f"{name}:{tuple(b.shape)}:{b.dtype}:{tensor_digest(b)};".encode())
    seen: set = set()  # the model's config and those of transformers models a plain module wraps (eps, window)
    for path, m in model.named_modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_json_string") and id(cfg) not in seen:
            seen.add(id(cfg))
            h.update(f"{path}:".encode() + cfg.to_json_string(use_diff=False).encode())
    versions = {"torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    h.update(json.dumps(versions, sort_keys=True).encode())
    h.update(source_digest(frontend, ir).encode())
    h.update(",".join(c.name for c in captures).encode())
    # what each capture makes of this model: a capture is code of its caller's too (a user's own, or a table
    # changed at run time), which the source digest above does not cover
    for cap in captures:
        h.update(f"{cap.name}:{cap.op.value}:{cap.args};".encode())
        for path, m in model.named_modules():
            if cap.matches(m):
                layout = [expr_str(fn(Param("w"))) if fn else None for fn in cap.layout(m)] if cap.layout else None
                h.update(f"{path}:{cap.weights(m)}:{sorted(cap.attrs(m).items())}:{layout};".encode())
    return h.hexdigest()[:24]


_HEADER = re.compile(rb"// lowerlm-trace (\w+)=([0-9a-f]+)\n")


def entry_text(module: Module) -> str:
    """A trace cache entry's text: the header with the content hash of the module's IR text, then that text."""
    body = print_module(module)
    return f"// lowerlm-trace {HASH}={bytes_digest(body.encode())}\n{body}"


def read_entry(path: Path) -> tuple[Module | None, str | None]:
    """``(module, None)`` for a whole entry; ``(None, why)`` otherwise: ``"missing"``, ``"stale"`` (hashed with
    another algorithm: made by other code, traced again without a warning) or what is damaged."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no entry, or no cache folder (a file in its place)
        return None, "missing"
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"
    m = _HEADER.match(data)
    if m is None:
        return None, "no lowerlm-trace header"
    if m.group(1).decode() != HASH:
        return None, "stale"
    body = data[m.end():]
    if bytes_digest(body) != m.group(2).decode():
        return None, "the text does not hold the bytes its header records"
    try:
        return verify_module(parse_module(body.decode())), None
    except (LowerlmError, UnicodeDecodeError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__


def trace_model(model: torch.nn.Module, use_cache: bool = True, progress: Callable[[str], None] | None = None,
                captures=()) -> Module:
    """The model's imported IR (one ``forward`` graph), from the trace cache when it holds a whole entry (hash,
    parse and verify checked on every load). ``captures`` (``frontend.capture.Capture``) swap modules for custom ops
    during export."""
    from lowerlm.frontend.export import check_supported
    from lowerlm.frontend.moe import EXPERTS_CAPTURE

    captures = [EXPERTS_CAPTURE] + list(captures)  # transformers' MoE experts always become one experts op
    check_supported(model)
    if not use_cache:
        return _trace(model, captures, progress)
    path = cache_root() / "traces" / f"{trace_key(model, captures)}.ir"
    module, _ = read_entry(path)
    if module is not None:
        return module
    wait = (lambda: progress(f"waiting for another process tracing {type(model).__name__}")) if progress else None
    with file_lock(path.with_suffix(".lock"), on_wait=wait):
        module, problem = read_entry(path)  # again: a process that held the lock may have traced it meanwhile
        if module is not None:
            return module
        if problem not in ("missing", "stale"):
            warnings.warn(f"lowerlm: trace cache entry {path} is corrupt ({problem}); tracing again", stacklevel=2)
        module = _trace(model, captures, progress)
        try:
            atomic_write(path, entry_text(module))
        except OSError as e:  # a read-only or full cache: the next compile traces again
            warnings.warn(f"lowerlm: cannot write the trace cache ({e}); compiling without it", stacklevel=2)
    return module


def _trace(model, captures, progress) -> Module:
    """Export and import: the slow part the cache skips."""
    from lowerlm.frontend.capture import captured
    from lowerlm.frontend.export import export_model
    from lowerlm.frontend.importer import import_program

    if progress:
        progress(f"exporting {type(model).__name__} with torch.export")
    with captured(model, captures):
        ep, info = export_model(model)
        if progress:
            progress("importing the aten graph into lowerlm's IR")
        return verify_module(import_program(ep, info))
