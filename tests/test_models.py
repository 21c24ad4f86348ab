"""lowerlm.load: names and paths, the weight cache (atomic, verified, rebuilt when corrupt), clear errors."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import lowerlm
from lowerlm import models
from lowerlm.errors import ModelFileError

from .conftest import tiny_model


def test_hf_directory_loads(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    loaded = lowerlm.load(str(tmp_path / "m"))
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name, message", [
    ("gpt-17", "unknown model 'gpt-17'"),
    ("/nonexistent/model.gguf", "GGUF file not found"),
])
def test_bad_names_are_model_file_errors(name, message):
    with pytest.raises(ModelFileError, match=message):
        lowerlm.load(name)


def test_hf_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="no config.json"):
        lowerlm.load(str(tmp_path / "empty"))


def test_corrupt_gguf_is_reported(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelFileError, match="bad magic"):
        lowerlm.load(str(bad))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 40)
    with pytest.raises(ModelFileError, match="cannot read GGUF file"):
        lowerlm.load(str(truncated))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_weight_cache_is_reused_verified_and_rebuilt(tmp_path, monkeypatch):
    """The conversion runs once; a damaged entry is detected by its manifest and converted again; a failed
    conversion leaves nothing behind."""
    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 60)
    calls = []

    def fake_convert(src, folder, progress):
        calls.append(src)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        models.write_manifest(folder, str(src))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    first = models.weight_cache(gguf)
    assert models.weight_cache(gguf) == first and len(calls) == 1
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    (first / "model.safetensors").write_bytes(b"weightz")  # same size, other bytes, a newer mtime
    os.utime(first / "model.safetensors", ns=(stamp + 10**9, stamp + 10**9))
    with pytest.warns(UserWarning, match="corrupt"):
        assert models.weight_cache(gguf) == first
    assert len(calls) == 2 and (first / "model.safetensors").read_bytes() == b"weights"
    (first / "model.safetensors").write_bytes(b"weigh")  # truncated
    with pytest.warns(UserWarning, match="corrupt"):
        models.weight_cache(gguf)
    assert len(calls) == 3
    # a cache that cannot be written (the conversion's mkdir fails): one error saying what to do, not a traceback
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(lowerlm.errors.ModelFileError, match="set LOWERLM_CACHE_DIR to a writable folder"):
        models.weight_cache(gguf)


def test_default_model_package_is_found():
    path = models.smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
