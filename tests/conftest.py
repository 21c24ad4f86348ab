"""Shared helpers: the example IR, random weights and inputs for a module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lowerlm.ir as ir

ROOT = Path(__file__).resolve().parent.parent


def example_text(name: str = "tiny_llama") -> str:
    return (ROOT / "examples" / f"{name}.ir").read_text()


def random_weights(module: ir.Module, seed: int = 0, scale: float = 0.3) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.params:
        shape = [ir.evaluate(d, {}) for d in t.shape]
        out[name] = (torch.randn(shape, generator=g) * scale).to(t.dtype.to_torch())
    return out


def token_inputs(batch: int, seq: int, vocab: int, seed: int = 0, lens=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = lens if lens is not None else [seq] * batch
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
        "positions": torch.arange(seq).repeat(batch, 1),
        "seq_lens": torch.tensor(lens, dtype=torch.int32),
    }


@pytest.fixture
def tiny_llama() -> ir.Module:
    return ir.parse_module(example_text())
