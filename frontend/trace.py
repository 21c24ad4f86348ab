"""The trace cache: export + import of SmolLM2 takes ~25 s, so the imported IR is kept on disk.

The key covers everything a trace depends on except weight values: the source of every module class in the
model, its parameter and buffer names, shapes and dtypes, the values of its buffers (``inv_freq``), its config,
the torch and transformers versions and the source of lowerlm's frontend and IR.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from typing import Callable

import torch

from lowerlm.ir.cache import atomic_write, cache_root, source_digest
from lowerlm.ir.errors import LowerlmError
from lowerlm.ir.graph import Module
from lowerlm.ir.parser import parse_module
from lowerlm.ir.printer import print_module
from lowerlm.ir.verifier import verify_module
from lowerlm.ir.weights import tensor_digest


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
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    versions = {"torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    h.update(json.dumps(versions, sort_keys=True).encode())
    h.update(source_digest(frontend, ir).encode())
    h.update(",".join(c.name for c in captures).encode())
    return h.hexdigest()[:24]


def trace_model(model: torch.nn.Module, use_cache: bool = True, progress: Callable[[str], None] | None = None,
                captures=()) -> Module:
    """The model's imported IR (one ``forward`` graph), from the trace cache when it holds it. ``captures``
    (``frontend.capture.Capture``) swap modules for custom ops during export."""
    from lowerlm.frontend.capture import captured
    from lowerlm.frontend.export import check_supported, export_model
    from lowerlm.frontend.importer import import_program
    from lowerlm.frontend.moe import MOE_CAPTURE

    captures = [MOE_CAPTURE] + list(captures)  # transformers' MoE blocks always become one moe op
    check_supported(model)
    path = cache_root() / "traces" / f"{trace_key(model, captures)}.ir" if use_cache else None
    if path is not None and path.exists():
        try:
            return verify_module(parse_module(path.read_text()))
        except (LowerlmError, UnicodeDecodeError, OSError) as e:
            warnings.warn(f"lowerlm: trace cache entry {path} is corrupt ({e}); tracing again", stacklevel=2)
    if progress:
        progress(f"exporting {type(model).__name__} with torch.export")
    with captured(model, captures):
        ep, info = export_model(model)
        if progress:
            progress("importing the aten graph into lowerlm's IR")
        module = verify_module(import_program(ep, info))
    if path is not None:
        try:
            atomic_write(path, print_module(module))
        except OSError as e:  # a read-only or full cache: the next compile traces again
            warnings.warn(f"lowerlm: cannot write the trace cache ({e}); compiling without it", stacklevel=2)
    return module
