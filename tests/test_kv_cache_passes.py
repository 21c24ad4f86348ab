"""insert_state, specialize and select_logits: golden IR before → after, must-not-fire cases, rewrite counts,
and differential runs on the reference backend."""

from __future__ import annotations

import pytest
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
  %s = reshape(%o) {shape=[B*S,12]} : f32[B*S,12]
  return %o, %s
}
"""

AFTER_KV = """\
graph forward(%q: f32[B,S,8], %k: f32[B,S,4], %v: f32[B,S,6], %positions: i64[B,S], %seq_lens: i32[B])
    state(%L0.kcache: f32[B,1,T,4] kv @model.layers.0.self_attn, %L0.vcache: f32[B,1,T,6] kv @model.layers.0.self_attn) {
  %L0.kcache1 = kv_cache_write(%L0.kcache, %k, %positions) : f32[B,1,T,4]  # model.layers.0.self_attn
  %L0.vcache1 = kv_cache_write(%L0.vcache, %v, %positions) : f32[B,1,T,6]  # model.layers.0.self_attn
  %o = cached_attention(%q, %L0.kcache1, %L0.vcache1, %positions, %seq_lens) {scale=0.5, window=3} : f32[B,S,12]  # model.layers.0.self_attn
  %s = reshape(%o) {shape=[B*S,12]} : f32[B*S,12]
  return %o, %s state(%L0.kcache1, %L0.vcache1)
}
"""

AFTER_SPECIALIZE_DECODE = """\
graph decode(%q: f32[B,1,8], %k: f32[B,1,4], %v: f32[B,1,6], %positions: i64[B,1], %seq_lens: i32[B])
    state(%L0.kcache: f32[B,1,T,4] kv @model.layers.0.self_attn, %L0.vcache: f32[B,1,T,6] kv @model.layers.0.self_attn) {
  %L0.kcache1 = kv_cache_write(%L0.kcache, %k, %positions) : f32[B,1,T,4]  # model.layers.0.self_attn
  %L0.vcache1 = kv_cache_write(%L0.vcache, %v, %positions) : f32[B,1,T,6]  # model.layers.0.self_attn
  %o = cached_attention(%q, %L0.kcache1, %L0.vcache1, %positions, %seq_lens) {scale=0.5, window=3} : f32[B,1,12]  # model.layers.0.self_attn
  %s = reshape(%o) {shape=[B,12]} : f32[B,12]
  return %o, %s state(%L0.kcache1, %L0.vcache1)
}"""


def _run(name, text):
    return run_pass(name, PASSES[name], ir.verify_module(ir.parse_module(text)))


def test_insert_state_golden():
    record = _run("insert_state", BEFORE)
    assert ir.print_module(record.module) == AFTER_KV and record.rewrites == 1


AFTER_KV_DASHED_OWNER = """\
graph forward(%q: f32[B,S,8], %k: f32[B,S,4], %v: f32[B,S,6], %positions: i64[B,S], %seq_lens: i32[B])
    state(%L0.self_attn.kcache: f32[B,1,T,4] kv @"model.layers.0.self-attn", %L0.self_attn.vcache: f32[B,1,T,6] kv @"model.layers.0.self-attn") {
  %L0.self_attn.kcache1 = kv_cache_write(%L0.self_attn.kcache, %k, %positions) : f32[B,1,T,4]  # model.layers.0.self-attn
  %L0.self_attn.vcache1 = kv_cache_write(%L0.self_attn.vcache, %v, %positions) : f32[B,1,T,6]  # model.layers.0.self-attn
  %o = cached_attention(%q, %L0.self_attn.kcache1, %L0.self_attn.vcache1, %positions, %seq_lens) {scale=0.5, window=3} : f32[B,S,12]  # model.layers.0.self-attn
  %s = reshape(%o) {shape=[B*S,12]} : f32[B*S,12]
  return %o, %s state(%L0.self_attn.kcache1, %L0.self_attn.vcache1)
}
"""


def test_insert_state_names_states_validly_for_any_module_path():
    """Cache names come from the owner's module path, which may hold characters a value name cannot
    (``self-attn``): those become ``_`` (the pass used to leave ``%L0.self-attn.kcache``, an invalid graph)."""
    record = _run("insert_state", BEFORE.replace("self_attn", "self-attn"))
    assert ir.print_module(record.module) == AFTER_KV_DASHED_OWNER and record.rewrites == 1
    assert ir.parse_module(AFTER_KV_DASHED_OWNER) == record.module


def test_specialize_golden():
    record = _run("specialize", AFTER_KV)
    prefill, decode = record.module.graphs
    assert record.rewrites == 2
    assert ir.print_graph(prefill) == AFTER_KV.rstrip("\n").replace("graph forward", "graph prefill")
    assert ir.print_graph(decode) == AFTER_SPECIALIZE_DECODE


def test_must_not_fire():
    no_attention = "graph forward(%x: f32[B,S,4]) {\n  %y = neg(%x) : f32[B,S,4]\n  return %y\n}\n"
    record = _run("insert_state", no_attention)
    assert ir.print_module(record.module) == no_attention and record.rewrites == 0
    specialized = ir.print_module(_run("specialize", AFTER_KV).module)
    again = _run("specialize", specialized)
    assert ir.print_module(again.module) == specialized and again.rewrites == 0
    # a second insert_state finds no attention left
    twice = _run("insert_state", AFTER_KV)
    assert ir.print_module(twice.module) == AFTER_KV and twice.rewrites == 0


def _pipeline(*names):
    m = ir.parse_module(example_text())
    for name in names:
        m = run_pass(name, PASSES[name], m).module
    return m


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 8), extra=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_prefill_into_an_empty_cache_equals_attention(batch, seq, extra, seed):
    """After insert_state, a right-padded prefill into a zeroed cache of any length gives the logits of the
    graph before it."""
    before = _pipeline("canonicalize")
    after = _pipeline("canonicalize", "insert_state")
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
    m = _pipeline("canonicalize", "insert_state", "specialize")
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


SELECT_BEFORE = """\
params {
  "norm.weight": f32[4]
  "lm_head.weight": f32[6,4]
}

graph prefill(%x: f32[B,S,4], %positions: i64[B,S]) {
  %ln = param "norm.weight" : f32[4]
  %w = param "lm_head.weight" : f32[6,4]
  %logits = rms_norm_linear(%x, %ln, %w) {eps=1e-05, splits=[6]} : f32[B,S,6]  # model.norm, lm_head
  return %logits
}
"""

SELECT_AFTER = """\
params {
  "norm.weight": f32[4]
  "lm_head.weight": f32[6,4]
}

graph prefill(%x: f32[B,S,4], %positions: i64[B,S], %logit_index: i64[B,L]) {
  %ln = param "norm.weight" : f32[4]
  %w = param "lm_head.weight" : f32[6,4]
  %logit_index.col = reshape(%logit_index) {shape=[B,L,1]} : i64[B,L,1]  # model.norm, lm_head
  %logit_index.rows = expand(%logit_index.col) {shape=[B,L,4]} : i64[B,L,4]  # model.norm, lm_head
  %x.picked = gather(%x, %logit_index.rows) {dim=1} : f32[B,L,4]  # model.norm, lm_head
  %logits = rms_norm_linear(%x.picked, %ln, %w) {eps=1e-05, splits=[6]} : f32[B,L,6]  # model.norm, lm_head
  return %logits
}
"""


def test_select_logits_golden():
    record = _run("select_logits", SELECT_BEFORE)
    assert ir.print_module(record.module) == SELECT_AFTER and record.rewrites == 1


@pytest.mark.parametrize("text", [
    SELECT_BEFORE.replace("graph prefill", "graph decode"),  # only prefill has more than one row
    SELECT_AFTER,  # already selected
    # the output is not made by a row-wise head: nothing to gather before
    SELECT_BEFORE.replace("  return %logits", "  %y = neg(%logits) : f32[B,S,6]\n  return %y"),
    # a residual read by the head
    SELECT_BEFORE.replace("%logits = rms_norm_linear(%x, %ln, %w) {eps=1e-05, splits=[6]}", "%logits = linear(%x, %w, "
                          "residual=%r)").replace("%positions: i64[B,S])", "%positions: i64[B,S], %r: f32[B,S,6])"),
    # a residual add before the norm: its sum is a second result
    SELECT_BEFORE.replace("%logits = rms_norm_linear(%x, %ln, %w)", "%logits, %sum = rms_norm_linear(%x, %ln, %w, "
                          "residual=%x)").replace(": f32[B,S,6]  #", ": f32[B,S,6], f32[B,S,4]  #"),
    # two outputs: the runtime's contract is one logits output
    SELECT_BEFORE.replace("  return %logits", "  return %logits, %x"),
], ids=["decode", "selected", "not-row-wise", "linear-residual", "norm-residual", "two-outputs"])
def test_select_logits_must_not_fire(text):
    record = _run("select_logits", text)
    assert ir.print_module(record.module) == ir.print_module(ir.parse_module(text)) and record.rewrites == 0


def test_select_logits_gives_the_rows_asked_for():
    """The selected prefill's logits at any rows equal the full prefill's logits at those rows, and its cache
    writes are the same."""
    m = _pipeline("canonicalize", "fuse_linear_residual", "fuse_rmsnorm_linear", "insert_state", "specialize")
    selected = run_pass("select_logits", PASSES["select_logits"], m).module
    weights = random_weights(m, 5)
    inputs = token_inputs(3, 6, 64, 5, lens=[6, 4, 1])
    full, full_state = ReferenceProgram(m, weights).run("prefill", inputs, allocate_state(m, 3, 8))
    index = torch.tensor([[5, 0], [3, 1], [0, 0]])
    got, got_state = ReferenceProgram(selected, weights).run("prefill", inputs | {"logit_index": index},
                                                             allocate_state(m, 3, 8))
    assert got[0].shape == (3, 2, 64)
    torch.testing.assert_close(got[0], full[0].gather(1, index[..., None].expand(-1, -1, 64)), rtol=1e-5, atol=1e-6)
    for name in full_state:
        torch.testing.assert_close(got_state[name], full_state[name], rtol=0, atol=0)


MIXERS = {
    "mean over the sequence axis": "%m = mean(%x) {dims=[1], keepdim=true} : f32[B,1,8]",
    "softmax over the sequence axis": "%m = softmax(%x) {dim=1} : f32[B,S,8]",
    "indexed by two sequence axes": "%t = transpose(%x) {perm=[0,2,1]} : f32[B,8,S]\n"
                                    "  %m = matmul(%x, %t) : f32[B,S,S]",
    "contracting the sequence axis": "%t = transpose(%x) {perm=[0,2,1]} : f32[B,8,S]\n"
                                     "  %m = matmul(%t, %x) : f32[B,8,8]",
    "slice along the sequence axis": "%m = slice(%x) {dim=1, start=1, end=S} : f32[B,S-1,8]",
    "split along the sequence axis": "%m, %n = split(%x) {dim=1, sizes=[1,S-1]} : f32[B,1,8], f32[B,S-1,8]",
}


@pytest.mark.parametrize("why", list(MIXERS))
def test_insert_state_refuses_a_graph_that_mixes_tokens_outside_attention(why):
    """Decoding one token at a time would compute something else: a mean or softmax over the tokens, pairwise
    scores, a product over the tokens, a token shift. The error names the op, its module and what to do."""
    text = f"""\
graph forward(%x: f32[B,S,8]) {{
  {MIXERS[why]}  # blocks.0
  return %m
}}
"""
    with pytest.raises(ir.PassError, match=rf"in module 'blocks.0' mixes tokens outside an attention op \(.*{why}"):
        _run("insert_state", text)


def test_insert_state_refuses_attention_that_is_not_causal():
    """Every token of an all-visible attention sees the later ones; decoding against a cache cannot."""
    text = BEFORE.replace("{heads=[2,1], scale=0.5, window=3}", "{heads=[2,1], scale=0.5, causal=false}")
    with pytest.raises(ir.PassError, match="'attention' in module 'model.layers.0.self_attn' is not causal"):
        _run("insert_state", text)


def test_insert_state_allows_what_stays_within_a_token():
    """A reduction over features, an outer product that is per token (rotary angles: [B,D,1] @ [B,1,S]), a
    reshape merging batch and sequence, a slice of features: nothing to refuse, nothing to rewrite."""
    text = """\
graph forward(%x: f32[B,S,8], %f: f32[B,4,1], %p: f32[B,1,S]) {
  %m = mean(%x) {dims=[2], keepdim} : f32[B,S,1]
  %a = matmul(%f, %p) : f32[B,4,S]
  %r = reshape(%x) {shape=[B*S,8]} : f32[B*S,8]
  %h = slice(%x) {dim=2, end=4} : f32[B,S,4]
  return %m, %a, %r, %h
}
"""
    record = _run("insert_state", text)
    assert record.rewrites == 0 and ir.print_module(record.module) == text


# ---- recurrent state: short_conv and delta_rule ----------------------------------------------------------------
BEFORE_LINEAR = """\
params {
  "conv.weight": f32[12,4]
}

graph forward(%x: f32[B,S,12], %g: f32[B,S,4], %beta: f32[B,S,2], %positions: i64[B,S], %seq_lens: i32[B]) {
  %w = param "conv.weight" : f32[12,4]
  %c = short_conv(%x, %w) {act=silu} : f32[B,S,12]  # model.layers.0.self_attn
  %q, %k, %v = split(%c) {dim=2, sizes=[4,4,4]} : f32[B,S,4], f32[B,S,4], f32[B,S,4]
  %o = delta_rule(%q, %k, %v, %g, %beta) {heads=2, scale=0.7, l2norm} : f32[B,S,4]  # model.layers.0.self_attn
  return %o
}
"""

AFTER_LINEAR = """\
params {
  "conv.weight": f32[12,4]
}

graph forward(%x: f32[B,S,12], %g: f32[B,S,4], %beta: f32[B,S,2], %positions: i64[B,S], %seq_lens: i32[B])
    state(%L0.self_attn.conv: f32[B,3,12] recurrent @model.layers.0.self_attn, %L0.self_attn.delta: f32[B,2,2,2] recurrent @model.layers.0.self_attn) {
  %w = param "conv.weight" : f32[12,4]
  %c, %L0.self_attn.conv1 = cached_short_conv(%x, %w, state=%L0.self_attn.conv, positions=%positions, seq_lens=%seq_lens) {act=silu} : f32[B,S,12], f32[B,3,12]  # model.layers.0.self_attn
  %q, %k, %v = split(%c) {dim=2, sizes=[4,4,4]} : f32[B,S,4], f32[B,S,4], f32[B,S,4]
  %o, %L0.self_attn.delta1 = cached_delta_rule(%q, %k, %v, %g, %beta, %L0.self_attn.delta, %positions, %seq_lens) {heads=2, scale=0.7, l2norm} : f32[B,S,4], f32[B,2,2,2]  # model.layers.0.self_attn
  return %o state(%L0.self_attn.conv1, %L0.self_attn.delta1)
}
"""


def _linear_inputs(b, s, seed=0, lens=None):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, s, 12, generator=g), "g": -torch.rand(b, s, 4, generator=g),
            "beta": torch.rand(b, s, 2, generator=g), "positions": torch.arange(s).repeat(b, 1),
            "seq_lens": torch.tensor(lens or [s] * b, dtype=torch.int32)}


def test_insert_state_gives_short_conv_and_delta_rule_recurrent_state():
    record = _run("insert_state", BEFORE_LINEAR)
    assert ir.print_module(record.module) == AFTER_LINEAR and record.rewrites == 2
    again = _run("insert_state", AFTER_LINEAR)  # must not fire: nothing stateless left
    assert ir.print_module(again.module) == AFTER_LINEAR and again.rewrites == 0
    without = BEFORE_LINEAR.replace("graph forward(%x: f32[B,S,12], %g: f32[B,S,4], %beta: f32[B,S,2], %positions: "
                                    "i64[B,S], %seq_lens: i32[B])", "graph forward(%x: f32[B,S,12], %g: f32[B,S,4], "
                                    "%beta: f32[B,S,2])")
    with pytest.raises(ir.PassError, match=r"'short_conv' in module 'model.layers.0.self_attn' needs the graph "
                                           r"input %positions"):
        _run("insert_state", without)


def test_recurrent_state_prefill_then_decode_equals_the_stateless_graph():
    """Differential, on the reference backend: the graph before insert_state over 9 tokens against its stateful
    form run as a right-padded prefill of 6 (one row 4 long) and then one token at a time."""
    before = ir.verify_module(ir.parse_module(BEFORE_LINEAR))
    after = ir.verify_module(ir.parse_module(AFTER_LINEAR))
    weights = {"conv.weight": torch.randn(12, 4, generator=torch.Generator().manual_seed(3))}
    inputs = _linear_inputs(2, 9)
    want = ReferenceProgram(before, weights).run("forward", inputs)[0][0]
    program, state = ReferenceProgram(after, weights), allocate_state(after, 2, 16)
    assert {s.kind for s in after.graphs[0].state} == {"recurrent"}
    lens = [6, 4]
    first = {k: v[:, :6] if v.dim() > 1 else torch.tensor(lens, dtype=torch.int32) for k, v in inputs.items()}
    (got,), state = program.run("forward", first, state)
    for b, n in enumerate(lens):
        torch.testing.assert_close(got[b, :n], want[b, :n], rtol=1e-5, atol=1e-6)
    for t in range(4, 9):  # row 1 continues at 4, row 0 at 6: until then its token is padding (at its seq_lens)
        pos = torch.tensor([[max(t, 6)], [t]])
        step = {k: torch.stack([v[0, max(t, 6)], v[1, t]])[:, None] for k, v in inputs.items() if v.dim() == 3}
        step.update(positions=pos, seq_lens=torch.tensor([6 if t < 6 else t + 1, t + 1], dtype=torch.int32))
        (got,), state = program.run("forward", step, state)
        torch.testing.assert_close(got[1, 0], want[1, t], rtol=1e-5, atol=1e-6)
        if t >= 6:
            torch.testing.assert_close(got[0, 0], want[0, t], rtol=1e-5, atol=1e-6)
