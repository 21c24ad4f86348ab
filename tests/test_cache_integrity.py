"""Every on-disk cache entry is checked by content on every load (docs/caches.md): one byte changed in place, its
mtime restored so that no size or time check could see it, gives one warning and a rebuilt entry, never the damaged
one; a whole entry is used without a warning or a rebuild. Processes building one entry at once take turns on its
lock: one builds, the others use its result."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings

import torch

import lowerlm
from lowerlm import models
from lowerlm.ir import cache as ir_cache

from .conftest import ROOT, tiny_model
from .test_onnx import _lowerings


def _flip_in_place(path, offset: int, mask: int = 0x10) -> None:
    """Change one byte of ``path`` in place (xor ``mask``) and put its modification time back."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


class _Warnings:
    """lowerlm's warnings raised inside the block."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings(record=True)
        self._caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self.messages = [str(w.message) for w in self._caught if str(w.message).startswith("lowerlm: ")]


def test_content_digest_and_file_lock(tmp_path):
    """The file hash is the bytes' hash, across the read blocks; the lock makes a second holder wait (told through
    on_wait) and a lock file that cannot be made leaves the block unlocked, not failed."""
    for size in (0, 5, ir_cache._MMAP_BYTES - 1, ir_cache._MMAP_BYTES, 3 * ir_cache._MMAP_BYTES + 5):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        assert ir_cache.content_digest(tmp_path / "f") == ir_cache.bytes_digest(data)
    assert ir_cache.HASH == "xxh3_128" and len(ir_cache.bytes_digest(b"")) == 32

    lock = tmp_path / "sub" / "entry.lock"
    order, waited = [], []
    with ir_cache.file_lock(lock) as held:
        assert held and lock.exists()

        def second():
            with ir_cache.file_lock(lock, on_wait=lambda: waited.append(1)):
                order.append("second")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first")
    t.join(10)
    assert order == ["first", "second"] and waited == [1]
    (tmp_path / "file").write_text("not a folder")
    with ir_cache.file_lock(tmp_path / "file" / "entry.lock") as held:
        assert held is False


class _Tokenizer:
    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


def _fake_gguf(tmp_path, monkeypatch, delay: float = 0.0):
    """A GGUF file whose 'dequantisation' is a tiny Llama (the real one is SmolLM2's ~20 s): everything else of the
    conversion, the manifest and the load runs as for a real GGUF."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 60)
    reads = []

    def read(path):
        reads.append(path)
        time.sleep(delay)
        return tiny_model("llama"), _Tokenizer()

    monkeypatch.setattr(models, "_read_gguf", read)
    return gguf, reads


def test_weight_cache_changed_in_place_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path / "cache"))
    gguf, reads = _fake_gguf(tmp_path, monkeypatch)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = models.load(str(gguf))(ids).logits
    (folder,) = [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]  # beside it: its lock file
    manifest = (folder / models.MANIFEST).read_text()
    assert '"hash": "xxh3_128"' in manifest and len(reads) == 1
    with _Warnings() as w, torch.no_grad():
        assert torch.equal(models.load(str(gguf))(ids).logits, want)
    assert w.messages == [] and len(reads) == 1

    weights = folder / "model.safetensors"
    _flip_in_place(weights, weights.stat().st_size - 100)  # a byte of the last tensor's data: it would still load
    with _Warnings() as w, torch.no_grad():
        got = models.load(str(gguf))(ids).logits
    assert len(w.messages) == 1 and str(folder) in w.messages[0] and "model.safetensors" in w.messages[0]
    assert len(reads) == 2 and torch.equal(got, want)

    (folder / "extra.json").write_text("{}")  # a file transformers might read that the manifest does not vouch for
    with _Warnings() as w:
        models.weight_cache(gguf)
    assert len(w.messages) == 1 and "extra.json" in w.messages[0] and len(reads) == 3
    (folder / models.MANIFEST).write_text(manifest.replace("xxh3_128", "sha256"))  # made with another hash: stale
    with _Warnings() as w:
        models.weight_cache(gguf)
    assert w.messages == [] and len(reads) == 4


def test_weight_cache_converted_once_by_concurrent_loads(tmp_path, monkeypatch):
    """Two loads of one GGUF at once (threads: flock locks conflict between open files, also in one process): one
    converts, the other waits on the lock and uses the result."""
    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path / "cache"))
    gguf, reads = _fake_gguf(tmp_path, monkeypatch, delay=1.0)
    messages, folders = [], []
    threads = [threading.Thread(target=lambda: folders.append(models.weight_cache(gguf, progress=messages.append)))
               for _ in range(2)]
    threads[0].start()
    while not reads:
        time.sleep(0.01)
    threads[1].start()
    for t in threads:
        t.join(30)
    assert len(reads) == 1 and len(folders) == 2 and folders[0] == folders[1]
    assert any(m.startswith("waiting for another process converting tiny.gguf") for m in messages)
    assert models.check_entry(folders[0]) is None


def _exports(monkeypatch):
    import lowerlm.frontend.export as export

    calls = []
    real = export.export_model
    monkeypatch.setattr(export, "export_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_trace_entry_changed_in_place_is_traced_again(tmp_path, monkeypatch):
    """One digit of a constant changed (the attention's scale): the text still parses and verifies, so only the
    hash finds it."""
    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path))
    exports = _exports(monkeypatch)
    model = tiny_model("llama", num_hidden_layers=1)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    want = lowerlm.compile_model(model, backend="reference")(ids)
    (entry,) = (tmp_path / "traces").glob("*.ir")
    assert len(exports) == 1
    with _Warnings() as w:
        assert torch.equal(lowerlm.compile_model(model, backend="reference")(ids), want)
    assert w.messages == [] and len(exports) == 1

    text = entry.read_bytes()
    at = text.index(b"scale=0.35355") + len(b"scale=0.3")
    _flip_in_place(entry, at, mask=0x01)  # 0.3535... -> 0.3435...
    from lowerlm.ir.parser import parse_module
    from lowerlm.ir.verifier import verify_module

    verify_module(parse_module(entry.read_text()))  # what the parse and verify checks let through
    with _Warnings() as w:
        got = lowerlm.compile_model(model, backend="reference")(ids)
    assert len(w.messages) == 1 and str(entry) in w.messages[0] and "corrupt" in w.messages[0]
    assert len(exports) == 2 and torch.equal(got, want)
    with _Warnings() as w:
        lowerlm.compile_model(model, backend="reference")
    assert w.messages == [] and len(exports) == 2


def test_onnx_entry_changed_in_place_is_lowered_again(tmp_path, monkeypatch):
    """A blob shared by prefill and decode, then one graph's model file, changed in place: each time one warning,
    one graph lowered again (the blob rewritten, so the other graph's entry is whole again), the same logits."""
    from lowerlm.codegen.onnx import cache

    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path))
    lowerings = _lowerings(monkeypatch)
    model = tiny_model("llama", num_hidden_layers=1)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))

    def compile_and_run():
        with _Warnings() as w:
            cm = lowerlm.compile_model(model, backend="onnx", max_seq_len=32)
            cm.program.prepare()
            got = cm(ids)
        return got, w.messages

    want, _ = compile_and_run()
    assert sorted(lowerings) == ["decode", "prefill"]
    lowerings.clear()
    monkeypatch.setattr(cache, "_digests", {})  # as in a fresh process
    got, messages = compile_and_run()
    assert torch.equal(got, want) and messages == [] and lowerings == []

    blob = max((tmp_path / "onnx").glob("*.bin"), key=lambda p: p.stat().st_size)
    for target in (blob, next((tmp_path / "onnx").glob("*.onnx"))):
        _flip_in_place(target, target.stat().st_size // 2)
        got, messages = compile_and_run()  # this process hashed the blob before; its ctime is new, so again
        assert len(messages) == 1 and "ONNX compile cache entry" in messages[0] and "damaged" in messages[0]
        assert len(lowerings) == 1 and torch.equal(got, want)
        lowerings.clear()
    monkeypatch.setattr(cache, "_digests", {})
    got, messages = compile_and_run()
    assert torch.equal(got, want) and messages == [] and lowerings == []


_CHILD = """
import sys, time
from pathlib import Path

import torch

import lowerlm
import lowerlm.codegen.onnx.lower as lower
from tests.conftest import tiny_model

real = lower.lower_graph
def counted(g, *a, **k):
    print(f"LOWERED {g.name}", file=sys.stderr, flush=True)
    return real(g, *a, **k)
lower.lower_graph = counted
barrier, me, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
model = tiny_model("llama", num_hidden_layers=1)
(barrier / me).touch()
deadline = time.time() + 120
while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
    time.sleep(0.01)
cm = lowerlm.compile_model(model, backend="onnx", max_seq_len=32, progress=lambda m: print(m, file=sys.stderr,
                                                                                          flush=True))
cm.program.prepare()
torch.save(cm(torch.arange(14).reshape(2, 7)), out)
"""


def test_concurrent_cold_compiles_trace_and_lower_once(tmp_path):
    """Two processes compiling one model on an empty cache at the same moment: both succeed with the same logits,
    and between them the model is exported once and each graph lowered once."""
    (tmp_path / "barrier").mkdir()
    env = dict(os.environ, LOWERLM_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "barrier"), str(i),
                               str(tmp_path / f"logits{i}.pt")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        errs.append(err)
    both = "".join(errs)
    assert both.count("exporting") == 1, both
    assert both.count("LOWERED prefill") == 1 and both.count("LOWERED decode") == 1, both
    assert torch.equal(torch.load(tmp_path / "logits0.pt"), torch.load(tmp_path / "logits1.pt"))
