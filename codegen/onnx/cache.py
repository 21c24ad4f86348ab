"""The ONNX backend's compile cache: a lowered graph is kept on disk, so a warm compile skips the lowering (packing
SmolLM2's weights into 4-bit blocks and building the protos takes ~6 s of a ~8 s start).

Entries live in ``cache_root()/onnx``:

- ``<key>.onnx``: one graph's model, its large initializers stored as external data;
- ``<key>.json``: the manifest (written before the model): the content hash of the model file and the size and
  content hash of each blob it names, and the hash's name;
- ``<sha256>.bin``: one initializer's bytes, named by their SHA-256, so the prefill and decode graphs (and every
  compile of the same weights) share one copy. The name is a cryptographic address, computed once when a blob is
  written: no crafted weights can make a blob that takes another's name;
- ``<key>.lock``: the lock processes lowering the same graph take turns on (``ir/cache.py``, ``file_lock``).

The key covers the graph's IR text, the fingerprint of every weight it reads (expression and values), the lowering's
options, the onnx / onnxruntime / numpy versions and the source of the lowering, of the IR (weight expressions are
evaluated there) and of the reference program (which evaluates them). Files are written atomically, the blobs and
the manifest before the model that names them, so a reader sees a whole entry or none. Every load hashes the model
file and every blob it names and compares them with the manifest, whatever their sizes and modification times
(~0.05 s for SmolLM2's 232 MB of blobs with xxh3_128, docs/caches.md); within one process a blob already hashed is
not hashed again while its inode, size, mtime and ctime are unchanged (prefill and decode share their blobs; a write,
even one that restores the mtime, changes the ctime). A damaged file, or a model ONNX Runtime refuses, gets one
warning and the graph is lowered again. Nothing is ever evicted: delete the folder to reclaim its space.
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

from lowerlm.ir.cache import HASH, atomic_write, bytes_digest, cache_root, content_digest, source_digest
from lowerlm.ir.graph import Graph
from lowerlm.ir.printer import print_graph

INLINE_BYTES = 1024  # initializers smaller than this stay inside the model file


def folder() -> Path:
    return cache_root() / "onnx"


@functools.lru_cache(maxsize=None)
def _lowering_source() -> str:
    """The source an entry depends on, read once per process (entries written by one process share one key): the
    lowering, the IR (weight expressions, their evaluation) and the reference program (``constant``, which
    evaluates a graph's weights for the lowering)."""
    import lowerlm.codegen.onnx as lowering
    import lowerlm.codegen.reference as reference
    import lowerlm.ir as ir

    return source_digest(lowering, ir, reference)


def graph_key(g: Graph, weights_fingerprint: str, options: dict) -> str:
    """The entry's name for graph ``g`` lowered with ``options`` over weights with this fingerprint."""
    import onnxruntime

    h = hashlib.sha256(print_graph(g).encode())
    h.update(weights_fingerprint.encode())
    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    h.update(json.dumps({"options": options, "versions": versions}, sort_keys=True).encode())
    h.update(_lowering_source().encode())
    return h.hexdigest()[:24]


def lock_path(key: str) -> Path:
    """The lock file of entry ``key``, held while it is lowered and stored (``OnnxProgram._model``)."""
    return folder() / f"{key}.lock"


def _external(tensor: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in tensor.external_data}


# blob -> its content hash, for this process: keyed by what any write changes (a restored mtime leaves the ctime new)
_digests: dict = {}


def _identity(blob: Path) -> tuple:
    st = blob.stat()
    return str(blob), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _blob_digest(blob: Path) -> str:
    """The content hash of a blob, hashed once per process while the file is unchanged."""
    seen = _identity(blob)
    if seen not in _digests:
        _digests[seen] = content_digest(blob)
    return _digests[seen]


def _remember(blob: Path, digest: str) -> None:
    with contextlib.suppress(OSError):
        _digests[_identity(blob)] = digest


def _blob_ok(blob: Path, size: int, digest: str) -> bool:
    """Whether ``blob`` exists with this size and content hash."""
    try:
        return blob.stat().st_size == size and _blob_digest(blob) == digest
    except FileNotFoundError:
        return False


def _manifest_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


class _Stale(Exception):
    """An entry whose manifest names another hash: made by other code, replaced without a warning."""


def _check(key: str):
    """``(path, model without its external data)`` of a whole entry, None if there is none; raises what is wrong
    with a damaged one (``_Stale`` for one made with another hash)."""
    path = folder() / f"{key}.onnx"
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no entry, or no cache folder (a file in its place)
        return None
    try:
        manifest = json.loads(_manifest_path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{_manifest_path(path).name} is missing") from None
    if manifest.get("hash") != HASH:
        raise _Stale()
    if manifest.get("model") != bytes_digest(data):
        raise ValueError(f"the model file does not hold the bytes {_manifest_path(path).name} records")
    model = onnx.load_model_from_string(data)
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            blob = folder() / _external(t)["location"]
            rec = manifest["blobs"].get(blob.name)
            if rec is None:
                raise ValueError(f"{blob.name} is not in {_manifest_path(path).name}")
            if not _blob_ok(blob, rec["size"], rec["digest"]):
                raise ValueError(f"{blob.name} is missing or does not hold the bytes recorded")
    return path, model


def lookup(key: str):
    """``(path, model without its external data)`` of a whole, undamaged entry, else None; quiet (a damaged entry is
    left for ``load`` to report under the entry's lock)."""
    try:
        return _check(key)
    except Exception:
        return None


def load(key: str):
    """``(path, model without its external data)`` of a whole, undamaged entry, else None: a damaged one is removed
    with a warning, a stale one without."""
    path = folder() / f"{key}.onnx"
    try:
        return _check(key)
    except _Stale:
        return None  # store overwrites it
    except Exception as e:  # a truncated or altered file: protobuf's, onnx's and the digest checks' errors
        discard(path, e, "is damaged")
        return None


def store(key: str, model: onnx.ModelProto) -> Path:
    """Write ``model`` as entry ``key`` and return the model file's path: its large initializers become shared blobs
    and ``model`` refers to them. On OSError (the cache cannot be written) ``model`` is left as it was."""
    root = folder()
    blobs = []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= INLINE_BYTES:
            blob = root / f"{hashlib.sha256(t.raw_data).hexdigest()}.bin"
            rec = {"size": len(t.raw_data), "digest": bytes_digest(t.raw_data)}
            if not _blob_ok(blob, rec["size"], rec["digest"]):  # absent or damaged
                atomic_write(blob, t.raw_data)  # content-addressed: a concurrent writer writes the same bytes
                _remember(blob, rec["digest"])  # what was just written: the next graph's store need not read it
            blobs.append((t, blob, rec))
    data = {}
    for t, blob, _ in blobs:
        data[t.name] = t.raw_data
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", blob.name), ("offset", "0"), ("length", str(len(data[t.name])))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
    path = root / f"{key}.onnx"
    try:
        serialized = model.SerializeToString()
        manifest = {"hash": HASH, "model": bytes_digest(serialized),
                    "blobs": {blob.name: rec for _, blob, rec in blobs}}
        atomic_write(_manifest_path(path), json.dumps(manifest))
        atomic_write(path, serialized)
    except OSError:
        for t, _, _ in blobs:  # back to the model as lowered
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
        with contextlib.suppress(OSError):  # gone already, or a read-only cache: the new entry cannot be stored
            p.unlink()
