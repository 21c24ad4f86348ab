"""On-disk caches' common ground for every stage: where they live, how entries are written (atomically), how their
contents are checked (a fast content hash) and how concurrent builders of one entry take turns (a file lock)."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not on Windows: there the caches work without locks
    fcntl = None

try:
    import xxhash
except ImportError:  # lowerlm installed without its dependencies (a GPU machine without network): a slower hash
    xxhash = None

# The content hash of every integrity check, named in each entry's manifest or header. An entry made with another
# one (older code, or a machine without xxhash) is rebuilt, not reported as damaged.
HASH = "xxh3_128" if xxhash is not None else "sha256"


def cache_root() -> Path:
    """``$LOWERLM_CACHE_DIR``, else ``~/.cache/lowerlm``."""
    root = os.environ.get("LOWERLM_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "lowerlm"


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _hasher():
    return xxhash.xxh3_128() if xxhash is not None else hashlib.sha256()


def bytes_digest(data) -> str:
    """``HASH`` of bytes (or any buffer), as hex: what every cache check compares."""
    h = _hasher()
    h.update(data)
    return h.hexdigest()


_local = threading.local()
_MMAP_BYTES = 1 << 20  # files from this size are hashed through mmap, smaller ones read into a buffer


def _hash_file(h, path: Path):
    """Feed a file's bytes to ``h``, the cheapest way measured (docs/caches.md): a large file in place through mmap
    (reading it copies it out of the page cache, which cost more than hashing it: 100 ms of CPU against 54 ms for
    SmolLM2's 538 MB model.safetensors); a small one (hundreds of ONNX blobs) read into one buffer per thread,
    allocated once (a fresh buffer per file doubled their time in page faults; an mmap per file costs system
    calls)."""
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size >= _MMAP_BYTES:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
            return h
        buf = getattr(_local, "buffer", None)
        if buf is None:
            buf = _local.buffer = bytearray(_MMAP_BYTES)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h


def content_digest(path: Path) -> str:
    """``HASH`` of a file's bytes, as hex: what every cache check compares."""
    return _hash_file(_hasher(), path).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file: for names that address content (a GGUF's converted folder, an ONNX blob), where a
    collision someone could craft must not make two contents share one name. Integrity checks use
    ``content_digest``."""
    return _hash_file(hashlib.sha256(), path).hexdigest()


def source_digest(*sources) -> str:
    """A digest of Python source: a package stands for its folder's .py files (not its subfolders), a module for
    its own file. Cache keys include it so that an entry made by other code is not served."""
    h = hashlib.sha256()
    for src in sources:
        path = Path(src.__file__)
        files = sorted(path.parent.glob("*.py")) if hasattr(src, "__path__") else [path]
        for p in files:
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing, never removed) while the block runs, so that
    processes building one cache entry take turns: the first builds, the others wait and then find the entry.
    ``on_wait()`` is called once if another process holds the lock. Yields whether the lock is held: a lock file
    that cannot be made (a read-only or missing cache folder, a file system without locks, Windows) costs only the
    sharing of work, so the block then runs unlocked."""
    fd = None
    if fcntl is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            fd = None
    locked = False
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    locked = True
            except OSError:  # no locks on this file system
                pass
        yield locked
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
