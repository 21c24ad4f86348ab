"""Kimi Delta Attention end to end: transformers' KimiLinearForCausalLM with every layer KDA (dense and MoE MLPs),
its short convolution and delta rule captured as ``short_conv`` / ``delta_rule`` and given recurrent state by
insert_state, against eager on every backend: f32 logits within 1e-4 x max |logit| for a batch of two lengths
spanning a 64-token chunk, 32 greedy tokens, prefill 67 + 3 decode steps, a prefill shorter than the conv's W-1, a
multi-token continuation of a cached sequence; the op forms against each other and against transformers'
functions; recurrent state zeroed between sequences.

transformers 5.25's eager forward of a model without a full-attention layer fails with its default cache
(``get_mask_sizes can only be called on Attention layers``), so eager runs with ``use_cache=False``."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

import lowerlm
from lowerlm.ir import Op
from lowerlm.ir import compute as ref
from lowerlm.runtime import generate as rt

BACKENDS = ["reference", "onnx", "triton"]


def kimi_config(layer_types=("linear_attention",) * 4, mlp_types=("dense", "sparse", "sparse", "sparse")):
    """A tiny Kimi Linear reaching every branch: hidden 32, KDA 2 heads x 8, conv 4; 8 experts of 16, top-2, one
    shared, 4 groups / 2 kept, scale 2.446, renormalised; MLA kv_lora 16, no q_lora, 8 + 4 / 8."""
    import transformers

    return transformers.KimiLinearConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=len(layer_types), layer_types=list(layer_types), mlp_layer_types=list(mlp_types),
        num_attention_heads=2, num_key_value_heads=2, linear_num_heads=2, linear_head_dim=8, linear_conv_kernel_dim=4,
        num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.446, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)


def kimi(seed: int = 0, **kw):
    """A tiny Kimi Linear with random gates: A_log, dt_bias and the router's correction bias (a buffer) non-zero,
    norm weights away from 1 (transformers initialises them to constants that would hide a mix-up)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.KimiLinearForCausalLM(kimi_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", "A_log")):
                p.normal_(0, 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.2)
        for name, b in model.named_buffers():  # the router's correction bias is a buffer
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.5)
    return model


def eager(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def eager_greedy(model, prompt: list, n: int) -> list:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(eager(model, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def close(got, want):
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), err


IDS = torch.randint(3, 64, (2, 70), generator=torch.Generator().manual_seed(1))  # 70 tokens: past one 64-chunk


@pytest.fixture(scope="module")
def model():
    return kimi()


@pytest.fixture(scope="module")
def want(model):
    return eager(model, IDS)


# Triton runs in its interpreter here: two layers (a dense and a MoE MLP) keep the run near a minute
_LAYERS = {"reference": 4, "onnx": 4, "triton": 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_kda_kimi_linear_matches_eager(backend):
    n = _LAYERS[backend]
    model = kimi(layer_types=("linear_attention",) * n, mlp_types=("dense",) + ("sparse",) * (n - 1))
    cm = lowerlm.compile_model(model, backend=backend, max_batch=2, max_seq_len=128)
    want = eager(model, IDS)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, 50:] = 0  # right padding never enters conv or recurrent state
    got = cm(IDS, attention_mask=mask)
    close(got[0], want[0])  # 70 tokens: past one 64-token chunk
    close(got[1, :50], eager(model, IDS[1:, :50])[0])

    state = rt.allocate_state(cm.ir, 2, 128, cm.program.device)
    # prefill 67, then 3 decode steps, each against the eager logits of the whole 70
    close(rt.prefill(cm.program, state, IDS[:, :67], torch.tensor([67, 67])), want[:, 66])
    for t in range(67, 70):
        close(rt.decode_one(cm.program, state, IDS[:, t], torch.tensor([t, t])), want[:, t])
    # a prefill shorter than the conv's W - 1 = 3 inputs (rows of 2 and 1 tokens), a decode step filling the state
    close(rt.prefill(cm.program, state, IDS[:, :2], torch.tensor([2, 1])), torch.stack([want[0, 1], want[1, 0]]))
    close(rt.decode_one(cm.program, state, torch.stack([IDS[0, 2], IDS[1, 1]]), torch.tensor([2, 1])),
          torch.stack([want[0, 2], want[1, 1]]))
    # a multi-token continuation of cached sequences: 3 tokens, then 64 more (a whole chunk) in one call
    close(rt.prefill(cm.program, state, IDS[:, :3], torch.tensor([3, 3])), want[:, 2])
    close(rt.prefill_once(cm.program, state, IDS[:, 3:67], 3, torch.tensor([67, 67])), want[:, 66])
    close(rt.decode_one(cm.program, state, IDS[:, 67], torch.tensor([67, 67])), want[:, 67])

    # 32 greedy tokens, a batch of two lengths against each prompt alone in eager
    prompts = [IDS[0, :11].tolist(), IDS[1, :5].tolist()]
    got = list(cm.generate_ids(prompts, 32, stop_ids=()))
    for i, p in enumerate(prompts):
        assert [s[i] for s in got] == eager_greedy(model, p, 32)


def test_kda_ops_their_state_and_the_fused_projection_in_the_ir(model):
    cm = lowerlm.compile_model(model, backend="reference", max_batch=2, max_seq_len=64)
    imported = cm.stages()[0][1].graphs[0]
    for op in (Op.SHORT_CONV, Op.DELTA_RULE):
        assert [n.source for n in imported.nodes if n.op is op] == \
            [(f"model.layers.{i}.self_attn",) for i in range(4)]
    decode = cm.ir.graph("decode")
    assert {(s.name, s.kind, str(s.type)) for s in decode.state if s.owner == "model.layers.0.self_attn"} == \
        {("L0.self_attn.conv", "recurrent", "f32[B,3,48]"), ("L0.self_attn.delta", "recurrent", "f32[B,2,8,8]")}
    # one rms_norm_linear reads the layer's input norm for q|k|v|f_a|b|g_a (the fusions see the projections)
    fused = [n for n in decode.nodes if n.op is Op.RMS_NORM_LINEAR and n.source[0].startswith("model.layers.0.")]
    assert list(fused[0].attr("splits")) == [16, 16, 16, 8, 2, 8]
    text = lowerlm.ir.print_module(cm.ir)
    assert "recurrent @model.layers.3.self_attn" in text
    assert "= cached_delta_rule(" in text and "{heads=2, scale=0.35355339059327" in text
    # the MoE layers' router is DeepSeek-V3's: sigmoid with correction bias, 4 groups keep 2, scaled
    routes = [n for n in decode.nodes if n.op in (Op.MOE_ROUTE, Op.RMS_NORM_MOE_ROUTE)]
    assert len(routes) == 3 and all(n.attr("router") == "sigmoid" and n.attr("n_group") == 4 and
                                    n.attr("scaling") == pytest.approx(2.446) for n in routes)


def test_dump_ir_of_a_saved_kimi_linear_shows_the_kda_ops_and_their_state(tmp_path, capsys):
    """``lowerlm dump-ir --model <HF folder>``: the stateful KDA ops under their modules, state with its kind."""
    from lowerlm.cli import main

    kimi(layer_types=("linear_attention",) * 2, mlp_types=("dense", "sparse")).save_pretrained(tmp_path)
    assert main(["dump-ir", "-q", "--model", str(tmp_path), "--after", "insert_state"]) == 0
    out = capsys.readouterr().out
    assert "%L1.self_attn.conv: f32[B,3,48] recurrent @model.layers.1.self_attn" in out
    assert "%L1.self_attn.delta: f32[B,2,8,8] recurrent @model.layers.1.self_attn" in out
    rules = [line for line in out.splitlines() if "= cached_delta_rule(" in line or "= cached_short_conv(" in line]
    assert [line.rsplit("# ", 1)[1] for line in rules] == ["model.layers.0.self_attn"] * 2 + \
        ["model.layers.1.self_attn"] * 2


def test_recurrent_state_is_zeroed_for_each_new_sequence(model, monkeypatch):
    """The generator's state buffers serve one sequence after another: the second prompt's logits equal those from
    fresh buffers, and differ once the reset is removed (the first sequence's state leaks into the second)."""
    cm = lowerlm.compile_model(model, backend="reference", max_batch=2, max_seq_len=64)
    first, second = IDS[0:1, :9], IDS[1:2, :6]
    alone = rt.prefill(cm.program, rt.allocate_state(cm.ir, 1, 64), second, torch.tensor([6]))
    state = cm.generator.state
    list(cm.generate_ids([first[0].tolist()], 3))
    close(rt.prefill(cm.program, state, second, torch.tensor([6])), alone)
    monkeypatch.setattr(rt, "reset_recurrent", lambda *a: None)
    list(cm.generate_ids([first[0].tolist()], 3))
    leaked = rt.prefill(cm.program, state, second, torch.tensor([6]))
    assert (leaked - alone).abs().max() > 1e-3 * alone.abs().max()


# ---- the ops ----------------------------------------------------------------------------------------------------
def _heads(seed=0, b=2, s=70, h=2, dk=8, dv=6, per_head=False):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, s, h * dk, generator=g), torch.randn(b, s, h * dk, generator=g)
    v = torch.randn(b, s, h * dv, generator=g)
    gate = -torch.rand(b, s, h if per_head else h * dk, generator=g) * 2
    return q, k, v, gate, torch.rand(b, s, h, generator=g)


@pytest.mark.parametrize("per_head", [False, True])
def test_chunked_and_recurrent_forms_agree_from_a_non_zero_state(per_head):
    q, k, v, g, beta = _heads(per_head=per_head)
    qh, kh, vh, gh, bh = ref._delta_inputs(q, k, v, g, beta, 2, 8 ** -0.5, True, 1e-6)
    state = torch.randn(2, 2, 8, 6, generator=torch.Generator().manual_seed(5))
    o1, s1 = ref.delta_rule_recurrent(qh, kh, vh, gh, bh, state)
    for chunk in (64, 16):
        o2, s2 = ref.delta_rule_chunked(qh, kh, vh, gh, bh, state, chunk)
        close(o2, o1)
        close(s2, s1)


def test_the_ops_compute_what_transformers_functions_do():
    from transformers.models.kimi_linear import modeling_kimi_linear as km

    q, k, v, g, beta = _heads(dv=8)
    b, s = q.shape[:2]
    heads = [t.reshape(b, s, 2, -1) for t in (q, k, v, g)]
    want, _ = km.chunk_kimi_delta_attention(*heads, beta, use_qk_l2norm_in_kernel=True)
    close(ref.delta_rule(q, k, v, g, beta, 2, 8 ** -0.5, True, 1e-6), want.reshape(b, s, -1))
    state = torch.randn(b, 2, 8, 8)
    pos, lens = torch.arange(s).repeat(b, 1), torch.tensor([s, s])
    one = [t[:, -1:] for t in (q, k, v, g, beta)]
    want, want_state = km.recurrent_kimi_delta_attention(*[t.reshape(b, 1, 2, -1) for t in one[:4]], one[4],
                                                         state, True, use_qk_l2norm_in_kernel=True)
    got, got_state = ref.cached_delta_rule(*one, state, pos[:, -1:], lens, 2, 8 ** -0.5, True, 1e-6)
    close(got, want.reshape(b, 1, -1))
    close(got_state, want_state)
    x, w = torch.randn(b, s, 12), torch.randn(12, 4)
    close(ref.short_conv(x, w, None, "silu"),
          km.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2))


def test_padding_and_continuation_of_the_cached_forms():
    q, k, v, g, beta = _heads()
    pos = torch.arange(70).repeat(2, 1)
    whole, whole_state = ref.cached_delta_rule(q, k, v, g, beta, torch.zeros(2, 2, 8, 6), pos, torch.tensor([70, 40]),
                                               2, 0.3, True, 1e-6)
    alone, alone_state = ref.cached_delta_rule(*(t[1:, :40] for t in (q, k, v, g, beta)), torch.zeros(1, 2, 8, 6),
                                               pos[1:, :40], torch.tensor([40]), 2, 0.3, True, 1e-6)
    close(whole[1:, :40], alone)
    close(whole_state[1:], alone_state)  # the 30 padding tokens left the state as it was
    first, state = ref.cached_delta_rule(*(t[:, :67] for t in (q, k, v, g, beta)), torch.zeros(2, 2, 8, 6),
                                         pos[:, :67], torch.tensor([67, 67]), 2, 0.3, True, 1e-6)
    rest, state = ref.cached_delta_rule(*(t[:, 67:] for t in (q, k, v, g, beta)), state, pos[:, 67:],
                                        torch.tensor([70, 70]), 2, 0.3, True, 1e-6)
    full, full_state = ref.cached_delta_rule(q, k, v, g, beta, torch.zeros(2, 2, 8, 6), pos, torch.tensor([70, 70]),
                                             2, 0.3, True, 1e-6)
    close(torch.cat([first, rest], 1), full)
    close(state, full_state)
    x, w = torch.randn(2, 70, 12), torch.randn(12, 4)
    y, conv = ref.cached_short_conv(x, w, None, torch.zeros(2, 3, 12), pos, torch.tensor([70, 2]), "silu")
    assert torch.equal(conv[0], x[0, -3:]) and torch.equal(conv[1], torch.cat([torch.zeros(1, 12), x[1, :2]]))
    close(y, ref.short_conv(x, w, None, "silu"))


def test_with_a_fla_package_importable_nothing_calls_it(model, want, monkeypatch):
    """transformers routes KDA to ``fla`` (GPU kernels) when it is importable and the inputs are on a device fla
    runs on; lowerlm's export swaps the functions themselves, so it never calls fla. Here a fake fla that fails on
    every call claims the CPU too: eager transformers calls it, lowerlm compiles and matches the torch path."""
    from transformers.integrations import hub_kernels
    from transformers.models.kimi_linear import modeling_kimi_linear as km

    if hasattr(hub_kernels, "_PACKAGE_SUPPORTED_DEVICES"):  # transformers 5.17 routes at import alone (the reload)
        monkeypatch.setitem(hub_kernels._PACKAGE_SUPPORTED_DEVICES, "fla", ("cuda", "cpu"))

    def fail(*args, **kwargs):
        raise AssertionError("fla called")

    names = ("fla", "fla.ops", "fla.ops.kda")
    fake = {n: types.ModuleType(n) for n in names}
    fake["fla"].ops, fake["fla.ops"].kda = fake["fla.ops"], fake["fla.ops.kda"]
    fake["fla.ops.kda"].chunk_kda = fake["fla.ops.kda"].fused_recurrent_kda = fail
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(fake)
    try:
        importlib.reload(km)
        fresh = km.KimiLinearForCausalLM(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        with pytest.raises(AssertionError, match="fla called"):  # transformers does route to it
            eager(fresh, IDS)
        cm = lowerlm.compile_model(fresh, backend="reference", use_cache=False)
        close(cm(IDS), want)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        monkeypatch.undo()
        importlib.reload(km)


# ---- gated DeltaNet: one decay per head, value heads grouped over key heads -------------------------------------
def qwen3_next():
    """A tiny Qwen3-Next: 3 gated-DeltaNet layers (4 value heads over 2 key heads) and 1 gated full attention, MoE
    MLPs with a gated shared expert."""
    import transformers

    cfg = transformers.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=6, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, max_position_embeddings=128,
        layer_types=["linear_attention"] * 3 + ["full_attention"])
    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", "A_log")):
                p.normal_(0, 0.5)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


def test_gated_deltanet_qwen3_next_matches_eager():
    model = qwen3_next()
    cm = lowerlm.compile_model(model, backend="reference", max_batch=2, max_seq_len=128)
    rules = [n for n in cm.ir.graph("decode").nodes if n.op is Op.CACHED_DELTA_RULE]
    assert len(rules) == 3 and rules[0].attr("heads") == 4 and not rules[0].attr("l2norm")  # norm traced: rsqrt form
    ids = IDS[:, :70]
    close(cm(ids), eager(model, ids))
    prompts = [IDS[0, :9].tolist(), IDS[1, :4].tolist()]
    got = list(cm.generate_ids(prompts, 12, stop_ids=()))
    for i, p in enumerate(prompts):
        assert [s[i] for s in got] == eager_greedy(model, p, 12)


def test_transformers_5_17s_conv_function_is_swapped_too():
    """transformers 5.17 (the GPU machine's floor) has KDA and gated DeltaNet call ``causal_conv1d_fn`` directly
    (5.25 goes through ``causal_conv1d_forward``): within the export's swap it is the short_conv op, computing what
    the original computes."""
    from transformers.models.qwen3_next import modeling_qwen3_next as qn

    from lowerlm.frontend import linear_attention

    x, w, b = torch.randn(2, 12, 9), torch.randn(12, 4), torch.randn(12)
    want = qn.causal_conv1d_fn(x, w, b, activation="silu")
    with linear_attention.swapped():
        assert qn.causal_conv1d_fn is linear_attention.conv1d_fn
        close(qn.causal_conv1d_fn(x, w, b, activation="silu"), want)
    assert qn.causal_conv1d_fn is not linear_attention.conv1d_fn
