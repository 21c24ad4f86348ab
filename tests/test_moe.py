"""MoE end to end: transformers' experts captured as one ``experts`` op whatever the block's class, the traced
router raised to ``moe_route`` (softmax, or DeepSeek-V3's group-limited sigmoid with correction bias), moe_dispatch's
route → sort → grouped GEMMs → combine, every backend against eager (f32 logits within 1e-4 × max |logit|, greedy
tokens): Mixtral, Qwen3-MoE, OLMoE (no renormalisation), Qwen2-MoE (sigmoid-gated shared expert, a dense first
layer), GLM-4-MoE (sigmoid groups, shared expert, dense first layer), expert counts the kernels' blocks do not divide,
experts that receive no token (forced, and asserted), and the experts layouts and gates lowerlm refuses."""

from __future__ import annotations

import pytest
import torch

import lowerlm
from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.ir import Op
from lowerlm.ir import compute as ref
from lowerlm.ir.weights import expr_str

from .conftest import tiny_model

BACKENDS = ["reference", "onnx", "auto"]


def _close(got, want):
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _greedy_matches_eager(cm, model, prompt: list, n: int):
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    assert [s[0] for s in cm.generate_ids([prompt], n)] == hf


def _after(cm, name: str):
    """The module right after pass ``name``."""
    return next(r.module for r in cm.records if r.name == name).graphs[0]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_experts_are_captured_and_the_router_raised_then_dispatched(family):
    model = tiny_model(family).to(torch.bfloat16)  # in bf16 the weights' dtype tells the families apart
    cm = lowerlm.compile_model(model, backend="reference")
    imported = cm.stages()[0][1].graphs[0]
    assert not [n for n in imported.nodes if n.op is Op.MOE]
    experts = [n for n in imported.nodes if n.op is Op.EXPERTS]
    assert [n.source for n in experts] == [("model.layers.0.mlp.experts",), ("model.layers.1.mlp.experts",)]
    assert [n.op for n in imported.nodes if n.source == ("model.layers.0.mlp.gate",)].count(Op.TOPK) == 1
    routes = [n for n in _after(cm, "raise_moe_route").nodes if n.op is Op.MOE_ROUTE]
    assert [n.source for n in routes] == [("model.layers.0.mlp.gate",), ("model.layers.1.mlp.gate",)]
    assert routes[0].attr("top_k") == 2 and routes[0].attr("router") == "softmax" and routes[0].attr("renormalize")
    assert routes[0].attr("weights_f32") == (family == "mixtral")  # Qwen3 casts the weights back, Mixtral keeps f32
    decode = [n.op for n in cm.ir.graph("decode").nodes
              if n.source and n.source[0].startswith("model.layers.0.mlp") and n.op is not Op.RESHAPE]
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
        _greedy_matches_eager(cm, model, p, 32)
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
    """moe_route's attributes for a DeepSeek-V3 block, from its config."""
    c = block.config
    return {"router": "sigmoid", "top_k": c.num_experts_per_tok, "n_group": c.n_group, "topk_group": c.topk_group,
            "renormalize": c.norm_topk_prob, "scaling": c.routed_scaling_factor, "router_f32": True,
            "weights_f32": True}


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


@pytest.mark.parametrize("backend", ["reference", "onnx", "triton"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_deepseek_block_through_the_compiler_with_starved_experts(renormalize, backend):
    block = _deepseek_block(renormalize, starve=[2, 5])
    torch.manual_seed(3)
    model = _MoeLM(block).eval()
    cm = lowerlm.compile_model(model, backend=backend, use_cache=False)
    (route,) = [n for n in _after(cm, "raise_moe_route").nodes if n.op is Op.MOE_ROUTE]
    want = {k: v for k, v in _route_attrs(block).items() if not k.endswith("_f32")}  # an f32 model: no rounding
    assert {k: route.attr(k) for k in want} == pytest.approx(want)
    assert route.inputs[2] is not None  # the correction bias
    # the shared expert stays the block's own ops
    assert {n.op for n in cm.stages()[0][1].graphs[0].nodes
            if n.source and n.source[0].startswith("block.shared_experts")} >= {Op.LINEAR, Op.SILU, Op.MUL}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _close(cm(ids), model(ids))
    # the starved experts really received no token: the sort's segments for them are empty
    (counts,) = _segments(cm, ids)
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


# ---- families with no capture of their own: the experts form, routers as traced ops ---------------------------
def _generic(family: str, **extra):
    """Tiny OLMoE, Qwen2-MoE and GLM-4-MoE with expert counts (5, 6) the kernels' blocks do not divide; Qwen2-MoE
    and GLM-4-MoE begin with a dense layer. GLM-4-MoE's ``starve``d experts get a correction bias of -100."""
    import transformers

    starve = extra.pop("starve", ())
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, **extra)
    if family == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=16, num_experts=5, num_experts_per_tok=2, **common)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=5,
                                          num_experts_per_tok=2, shared_expert_intermediate_size=24,
                                          mlp_only_layers=[0], **common)
    else:
        cfg = transformers.Glm4MoeConfig(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=6,
                                         num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                         first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                                         head_dim=8, **common)
    cls = {"olmoe": transformers.OlmoeForCausalLM, "qwen2_moe": transformers.Qwen2MoeForCausalLM,
           "glm4_moe": transformers.Glm4MoeForCausalLM}[family]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)  # routers with clear margins
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0, 0.2)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                bias = torch.randn(module.e_score_correction_bias.shape) * 0.3
                bias[list(starve)] = -100.0
                module.e_score_correction_bias.copy_(bias)
    return model


ROUTED = {"olmoe": {"router": "softmax", "renormalize": False, "top_k": 2},
          "qwen2_moe": {"router": "softmax", "renormalize": False, "top_k": 2},
          "glm4_moe": {"router": "sigmoid", "n_group": 2, "topk_group": 1, "renormalize": True, "scaling": 1.5,
                       "top_k": 2}}


@pytest.mark.parametrize("backend", ["reference", "onnx", "triton"])
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "glm4_moe"])
def test_families_without_a_capture_of_their_own_match_eager(family, backend):
    model = _generic(family, starve=[1, 4])
    cm = lowerlm.compile_model(model, backend=backend, max_batch=2, max_seq_len=64, use_cache=False)
    routes = [n for n in _after(cm, "raise_moe_route").nodes if n.op is Op.MOE_ROUTE]
    layers = 1 if family != "olmoe" else 2  # Qwen2-MoE and GLM-4-MoE: a dense first layer
    assert len(routes) == layers and all(
        {k: n.attr(k) for k in ROUTED[family]} == pytest.approx(ROUTED[family]) for n in routes)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(cm(ids), model(ids).logits)
    _greedy_matches_eager(cm, model, [5, 7, 9, 11, 3], 12)


def _segments(cm, ids) -> list:
    """Each MoE layer's tokens per expert in a reference run of the compiled IR (the moe_sort offsets)."""
    seen = []

    def observe(node, results):
        if node.op is Op.MOE_SORT:
            seen.append(results[1].diff())

    graph = cm.ir.graphs[0]
    b, s = ids.shape
    inputs = {"input_ids": ids, "positions": torch.arange(s).repeat(b, 1),
              "seq_lens": torch.full((b,), s, dtype=torch.int32)}
    if "logit_index" in [v.name for v in graph.inputs]:  # select_logits ran: every row
        inputs["logit_index"] = torch.arange(s).repeat(b, 1)
    state = {name: buf[:b] for name, buf in cm.generator.state.items()}  # the runtime's own cache buffers
    ReferenceProgram(cm.ir, cm.weights).run(graph.name, inputs, state, observe=observe)
    return seen


def test_starved_experts_of_a_traced_router_receive_no_token():
    model = _generic("glm4_moe", starve=[1, 4])
    cm = lowerlm.compile_model(model, backend="reference", use_cache=False)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    (counts,) = _segments(cm, ids)
    assert counts[1] == 0 and counts[4] == 0 and int(counts.sum()) == 2 * 12 * 2
    assert (counts[[0, 2, 3, 5]] > 0).all()


@pytest.mark.parametrize("implementation", ["batched_mm", "eager"])
def test_the_experts_implementation_transformers_picks_is_captured_the_same(implementation):
    model = _generic("olmoe")
    model.config._experts_implementation = implementation
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._experts_implementation = implementation
    cm = lowerlm.compile_model(model, backend="reference", use_cache=False)
    assert [n.op for n in cm.stages()[0][1].graphs[0].nodes].count(Op.EXPERTS) == 2
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _close(cm(ids), model(ids).logits)


def _experts_lm(experts):
    """_MoeLM around a softmax top-2 router and the given experts module."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(32, 4, bias=False)
            self.experts = experts

        def forward(self, x):
            h = x.reshape(-1, 32)
            w, ids = torch.softmax(self.gate(h), -1).topk(2)
            return self.experts(h, ids, w).reshape(x.shape)

    return _MoeLM(Block()).eval()


def test_experts_in_another_layout_or_with_a_gate_of_their_own_are_refused_by_name():
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4))
    experts.has_gate = False  # a layout with no gate
    with pytest.raises(lowerlm.errors.UnsupportedOpError, match="experts layout has_gate=False.*GptOssExperts"):
        lowerlm.compile_model(_experts_lm(experts), backend="reference", use_cache=False)
    # Beam's gate computes in f32 and rounds once: its f32 values are act(gate) * up, its bf16 ones are not
    beam = _modeling("beam")
    if beam is None:
        pytest.skip(f"transformers {transformers.__version__} has no beam (the refusal above was checked)")
    cfg = transformers.BeamConfig(hidden_size=32, moe_intermediate_size=16, num_experts=4)
    with pytest.raises(lowerlm.errors.UnsupportedOpError, match="experts gate BeamExperts._apply_gate.*BeamExperts"):
        lowerlm.compile_model(_experts_lm(beam.BeamExperts(cfg)), backend="reference", use_cache=False)


def _modeling(family: str):
    """transformers' modeling module of ``family``, or None where this transformers has no such family (5.17, the
    GPU machine's, predates several)."""
    import importlib

    try:
        return importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ModuleNotFoundError:
        return None


def _gated_experts(family: str):
    """Experts of a family whose gate is its own, with weights that push the gate and up past the limit; the test
    is skipped where this transformers lacks the family."""
    import transformers

    m = _modeling(family)
    if m is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    torch.manual_seed(0)
    if family == "deepseek_v4":
        experts = m.DeepseekV4Experts(transformers.DeepseekV4Config(hidden_size=32, intermediate_size=16,
                                                                    num_local_experts=4, swiglu_limit=2.0))
    elif family == "hy_v4":
        experts = m.HYV4Experts(transformers.HYV4Config(hidden_size=32, moe_intermediate_size=16, num_experts=4,
                                                        num_local_experts=4, swiglu_limit=2.0))
    elif family == "bailing_hybrid":
        cfg = transformers.BailingHybridConfig(hidden_size=32, moe_intermediate_size=16, num_local_experts=4,
                                               num_hidden_layers=1, swiglu_limits=[1.5])  # clamps after the act
        experts = m.BailingHybridExperts(cfg, 0)
    elif family == "gpt_oss":  # transposed [E, H, 2I], gate|up interleaved by column, biases
        experts = m.GptOssExperts(transformers.GptOssConfig(hidden_size=32, intermediate_size=16,
                                                            num_local_experts=4, swiglu_limit=2.0))
    else:
        experts = m.MiniMaxM3VLExperts(transformers.MiniMaxM3VLTextConfig(
            hidden_size=32, intermediate_size=16, num_local_experts=4, swiglu_limit=2.0, swiglu_alpha=1.702))
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 1.0)
        experts.down_proj.normal_(0, 0.3)
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            if hasattr(experts, name):
                getattr(experts, name).normal_(0, 0.5)
    return experts


GATED = {"deepseek_v4": {"act": "silu", "limit": 2.0}, "hy_v4": {"act": "silu", "limit": 2.0},
         "bailing_hybrid": {"act": "silu", "limit": 1.5, "clamp": "act"},
         "minimax_m3_vl": {"act": "silu", "limit": 2.0, "alpha": 1.702, "up_shift": 1.0},
         "gpt_oss": {"act": "silu", "limit": 2.0, "alpha": 1.702, "up_shift": 1.0}}


def _unit(family: str, experts) -> dict:
    """The gated unit's attributes the module applies: GATED's, with gpt-oss's limit its own (transformers 5.17's
    GptOssExperts fixes it at 7.0 whatever the config says)."""
    return dict(GATED[family], limit=experts.limit) if family == "gpt_oss" else GATED[family]


@pytest.mark.parametrize("family, backend", [(f, "reference") for f in GATED] + [
    (f, b) for b in ("onnx", "triton") for f in ("bailing_hybrid", "gpt_oss")])  # between them every attribute
def test_experts_with_a_gate_of_their_own_match_eager(family, backend):
    """DeepSeek-V4's and HY-V4's gate clamped before the act, Bailing's act clamped after it, MiniMax's gpt-oss GLU
    (alpha, up + 1): each read off the module by matching its own _apply_gate, printed on the experts op, carried
    to the grouped GEMM, and computed by every backend as the module does (clamps reached: the gate's inputs
    spread past the limit). gpt-oss's experts besides: transposed, gate|up interleaved by column, with biases --
    read through weight expressions (transpose, deinterleave) and the optional bias inputs."""
    experts = _gated_experts(family)
    model = _experts_lm(experts)
    with torch.no_grad():
        model.embed.weight.normal_(0, 2.0)
    cm = lowerlm.compile_model(model, backend=backend, max_batch=2, max_seq_len=32, use_cache=False)
    (node,) = [n for n in cm.imported.graphs[0].nodes if n.op is Op.EXPERTS]
    unit = _unit(family, experts)
    assert {k: node.all_attrs()[k] for k in unit} == unit
    assert set(node.attrs) == set(unit) - {"act"}  # the default silu is not printed
    (gemm, _) = [n for n in cm.ir.graphs[0].nodes if n.op is Op.GROUPED_GEMM]
    assert {k: gemm.all_attrs()[k] for k in unit} == unit
    if family == "gpt_oss":
        g = cm.imported.graphs[0]
        exprs = [expr_str(g.producer(v).attrs["expr"]) for v in node.inputs[3:5]]
        assert exprs == ['deinterleave[1](transpose(param "block.experts.gate_up_proj"))',
                         'transpose(param "block.experts.down_proj")']
        assert [g.producer(v).op for v in node.inputs[5:]] == [Op.WEIGHT, Op.PARAM]  # the gate|up bias interleaved
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(cm(ids), model(ids))
        h = model.embed(ids).reshape(-1, 32)
        weights = experts.gate_up_proj[0].t() if family == "gpt_oss" else experts.gate_up_proj[0]
        gate_up = torch.nn.functional.linear(h, weights)
        g, u = (gate_up[:, ::2], gate_up[:, 1::2]) if family == "gpt_oss" else gate_up.chunk(2, dim=-1)
        limit = unit["limit"]
        assert (g > limit).any() and (u.abs() > limit).any()  # the clamps change the result


def test_the_gated_unit_in_bf16_is_the_modules_bit_for_bit():
    from lowerlm.frontend.moe import _probe

    present = [f for f in GATED if _modeling(f) is not None]
    assert "gpt_oss" in present  # every transformers this project takes has it
    for family in present:
        experts = _gated_experts(family)
        attrs = _unit(family, experts)
        rows, want = _probe(experts, torch.bfloat16, attrs["limit"])
        unit = {k: v for k, v in attrs.items() if k != "act"}
        assert torch.equal(ref.glu(*rows.chunk(2, dim=-1), attrs["act"], **unit), want)


def test_onnx_moe_combine_is_deterministic_on_wide_rows():
    """ONNX Runtime's ScatterND with reduction=add lost updates to duplicate indices from parallel threads once rows
    were wide (hidden 1024): the combine now inverts the order instead. 256 tokens x top-4 rows of width 1024, run
    repeatedly, equal the reference every time."""
    import numpy as np
    import onnxruntime as ort

    import lowerlm.ir as ir
    from lowerlm.codegen.onnx.lower import lower_graph

    text = ("graph g(%y: f32[R,1024], %order: i32[R], %like: f32[T,1024]) {\n"
            "  %out = moe_combine(%y, %order, %like) {top_k=4} : f32[T,1024]\n  return %out\n}\n")
    g = ir.verify_module(ir.parse_module(text)).graphs[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (256, 4), generator=gen)
    order = torch.sort(ids.flatten(), stable=True)[1].to(torch.int32)
    y, like = torch.randn(1024, 1024, generator=gen), torch.zeros(256, 1024)
    want = ref.moe_combine(y, order, like, 4)
    session = ort.InferenceSession(lower_graph(g, constants=None).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for _ in range(30):
        got = session.run(None, {"y": y.numpy(), "order": order.numpy(), "like": like.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= 1e-5 * float(want.abs().max())
