"""Shared helpers: the example IR, random weights and inputs for a module, tiny transformers models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lowerlm.ir as ir

ROOT = Path(__file__).resolve().parent.parent

# One cache for the whole session (and later sessions in this checkout): the SmolLM2 conversion and its trace are
# made once. Tests of the caches themselves use their own temporary roots.
os.environ.setdefault("LOWERLM_CACHE_DIR", str(ROOT / ".cache" / "lowerlm-test"))
# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def calibration_ids(n: int = 4, length: int = 48) -> list:
    """Token-id prompts for calibrating tiny models (they have no tokenizer)."""
    return [[int(t) for t in torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(i))]
            for i in range(n)]


def tiny_config(family: str, **overrides):
    """A 2-layer config of a transformers family with GQA (4 query heads, 2 kv heads)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "mistral": transformers.MistralConfig, "mixtral": transformers.MixtralConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig}[family]
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    if family == "mixtral":  # 4 experts of 16, top 2
        kw.update(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen3":  # q/k norms (RMSNorm per head), head_dim 8 (its own default is 128)
        kw.update(head_dim=8)
    if family == "qwen3_moe":  # q/k norms, head_dim 8, every layer sparse: 4 experts of 16, top 2
        kw.update(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1,
                  norm_topk_prob=True)
    kw.update(overrides)
    return cls(**kw)


def tiny_model(family: str, seed: int = 0, **overrides):
    import transformers

    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM, "mistral": transformers.MistralForCausalLM,
           "mixtral": transformers.MixtralForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM}[family]
    torch.manual_seed(seed)
    model = cls(tiny_config(family, **overrides)).eval()
    with torch.no_grad():  # random biases too (Qwen2's q/k/v), so they are not silently dropped
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            if name.endswith("mlp.gate.weight"):  # routers with clear margins: no near-ties between experts
                p.normal_(0, 1.0)
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0, 0.2)
    return model


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
