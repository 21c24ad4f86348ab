"""The ONNX backend's compile cache: a lowered graph is kept on disk, so a warm compile skips the lowering (packing
SmolLM2's weights into 4-bit blocks and building the protos takes ~6 s of a ~8 s start).

Entries live in ``cache_root()/onnx``:

- ``<key>.onnx``: one graph's model, its large initializers stored as external data;
- ``<key>.json``: the model file's SHA-256 and the size and modification time of each blob it names (written before
  it);
- ``<digest>.bin``: one initializer's bytes, named by their SHA-256, so the prefill and decode graphs (and every
  compile of the same weights) share one copy.

The key covers the graph's IR text, the fingerprint of every weight it reads (expression and values), the lowering's
options, the onnx / onnxruntime / numpy versions and the source of the lowering. Files are written atomically, the
blobs and the manifest before the model that names them, so a reader sees a whole entry or none. Loading hashes the
model file (small) and checks it against the manifest, so a changed byte there is found, also one that leaves a
model ONNX Runtime would run with other numbers. A blob is hashed again only when its size or modification time is
not what the manifest recorded (the weight cache's rule, lowerlm/models.py: hashing SmolLM2's 223 MB of blobs took
0.45 s of every warm start); one whose bytes then differ from its name is damaged. A damaged file, or a model ONNX
Runtime refuses, gets a warning and the graph is lowered again. Nothing is ever evicted: delete the folder to
reclaim its space.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import onnx

from lowerlm.ir.cache import atomic_write, cache_root, file_digest, source_digest
from lowerlm.ir.graph import Graph
from lowerlm.ir.printer import print_graph

INLINE_BYTES = 1024  # initializers smaller than this stay inside the model file


def folder() -> Path:
    return cache_root() / "onnx"


@functools.lru_cache(maxsize=None)
def _lowering_source() -> str:
    """The lowering's source, read once per process (entries written by one process share one key)."""
    import lowerlm.codegen.onnx as lowering

    return source_digest(lowering)


def graph_key(g: Graph, weights_fingerprint: str, options: dict) -> str:
    """The entry's name for graph ``g`` lowered with ``options`` over weights with this fingerprint."""
    import onnxruntime

    h = hashlib.sha256(print_graph(g).encode())
    h.update(weights_fingerprint.encode())
    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    h.update(json.dumps({"options": options, "versions": versions}, sort_keys=True).encode())
    h.update(_lowering_source().encode())
    return h.hexdigest()[:24]


def _external(tensor: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in tensor.external_data}


_checked: set = set()  # blobs this process has read whole, (path, size, mtime): graphs sharing one hash it once


def _blob_ok(blob: Path) -> bool:
    """Whether ``blob`` exists and holds the bytes it is named after."""
    try:
        stat = blob.stat()
    except FileNotFoundError:
        return False
    seen = (str(blob), stat.st_size, stat.st_mtime_ns)
    if seen not in _checked:
        if file_digest(blob) != blob.stem:
            return False
        _checked.add(seen)
    return True


def _manifest_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


def _stat(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def load(key: str):
    """``(path, model without its external data)`` of a whole, undamaged entry, else None (a damaged one is removed
    with a warning)."""
    path = folder() / f"{key}.onnx"
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
        try:
            manifest = json.loads(_manifest_path(path).read_text())
        except FileNotFoundError:
            manifest = {}
        if manifest.get("model") != hashlib.sha256(data).hexdigest():
            raise ValueError(f"the model file does not hold the bytes {_manifest_path(path).name} records")
        model = onnx.load_model_from_string(data)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                blob = folder() / _external(t)["location"]
                try:
                    as_written = _stat(blob) == manifest["blobs"].get(blob.name)
                except FileNotFoundError:
                    as_written = False
                if not as_written and not _blob_ok(blob):
                    raise ValueError(f"{blob.name} is missing or does not hold the bytes it is named after")
    except Exception as e:  # a truncated or altered file: protobuf's, onnx's and the digest check's errors
        discard(path, e, "is damaged")
        return None
    return path, model


def store(key: str, model: onnx.ModelProto) -> Path:
    """Write ``model`` as entry ``key`` and return the model file's path: its large initializers become shared blobs
    and ``model`` refers to them. On OSError (the cache cannot be written) ``model`` is left as it was."""
    root = folder()
    blobs = []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= INLINE_BYTES:
            digest = hashlib.sha256(t.raw_data).hexdigest()
            blob = root / f"{digest}.bin"
            if not _blob_ok(blob):
                atomic_write(blob, t.raw_data)  # content-addressed: a concurrent writer writes the same bytes
            blobs.append((t, blob))
    data = {}
    for t, blob in blobs:
        data[t.name] = t.raw_data
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", blob.name), ("offset", "0"), ("length", str(len(data[t.name])))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
    path = root / f"{key}.onnx"
    try:
        serialized = model.SerializeToString()
        manifest = {"model": hashlib.sha256(serialized).hexdigest(), "blobs": {b.name: _stat(b) for _, b in blobs}}
        atomic_write(_manifest_path(path), json.dumps(manifest))
        atomic_write(path, serialized)
    except OSError:
        for t, _ in blobs:  # back to the model as lowered
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data[t.name]
        raise
    return path


def discard(path, error: Exception, what: str = "cannot be loaded by ONNX Runtime") -> None:
    """Remove a bad entry's model file and its manifest, with a warning (the caller lowers the graph again)."""
    first = str(error).splitlines()[0] if str(error) else ""
    warnings.warn(f"lowerlm: ONNX compile cache entry {path} {what} ({type(error).__name__}: {first}); lowering "
                  "again", stacklevel=3)
    for p in (Path(path), _manifest_path(Path(path))):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
