"""DeepSeek sparse attention (DSA: DeepSeek-V3.2, GLM-MoE-DSA, AXK2, dots3-note, HY-V4 in transformers), exact up
to ``index_topk`` keys.

A DSA attention module asks its ``indexer`` for the ``index_topk`` keys each query attends to: a lightweight
scoring of every key, then ``topk(min(index_topk, T))`` over the key length T. transformers' eager and sdpa paths
turn the selection into a mask (the keys not selected are masked); other attention implementations receive it as
``indices``. While T <= index_topk the top-k is every key, so the mask masks nothing and the attention is the
model's ordinary (MLA) causal attention: the indexer changes no result. lowerlm computes exactly that, and
only that: the context it compiles for is limited to ``index_topk`` tokens (``context_limit``; compile_model refuses
a longer ``max_seq_len`` and a call with more keys), and during export (``dense``) each indexer returns ``ALL_KEYS``
and the model runs lowerlm's attention implementation (frontend/eager_attention.py), to which the model hands the
selection as ``indices`` instead of masking: neither the indexer's top-k (whose k depends on the length) nor the
mask is traced.
Selecting among more keys than ``index_topk`` (the sparse regime) has no IR form yet.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

# transformers' indexer forward (DeepseekV32Indexer and its copies): what the swap relies on
_PARAMS = ["self", "hidden_states", "q_resid", "position_embeddings", "attention_mask", "position_ids", "cache"]


def indexers(model: torch.nn.Module) -> list:
    """(path, indexer) for every DSA indexer in ``model``: the ``indexer`` child of an attention module, with an
    integer ``index_topk`` and transformers' indexer forward."""
    found = []
    for path, m in model.named_modules():
        child = getattr(m, "indexer", None)
        if not isinstance(child, torch.nn.Module) or not isinstance(getattr(child, "index_topk", None), int):
            continue
        if list(inspect.signature(type(child).forward).parameters) == _PARAMS:
            found.append((f"{path}.indexer" if path else "indexer", child))
    return found


def context_limit(model: torch.nn.Module) -> tuple | None:
    """(what, tokens): the longest context lowerlm computes ``model``'s sparse attention exactly for, or None."""
    found = indexers(model)
    if not found:
        return None
    path, m = min(found, key=lambda pm: pm[1].index_topk)
    return f"DeepSeek sparse attention's indexer '{path}' (index_topk)", m.index_topk


class _AllKeys:
    """What an indexer returns during export: "every key" (layers sharing a previous indexer's selection, as HY-V4's
    do, pass it on; lowerlm's attention accepts it, and fails on any other use)."""

    def __repr__(self) -> str:
        return "ALL_KEYS"


ALL_KEYS = _AllKeys()


def _no_selection(*args, **kwargs):
    return ALL_KEYS


@contextlib.contextmanager
def dense(model: torch.nn.Module):
    """Within the context every DSA indexer of ``model`` selects ``ALL_KEYS``."""
    found = [m for _, m in indexers(model) if "forward" not in vars(m)]
    try:
        for m in found:
            m.forward = _no_selection
        yield
    finally:
        for m in found:
            del m.forward
