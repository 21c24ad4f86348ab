"""insert_kv_cache and specialize: golden IR before → after, must-not-fire cases, rewrite counts, and
differential runs on the reference backend."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowerlm.ir as ir
from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.passes import PASSES, run_pass
from lowerlm.runtime.generate import allocate_state

from .conftest import example_text, random_weights, token_inputs

BEFORE = """\
graph forward(%q: f32[B,S,8], %k: f32[B,S,4], %v: f32[B,S,6], %positions: i64[B,S], %seq_lens: i32[B]) {
  %o = attention(%q, %k, %v, %positions, %seq_lens) {heads=[2,1], scale=0.5, window=3} : f32[B,S,12]  # model.layers.0.self_attn
  %s = slice(%o) {dim=1, end=S//2} : f32[B,S//2,12]
  return %o, %s
}
"""

AFTER_KV = """\
graph forward(%q: f32[B,S,8], %k: f32[B,S,4], %v: f32[B,S,6], %positions: i64[B,S], %seq_lens: i32[B])
    state(%L0.kcache: f32[B,1,T,4] @model.layers.0.self_attn, %L0.vcache: f32[B,1,T,6] @model.layers.0.self_attn) {
  %L0.kcache1 = kv_cache_write(%L0.kcache, %k, %positions) : f32[B,1,T,4]  # model.layers.0.self_attn
  %L0.vcache1 = kv_cache_write(%L0.vcache, %v, %positions) : f32[B,1,T,6]  # model.layers.0.self_attn
  %o = cached_attention(%q, %L0.kcache1, %L0.vcache1, %positions, %seq_lens) {scale=0.5, window=3} : f32[B,S,12]  # model.layers.0.self_attn
  %s = slice(%o) {dim=1, end=S//2} : f32[B,S//2,12]
  return %o, %s state(%L0.kcache1, %L0.vcache1)
}
"""

AFTER_SPECIALIZE_DECODE = """\
graph decode(%q: f32[B,1,8], %k: f32[B,1,4], %v: f32[B,1,6], %positions: i64[B,1], %seq_lens: i32[B])
    state(%L0.kcache: f32[B,1,T,4] @model.layers.0.self_attn, %L0.vcache: f32[B,1,T,6] @model.layers.0.self_attn) {
  %L0.kcache1 = kv_cache_write(%L0.kcache, %k, %positions) : f32[B,1,T,4]  # model.layers.0.self_attn
  %L0.vcache1 = kv_cache_write(%L0.vcache, %v, %positions) : f32[B,1,T,6]  # model.layers.0.self_attn
  %o = cached_attention(%q, %L0.kcache1, %L0.vcache1, %positions, %seq_lens) {scale=0.5, window=3} : f32[B,1,12]  # model.layers.0.self_attn
  %s = slice(%o) {dim=1, end=0} : f32[B,0,12]
  return %o, %s state(%L0.kcache1, %L0.vcache1)
}"""


def _run(name, text):
    return run_pass(name, PASSES[name], ir.verify_module(ir.parse_module(text)))


def test_insert_kv_cache_golden():
    record = _run("insert_kv_cache", BEFORE)
    assert ir.print_module(record.module) == AFTER_KV and record.rewrites == 1


def test_specialize_golden():
    record = _run("specialize", AFTER_KV)
    prefill, decode = record.module.graphs
    assert record.rewrites == 2
    assert ir.print_graph(prefill) == AFTER_KV.rstrip("\n").replace("graph forward", "graph prefill")
    assert ir.print_graph(decode) == AFTER_SPECIALIZE_DECODE


def test_must_not_fire():
    no_attention = "graph forward(%x: f32[B,S,4]) {\n  %y = neg(%x) : f32[B,S,4]\n  return %y\n}\n"
    record = _run("insert_kv_cache", no_attention)
    assert ir.print_module(record.module) == no_attention and record.rewrites == 0
    specialized = ir.print_module(_run("specialize", AFTER_KV).module)
    again = _run("specialize", specialized)
    assert ir.print_module(again.module) == specialized and again.rewrites == 0
    # a second insert_kv_cache finds no attention left
    twice = _run("insert_kv_cache", AFTER_KV)
    assert ir.print_module(twice.module) == AFTER_KV and twice.rewrites == 0


def _pipeline(*names):
    m = ir.parse_module(example_text())
    for name in names:
        m = run_pass(name, PASSES[name], m).module
    return m


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 8), extra=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_prefill_into_an_empty_cache_equals_attention(batch, seq, extra, seed):
    """After insert_kv_cache, a right-padded prefill into a zeroed cache of any length gives the logits of the
    graph before it."""
    before = _pipeline("canonicalize")
    after = _pipeline("canonicalize", "insert_kv_cache")
    weights = random_weights(before, seed)
    lens = [max(1, seq - i) for i in range(batch)]
    inputs = token_inputs(batch, seq, 64, seed, lens)
    want = ReferenceProgram(before, weights).run("forward", inputs)[0][0]
    state = allocate_state(after, batch, seq + extra)
    got, new_state = ReferenceProgram(after, weights).run("forward", inputs, state)
    for b, n in enumerate(lens):
        torch.testing.assert_close(got[0][b, :n], want[b, :n], rtol=1e-5, atol=1e-6)
    assert set(new_state) == set(state)


def test_decode_continues_a_prefill():
    """prefill(t[:n]) then decode(t[n]) gives the logits prefill(t[:n+1]) gives at its last position."""
    m = _pipeline("canonicalize", "insert_kv_cache", "specialize")
    weights = random_weights(m, 3)
    prog = ReferenceProgram(m, weights)
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    state = allocate_state(m, 2, 16)
    n = 5
    prog.run("prefill", token_inputs(2, n, 64) | {"input_ids": tokens[:, :n]}, state, inplace=True)
    steps = []
    for i in range(n, 7):
        out, _ = prog.run("decode", {"input_ids": tokens[:, i:i + 1], "positions": torch.full((2, 1), i),
                                     "seq_lens": torch.full((2,), i + 1, dtype=torch.int32)}, state, inplace=True)
        steps.append(out[0][:, 0])
    full = prog.run("prefill", token_inputs(2, 7, 64) | {"input_ids": tokens}, allocate_state(m, 2, 7))[0][0]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, n:], rtol=1e-5, atol=1e-5)
