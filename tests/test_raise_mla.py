"""raise_mla and mla_attention's stateful form: golden IR before -> after, must-not-fire cases, differential runs on
the reference backend (prefill, then decode steps in the absorbed form, against the graph before the passes), and
the state of whole compiled MLA models: the latent and the rotary key per layer, nothing expanded."""

from __future__ import annotations

import pytest
import torch

import lowerlm
import lowerlm.ir as ir
from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.ir import compute
from lowerlm.passes import PASSES, run_pass
from lowerlm.runtime.generate import allocate_state

# latent L = 8, rotary R = 2; 2 heads of nope P = 4 and values V = 3: kv_b's weight [2 * (4 + 3), 8]
BEFORE = """\
params {
  "kv_b.weight": f32[14,8]
}

graph forward(%q: f32[B,S,12], %c: f32[B,S,8], %k_pe: f32[B,S,2], %positions: i64[B,S], %seq_lens: i32[B]) {
  %w = param "kv_b.weight" : f32[14,8]
  %k, %v = mla_expand(%c, %k_pe, %w) {heads=2, nope=4} : f32[B,S,12], f32[B,S,6]  # model.layers.0.self_attn
  %o = attention(%q, %k, %v, %positions, %seq_lens) {heads=[2,2], scale=0.4} : f32[B,S,6]  # model.layers.0.self_attn
  return %o
}
"""

AFTER = """\
params {
  "kv_b.weight": f32[14,8]
}

graph forward(%q: f32[B,S,12], %c: f32[B,S,8], %k_pe: f32[B,S,2], %positions: i64[B,S], %seq_lens: i32[B]) {
  %w = param "kv_b.weight" : f32[14,8]
  %o = mla_attention(%q, %c, %k_pe, %w, %positions, %seq_lens) {heads=2, nope=4, scale=0.4} : f32[B,S,6]  # model.layers.0.self_attn
  return %o
}
"""

AFTER_STATE = """\
params {
  "kv_b.weight": f32[14,8]
}

graph forward(%q: f32[B,S,12], %c: f32[B,S,8], %k_pe: f32[B,S,2], %positions: i64[B,S], %seq_lens: i32[B])
    state(%L0.ccache: f32[B,1,T,8] kv @model.layers.0.self_attn, %L0.kpecache: f32[B,1,T,2] kv @model.layers.0.self_attn) {
  %w = param "kv_b.weight" : f32[14,8]
  %L0.ccache1 = kv_cache_write(%L0.ccache, %c, %positions) : f32[B,1,T,8]  # model.layers.0.self_attn
  %L0.kpecache1 = kv_cache_write(%L0.kpecache, %k_pe, %positions) : f32[B,1,T,2]  # model.layers.0.self_attn
  %o = cached_mla_attention(%q, %L0.ccache1, %L0.kpecache1, %w, %positions, %seq_lens) {heads=2, nope=4, scale=0.4} : f32[B,S,6]  # model.layers.0.self_attn
  return %o state(%L0.ccache1, %L0.kpecache1)
}
"""


def _run(name, text):
    return run_pass(name, PASSES[name], ir.verify_module(ir.parse_module(text)))


def test_raise_mla_golden():
    record = _run("raise_mla", BEFORE)
    assert ir.print_module(record.module) == AFTER and record.rewrites == 1
    again = _run("raise_mla", AFTER)
    assert ir.print_module(again.module) == AFTER and again.rewrites == 0


def test_insert_state_caches_the_latent_and_the_rotary_key():
    record = _run("insert_state", AFTER)
    assert ir.print_module(record.module) == AFTER_STATE and record.rewrites == 1


TWO_EXPANSIONS = BEFORE.replace(
    "  %o = attention(%q, %k, %v,",
    "  %k2, %v2 = mla_expand(%c, %k_pe, %w) {heads=2, nope=4} : f32[B,S,12], f32[B,S,6]\n"
    "  %o = attention(%q, %k, %v2,")


@pytest.mark.parametrize("text", [
    BEFORE.replace("scale=0.4}", "scale=0.4, window=3}"),  # a sliding window: not mla_attention's mask
    BEFORE.replace("scale=0.4}", "scale=0.4, softcap=5.0}"),
    BEFORE.replace("scale=0.4}", "scale=0.4, causal=false}"),
    TWO_EXPANSIONS,  # keys of one expansion, values of another
], ids=["window", "softcap", "not-causal", "two-expansions"])
def test_raise_mla_must_not_fire(text):
    record = _run("raise_mla", text)
    assert record.rewrites == 0 and ir.print_module(record.module) == ir.print_module(ir.parse_module(text))


def _inputs(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(b, s, 12, generator=g), "c": torch.randn(b, s, 8, generator=g),
            "k_pe": torch.randn(b, s, 2, generator=g), "positions": torch.arange(s).repeat(b, 1),
            "seq_lens": torch.full((b,), s, dtype=torch.int32)}


def test_prefill_then_absorbed_decode_equals_the_graph_before_the_passes():
    """Differential, on the reference backend: the expanded attention over 9 tokens against the latent-cached form
    run as a right-padded prefill (rows 6 and 4 long) and then one token at a time (the absorbed form)."""
    weights = {"kv_b.weight": torch.randn(14, 8, generator=torch.Generator().manual_seed(1)) * 0.5}
    before = ir.verify_module(ir.parse_module(BEFORE))
    after = ir.verify_module(ir.parse_module(AFTER_STATE))
    inputs = _inputs(2, 9)
    want = ReferenceProgram(before, weights).run("forward", inputs)[0][0]
    program, state = ReferenceProgram(after, weights), allocate_state(after, 2, 16)
    lens = [6, 4]
    first = {k: v[:, :6] if v.dim() > 1 else torch.tensor(lens, dtype=torch.int32) for k, v in inputs.items()}
    (got,), state = program.run("forward", first, state)
    for b, n in enumerate(lens):
        torch.testing.assert_close(got[b, :n], want[b, :n], rtol=1e-5, atol=1e-6)
    for t in range(4, 9):  # row 1 continues at 4, row 0 at 6
        step = {k: torch.stack([v[0, max(t, 6)], v[1, t]])[:, None] for k, v in inputs.items() if v.dim() == 3}
        step.update(positions=torch.tensor([[max(t, 6)], [t]]),
                    seq_lens=torch.tensor([6 if t < 6 else t + 1, t + 1], dtype=torch.int32))
        (got,), state = program.run("forward", step, state)
        torch.testing.assert_close(got[1, 0], want[1, t], rtol=1e-5, atol=1e-6)
        if t >= 6:
            torch.testing.assert_close(got[0, 0], want[0, t], rtol=1e-5, atol=1e-6)


def test_the_absorbed_and_naive_forms_agree():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 1, 2 * 6, generator=g)
    c, kpe = torch.randn(3, 1, 10, 8, generator=g), torch.randn(3, 1, 10, 2, generator=g)
    w = torch.randn(14, 8, generator=g)
    pos, lens = torch.tensor([[4], [9], [0]]), torch.tensor([5, 10, 1], dtype=torch.int32)
    absorbed = compute.mla_absorbed(q, c, kpe, w, pos, lens, 2, 4, 0.4)
    k, v = compute.mla_expand(c[:, 0], kpe[:, 0], w, 2, 4)
    naive = compute.cached_attention(q, k.view(3, 10, 2, 6).transpose(1, 2), v.view(3, 10, 2, 3).transpose(1, 2),
                                     pos, lens, None, 0.4, True, 0)
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["deepseek_v3", "kimi_linear"])
def test_the_decode_cache_holds_only_the_latent_and_the_rotary_key(family):
    from .test_kda import kimi
    from .test_mla import deepseek

    if family == "kimi_linear":
        model = kimi(layer_types=("linear_attention", "full_attention"), mlp_types=("dense", "sparse"))
        mla_layers, attn = [1], model.model.layers[1].self_attn
    else:
        model = deepseek(version=3)
        mla_layers, attn = [0, 1], model.model.layers[0].self_attn
    cm = lowerlm.compile_model(model, backend="reference", max_batch=2, max_seq_len=64, tokenizer=False)
    assert [r.rewrites for r in cm.records if r.name == "raise_mla"] == [len(mla_layers)]
    lat, rope = attn.kv_lora_rank, attn.qk_rope_head_dim
    for g in cm.ir.graphs:
        kv = [(s.name, s.owner, [str(d) for d in s.type.shape]) for s in g.state if s.kind == "kv"]
        assert kv == [x for i in mla_layers for x in (
            (f"L{i}.ccache", f"model.layers.{i}.self_attn", ["B", "1", "T", str(lat)]),
            (f"L{i}.kpecache", f"model.layers.{i}.self_attn", ["B", "1", "T", str(rope)]))]
        assert not any(n.op in (ir.Op.CACHED_ATTENTION, ir.Op.MLA_EXPAND) for n in g.nodes)
        assert sum(n.op is ir.Op.CACHED_MLA_ATTENTION for n in g.nodes) == len(mla_layers)
