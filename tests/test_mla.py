"""Multi-head latent attention through the compiler (frontend/mla.py, raise_mla): the whole Kimi Linear hybrid
(3 KDA layers : 1 MLA layer without RoPE, MoE with a shared expert and a non-zero correction bias), DeepSeek-V3
(q_lora, both rope layouts, a YaRN variant) and DeepSeek-V2 (no q_lora, softmax group-limited routing, complex RoPE)
against eager: f32 logits within 1e-4 x max |logit| and greedy tokens,
prefill + decode through the cache and a continuation with cache.

The cache holds each MLA layer's latent and rotary key (tests/test_raise_mla.py reads the state); prefill runs the
naive form, decode the absorbed one.
DeepSeek-V2 rotates with complex numbers (``torch.polar``): frontend/complex_rope.py makes them real pairs."""

from __future__ import annotations

import pytest
import torch

import lowerlm
from lowerlm.frontend import mla
from lowerlm.runtime import generate as rt

from .test_kda import IDS, close, eager, eager_greedy, kimi


def _randomize(model):
    with torch.no_grad():
        for name, b in model.named_buffers():  # the router's correction bias is a buffer
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.5)
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:  # std 1/sqrt(fan-in): scores of order 1, so the rope layout and the scale matter
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model.eval()


def deepseek(version: int, interleave: bool = True, yarn: bool = False):
    """Two layers (dense, then MoE: 8 experts, top 2, 4 groups keep 2, one shared); MLA 2 heads, latent 16,
    rotary 4 + 8 non-rotary, values 8; V3 with q_lora 24, V2 without (and softmax group-limited routing)."""
    import transformers

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
              n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=256)
    if version == 3:
        kw.update(q_lora_rank=24, rope_interleave=interleave)
        cls, lm = transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    else:
        kw.update(q_lora_rank=None, topk_method="group_limited_greedy")
        cls, lm = transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM
    if yarn:
        kw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                 "rope_theta": 10000.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    torch.manual_seed(0)
    return _randomize(lm(cls(**kw)))


def _hf_greedy(model, prompt: list, n: int) -> list:
    """transformers' own cached greedy generation: up to n tokens, ending at its end-of-sequence token."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    return out[:next((i + 1 for i, t in enumerate(out) if t in eos), len(out))]


def _tokens(cm, prompts: list, n: int, stops) -> list:
    """Each prompt's greedy tokens from one batched generate, up to its stop token."""
    steps = list(cm.generate_ids(prompts, n, stop_ids=stops))
    return [[s[i] for s in steps if s[i] is not None] for i in range(len(prompts))]


def _check(cm, model, want, greedy, n: int = 32, cached: bool = True, stops=()):
    close(cm(IDS), want)
    if not cached:  # Triton in its interpreter: the logits, a short continuation with cache, the greedy tokens
        state = rt.allocate_state(cm.ir, 2, 32, cm.program.device)
        close(rt.prefill(cm.program, state, IDS[:, :3], torch.tensor([3, 3])), want[:, 2])
        close(rt.prefill_once(cm.program, state, IDS[:, 3:9], 3, torch.tensor([9, 9])), want[:, 8])
        close(rt.decode_one(cm.program, state, IDS[:, 9], torch.tensor([9, 9])), want[:, 9])
        prompt = IDS[0, :11].tolist()
        assert _tokens(cm, [prompt], n, stops)[0] == greedy(model, prompt, n)
        return
    state = rt.allocate_state(cm.ir, 2, 128, cm.program.device)
    close(rt.prefill(cm.program, state, IDS[:, :67], torch.tensor([67, 67])), want[:, 66])
    for t in range(67, 70):
        close(rt.decode_one(cm.program, state, IDS[:, t], torch.tensor([t, t])), want[:, t])
    close(rt.prefill(cm.program, state, IDS[:, :3], torch.tensor([3, 3])), want[:, 2])  # a continuation with cache
    close(rt.prefill_once(cm.program, state, IDS[:, 3:67], 3, torch.tensor([67, 67])), want[:, 66])
    prompts = [IDS[0, :11].tolist(), IDS[1, :5].tolist()]
    for p, got in zip(prompts, _tokens(cm, prompts, n, stops)):
        assert got == greedy(model, p, n)


_KIMI_LAYERS = {"reference": 4, "onnx": 4, "triton": 2}  # Triton in its interpreter: one KDA and the MLA layer


@pytest.mark.parametrize("backend", ["reference", "onnx", "triton"])
def test_the_whole_kimi_linear_hybrid_matches_eager(backend):
    n = _KIMI_LAYERS[backend]
    model = kimi(layer_types=("linear_attention",) * (n - 1) + ("full_attention",),
                 mlp_types=("dense",) + ("sparse",) * (n - 1))
    cm = lowerlm.compile_model(model, backend=backend, max_batch=2, max_seq_len=128)
    _check(cm, model, eager(model, IDS), eager_greedy, 32 if backend != "triton" else 16)


@pytest.mark.parametrize("variant, backend", [
    (dict(version=3, interleave=True), "reference"), (dict(version=3, interleave=False), "reference"),
    (dict(version=3, yarn=True), "reference"), (dict(version=2), "reference"), (dict(version=3, interleave=False),
                                                                                 "onnx"),
    (dict(version=2), "onnx"), (dict(version=3, yarn=True), "triton"), (dict(version=2), "triton")],
    ids=["v3-interleaved", "v3-half", "v3-yarn", "v2", "v3-half-onnx", "v2-onnx", "v3-yarn-triton", "v2-triton"])
def test_deepseek_mla_matches_eager(variant, backend):
    model = deepseek(**variant)
    cm = lowerlm.compile_model(model, backend=backend, max_batch=2, max_seq_len=128)
    with torch.no_grad():
        want = model(IDS).logits
    _check(cm, model, want, _hf_greedy, 32 if backend != "triton" else 8, cached=backend != "triton", stops=None)


def test_an_expand_kv_that_computes_something_else_is_kept():
    """The swap is checked numerically per module: an ``expand_kv`` that differs from transformers' (here: values
    scaled) is not replaced, so the export meets its own ops and refuses them by name."""
    model = deepseek(version=3)
    attn = model.model.layers[0].self_attn
    original = type(attn).expand_kv
    attn.expand_kv = lambda c, r: tuple(t * 2 for t in original(attn, c, r))
    with mla.traceable(model):
        assert model.model.layers[1].self_attn.expand_kv.__func__ is mla._expand_kv_op
        assert getattr(attn.expand_kv, "__func__", None) not in (mla._expand_kv, mla._expand_kv_op)
    assert "expand_kv" not in vars(model.model.layers[1].self_attn)


def test_complex_rope_is_made_real_only_where_it_computes_the_same(monkeypatch):
    """frontend/complex_rope.py swaps DeepSeek-V2's complex rotary embedding for real pairs after a numeric check;
    an ``apply_rotary_emb`` that computes something else is kept, and the export refuses its complex op by name."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as dv2

    from lowerlm.frontend import complex_rope
    from lowerlm.ir.errors import UnsupportedOpError

    model = deepseek(version=2)
    with complex_rope.real(model):
        assert dv2.apply_rotary_emb is complex_rope.real_apply_rotary_emb
        assert model.model.rotary_emb.forward.__func__ is complex_rope.real_rotary_forward
    assert dv2.apply_rotary_emb is not complex_rope.real_apply_rotary_emb and "forward" not in vars(
        model.model.rotary_emb)
    original = dv2.apply_rotary_emb
    monkeypatch.setattr(dv2, "apply_rotary_emb", lambda xq, xk, freqs_cis: tuple(
        t * 2 for t in original(xq, xk, freqs_cis)))
    with complex_rope.real(model):
        assert dv2.apply_rotary_emb is not complex_rope.real_apply_rotary_emb

    def other_shapes(xq, xk, freqs_cis):  # Llama 4's form takes other shapes: the check must not crash the export
        raise RuntimeError("The size of tensor a (2) must match the size of tensor b (5)")

    monkeypatch.setattr(dv2, "apply_rotary_emb", other_shapes)
    with complex_rope.real(model):
        assert dv2.apply_rotary_emb is other_shapes
    monkeypatch.setattr(dv2, "apply_rotary_emb", lambda xq, xk, freqs_cis: tuple(
        t * 2 for t in original(xq, xk, freqs_cis)))
    with pytest.raises(UnsupportedOpError, match=r"'aten.polar.default' in module 'model.rotary_emb'"):
        lowerlm.compile_model(model, backend="reference", use_cache=False)
