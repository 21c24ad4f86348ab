"""DeepSeek sparse attention (frontend/sparse_attention.py): exact up to ``index_topk`` keys, refused beyond.

A tiny DeepSeek-V3.2 with index_topk 12: eager runs its indexer (top-min(12, T) of every key), lowerlm attends to
every key; they agree while T <= 12, which is the whole context lowerlm compiles for (max_seq_len <= index_topk,
refused before tracing otherwise; a call with more keys is refused). Past 12 keys eager's indexer really drops keys
(shown), which is why the limit exists."""

from __future__ import annotations

import pytest
import torch

import lowerlm
from lowerlm.errors import CompileError, InputError
from lowerlm.frontend import eager_attention, sparse_attention
from lowerlm.ir.errors import UnsupportedOpError

from .test_kda import eager_greedy
from .test_mla import _randomize

TOPK = 12


def deepseek_v32(index_topk: int = TOPK):
    """Two layers (dense, then MoE: 8 experts top 2, 4 groups keep 2, one shared); MLA with q_lora, 2 heads; an
    indexer of 2 heads x 8 per layer."""
    import transformers

    cfg = transformers.DeepseekV32Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=256, index_n_heads=2, index_head_dim=8,
        index_topk=index_topk)
    torch.manual_seed(0)
    return _randomize(transformers.DeepseekV32ForCausalLM(cfg))


@pytest.fixture(scope="module")
def model():
    return deepseek_v32()


def test_the_indexers_and_the_context_limit_are_found(model):
    found = sparse_attention.indexers(model)
    assert [p for p, _ in found] == ["model.layers.0.self_attn.indexer", "model.layers.1.self_attn.indexer"]
    what, tokens = sparse_attention.context_limit(model)
    assert tokens == TOPK and "model.layers.0.self_attn.indexer" in what


@pytest.mark.parametrize("backend", ["reference", "onnx", "triton"])
def test_deepseek_v32_matches_eager_up_to_index_topk_keys(model, backend):
    cm = lowerlm.compile_model(model, backend=backend, max_batch=2)
    assert cm.max_seq_len == TOPK  # the default (2048) is bounded by the indexer
    ids = torch.randint(0, 64, (2, TOPK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    assert (cm(ids) - want).abs().max() <= 1e-4 * want.abs().max()
    prompt = [5, 7, 9, 11, 3]
    n = TOPK - len(prompt) - 1  # prefill, then cached decode steps up to the last cache slot
    assert [s[0] for s in cm.generate_ids([prompt], n, stop_ids=[])] == eager_greedy(model, prompt, n)
    with pytest.raises(InputError, match=f"position {TOPK} is past the {TOPK} tokens"):
        cm(torch.randint(0, 64, (1, TOPK + 1)))


def test_past_index_topk_eager_drops_keys(model):
    """Why the limit: with more keys than index_topk the model's own indexer masks some, and its logits differ
    from attention over every key (what lowerlm computes)."""
    ids = torch.randint(0, 64, (1, 3 * TOPK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sparse = model(ids).logits
        dense = deepseek_v32(index_topk=4 * TOPK)(ids).logits  # same weights (same seed), every key selected
        assert torch.allclose(sparse[:, :TOPK], dense[:, :TOPK], atol=1e-5)
        assert not torch.allclose(sparse[:, TOPK:], dense[:, TOPK:], atol=1e-3)


def test_a_longer_max_seq_len_is_refused_before_tracing(model, monkeypatch):
    import lowerlm.frontend.trace as trace

    monkeypatch.setattr(trace, "trace_model", lambda *a, **k: pytest.fail("traced before the check"))
    with pytest.raises(CompileError, match=f"max_seq_len {TOPK + 1} is more than the {TOPK} tokens DeepSeek sparse "
                                           f"attention's indexer 'model.layers.0.self_attn.indexer'"):
        lowerlm.compile_model(model, backend="reference", max_seq_len=TOPK + 1)


def test_an_indexer_of_another_form_is_not_taken_for_one():
    """Must not fire: a module named ``indexer`` with an ``index_topk`` but another forward is not a DSA indexer
    (no limit, no swap)."""
    class Other(torch.nn.Module):
        index_topk = 4

        def forward(self, x):
            return x

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.indexer = Other()

    m = torch.nn.Sequential(Attention())
    assert sparse_attention.indexers(m) == [] and sparse_attention.context_limit(m) is None
    with sparse_attention.dense(m):
        assert "forward" not in vars(m[0].indexer)


def test_during_export_the_indexers_select_every_key_and_a_real_selection_is_refused(model):
    indexer = model.model.layers[0].self_attn.indexer
    with sparse_attention.dense(model):
        assert indexer(None, None, None, None, None) is sparse_attention.ALL_KEYS
    assert "forward" not in vars(indexer)
    q = k = v = torch.zeros(1, 2, 3, 8)
    with pytest.raises(UnsupportedOpError, match="sparse attention indices"):
        eager_attention.forward(model.model.layers[0].self_attn, q, k, v, None,
                                indices=torch.zeros(1, 3, 2, dtype=torch.int32))
