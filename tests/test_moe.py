"""MoE end to end: transformers' MoE blocks captured as one ``moe`` op, moe_dispatch's route → sort → grouped
GEMMs → combine, every backend against eager (f32 logits within 1e-4 × max |logit|, 32 greedy tokens), and
DeepSeek-V3's group-limited sigmoid router with correction bias, shared expert, renormalisation on and off, and
experts that receive no token (forced, and asserted)."""

from __future__ import annotations

import pytest
import torch

import lowerlm
from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.ir import OPDEFS, Op
from lowerlm.ir import compute as ref

from .conftest import tiny_model

BACKENDS = ["reference", "onnx", "auto"]


def _close(got, want):
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_block_becomes_one_op_then_the_dispatch(family):
    model = tiny_model(family)
    cm = lowerlm.compile_model(model, backend="reference")
    imported = cm.stages()[0][1].graphs[0]
    moes = [n for n in imported.nodes if n.op is Op.MOE]
    assert [n.source for n in moes] == [("model.layers.0.mlp",), ("model.layers.1.mlp",)]
    assert moes[0].attr("top_k") == 2 and moes[0].attr("router") == "softmax" and moes[0].attr("renormalize")
    assert moes[0].attr("weights_f32") == (family == "mixtral")  # Qwen3 casts the weights back, Mixtral keeps f32
    decode = [n.op for n in cm.ir.graph("decode").nodes if n.source == ("model.layers.0.mlp",)]
    assert decode == [Op.MOE_ROUTE, Op.MOE_SORT, Op.GROUPED_GEMM, Op.GROUPED_GEMM, Op.MOE_COMBINE]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_tiny_moe_families_match_eager(family, backend):
    model = tiny_model(family)
    cm = lowerlm.compile_model(model, backend=backend, max_batch=3, max_seq_len=64)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        want, want_padded = model(ids).logits, model(ids, attention_mask=mask).logits
    _close(cm(ids), want)
    _close(cm(ids, attention_mask=mask)[1, :6], want_padded[1, :6])
    prompts = [[5, 7, 9, 11, 3], [8, 1, 4]]
    for p in prompts:
        with torch.no_grad():
            hf = model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0, len(p):].tolist()
        assert [s[0] for s in cm.generate_ids([p], 32)] == hf
    batch = list(cm.generate_ids(prompts, 12))
    assert [s[1] for s in batch] == [s[0] for s in cm.generate_ids([prompts[1]], 12)]


# ---- DeepSeek-V3 --------------------------------------------------------------------------------------------
def _deepseek_block(renormalize: bool, seed: int = 0, starve=()):
    """A DeepSeek-V3 MoE block: 8 experts in 4 groups keeping 2, top 2, a shared expert, scale 2.446, a non-zero
    correction bias (very negative for the ``starve``d experts, so they never receive a token)."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8,
                                           num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                                           routed_scaling_factor=2.446, norm_topk_prob=renormalize)
    torch.manual_seed(seed)
    block = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, 1.0 if name == "gate.weight" else 0.2)
        bias = torch.randn(8) * 0.3
        bias[list(starve)] = -100.0
        block.gate.e_score_correction_bias.copy_(bias)
    return block


class _MoeLM(torch.nn.Module):
    """A plain LM around one MoE block: embedding, the block, a head."""

    def __init__(self, block):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.block = block
        self.head = torch.nn.Linear(32, 64, bias=False)

    def forward(self, input_ids):
        return self.head(self.block(self.embed(input_ids)))


def _route_attrs(block) -> dict:
    from lowerlm.frontend.moe import FAMILIES

    attrs = FAMILIES["DeepseekV3MoE"][1](block)
    return {k: v for k, v in attrs.items() if k in OPDEFS[Op.MOE_ROUTE].attrs}


@pytest.mark.parametrize("renormalize", [True, False])
def test_deepseek_router_and_block_match_transformers(renormalize):
    block = _deepseek_block(renormalize, starve=[6])
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, hf_w, hf_ids = block.gate(x)
        want = block(x)
    g = block.gate
    ids, w = ref.moe_route(x, g.weight, g.e_score_correction_bias, **_route_attrs(block))
    ids, w = ids.reshape(-1, 2).long(), w.reshape(-1, 2)
    # the same experts with the same weights (top-k order within a token is arbitrary)
    hf_sorted, perm = hf_ids.sort(-1)
    ours_sorted, ours_perm = ids.sort(-1)
    assert torch.equal(ours_sorted, hf_sorted)
    torch.testing.assert_close(w.gather(1, ours_perm), hf_w.gather(1, perm), rtol=1e-6, atol=1e-7)
    # group-limited: every token's experts lie in at most topk_group = 2 of the 4 groups
    assert all(len(set((r // 2).tolist())) <= 2 for r in ids)
    e = block.experts
    shared = block.shared_experts
    got = ref.moe(x, g.weight, g.e_score_correction_bias, e.gate_up_proj, e.down_proj, shared.gate_proj.weight,
                  shared.up_proj.weight, shared.down_proj.weight, "silu", **_route_attrs(block))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "onnx"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_deepseek_block_through_the_compiler_with_starved_experts(renormalize, backend):
    block = _deepseek_block(renormalize, starve=[2, 5])
    torch.manual_seed(3)
    model = _MoeLM(block).eval()
    cm = lowerlm.compile_model(model, backend=backend, use_cache=False)
    (moe,) = [n for n in cm.stages()[0][1].graphs[0].nodes if n.op is Op.MOE]
    assert moe.attr("router") == "sigmoid" and moe.attr("n_group") == 4 and moe.attr("topk_group") == 2
    assert moe.attr("renormalize") is renormalize and moe.attr("scaling") == pytest.approx(2.446)
    assert all(v is not None for v in moe.inputs)  # bias and the shared expert's three weights are inputs
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _close(cm(ids), model(ids))
    # the starved experts really received no token: the sort's segments for them are empty
    seen = {}

    def observe(node, results):
        if node.op is Op.MOE_SORT:
            seen["offsets"] = results[1]

    ref_program = ReferenceProgram(cm.ir, cm.weights)
    inputs = {"input_ids": ids, "positions": torch.arange(12).repeat(2, 1),
              "seq_lens": torch.tensor([12, 12], dtype=torch.int32)}
    graph = cm.ir.graphs[0]
    if "logit_index" in [v.name for v in graph.inputs]:  # select_logits ran: every row
        inputs["logit_index"] = torch.arange(12).repeat(2, 1)
    ref_program.run(graph.name, inputs, observe=observe)
    counts = seen["offsets"].diff()
    assert counts[2] == 0 and counts[5] == 0 and int(counts.sum()) == 2 * 12 * 2


def test_onnx_decode_of_single_tokens_matches():
    """One token, top 2 of 4 experts: two experts get nothing on every decode step (by construction, not
    asserted here; the starved-expert test above asserts empty segments)."""
    model = tiny_model("mixtral")
    cm = lowerlm.compile_model(model, backend="onnx", max_seq_len=64)
    p = [3, 1, 4, 1, 5]
    with torch.no_grad():
        hf = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
    assert [s[0] for s in cm.generate_ids([p], 8)] == hf


def test_an_unknown_moe_block_is_refused_by_name():
    class OddMoe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(32, 4, bias=False)
            self.experts = torch.nn.Module()
            self.experts.gate_up_proj = torch.nn.Parameter(torch.randn(4, 32, 32))

        def forward(self, x):
            return x

    with pytest.raises(lowerlm.errors.UnsupportedOpError, match="MoE block OddMoe.*frontend/moe.py"):
        lowerlm.compile_model(_MoeLM(OddMoe()), backend="reference", use_cache=False)


@pytest.mark.parametrize("name, want", [
    ("silu", "silu"), ("swish", "silu"), ("gelu", "gelu"), ("gelu_python", "gelu"), ("gelu_new", "gelu_tanh"),
    ("gelu_fast", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_python_tanh", "gelu_tanh"),
    ("gelu_accurate", "gelu_tanh"), ("tanh", None), ("gelu_10", None), ("quick_gelu", None), ("relu", None)])
def test_moe_expert_activation_is_the_experts_own(name, want):
    """The experts' act_fn is read by class, and what is read computes what the module does; anything else is
    refused (a word match took torch's Tanh for tanh-GeLU and the clipped gelu_10 for GeLU)."""
    from transformers.activations import ACT2FN

    from lowerlm.frontend.moe import _act

    experts = torch.nn.Module()
    experts.act_fn = ACT2FN[name]
    if want is None:
        with pytest.raises(lowerlm.errors.UnsupportedOpError, match="MoE expert activation"):
            _act(experts)
        return
    assert _act(experts) == want
    x = torch.linspace(-12, 12, 1001)
    torch.testing.assert_close(ref.activation(x, want), experts.act_fn(x), rtol=1e-5, atol=2e-6)
