"""Printer and parser: exact round trips, typed errors with positions, and no crash on any text."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowerlm.ir as ir
from lowerlm.ir import DType, GraphBuilder, Op, TensorType, parse_type, sym
from lowerlm.ir.weights import Concat, Data, MatMul, Param, Scale, Transpose

from .conftest import example_text

# Canonical text using multi-result ops, state, weight expressions, symbolic shapes, every attribute kind,
# a named optional input and sources.
KITCHEN_SINK = """\
params {
  "wq": f32[32,16]
  "wk": f32[16,16]
  "wd": f32[16,24]
  "wu": f32[24,16]
  "ln": bf16[16]
}

graph decode(%input_ids: i64[B,1], %x: f32[B,1,16], %positions: i64[B,1], %seq_lens: i32[B], %y: f32[B,(S+1)//2,4])
    state(%kc0: f32[B,2,T,8] @model.layers.0.self_attn, %vc0: f32[B,2,T,8] @model.layers.0.self_attn) {
  %wqk = weight concat[0](param "wq", param "wk") : f32[48,16]  # model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj
  %m = weight matmul(scale[1](param "wd", data "arm.0.mu" : f32[24] sha "0123456789abcdef"), param "wu") : f32[16,16]
  %wt = weight transpose(cast[bf16](param "wd")) : bf16[24,16]
  %qk = linear(%x, %wqk) : f32[B,1,48]
  %r = linear(%x, %m, residual=%x) : f32[B,1,16]
  %q, %k = split(%qk) {dim=-1, sizes=[32,16]} : f32[B,1,32], f32[B,1,16]
  %qr, %kr = rope(%q, %k, %positions) {heads=[4,2], inv_freq=[1.0,0.01], scaling=0.5, layout=interleaved} : f32[B,1,32], f32[B,1,16]
  %kc1 = kv_cache_write(%kc0, %kr, %positions) : f32[B,2,T,8]
  %vc1 = kv_cache_write(%vc0, %k, %positions) : f32[B,2,T,8]
  %o = cached_attention(%qr, %kc1, %vc1, %positions, %seq_lens) {scale=0.125, causal=false, window=4096} : f32[B,1,32]
  %vals, %idx = topk(%o) {k=2, largest=false} : f32[B,1,2], i64[B,1,2]
  %am = argmax(%o) {dim=1, keepdim} : i64[B,1,32]
  %flat = reshape(%o) {shape=[32*B]} : f32[32*B]
  %half = reshape(%flat) {shape=[B,32]} : f32[B,32]
  %yf = reshape(%y) {shape=[B*((S+1)//2),4]} : f32[B*((S+1)//2),4]
  %sl = slice(%o) {dim=2, start=1, end=31, step=3} : f32[B,1,10]
  %c = constant {value=[1.5,-2.0,inf], dtype=f32, shape=[3]} : f32[3]
  %n = constant {value=-1e-06, dtype=f32} : f32[]
  %g = gelu(%o) {approximate=tanh} : f32[B,1,32]
  %p = pow(%g) {exponent=2.0} : f32[B,1,32]
  %s = sum(%p) {dims=[-1], keepdim} : f32[B,1,1]
  %mn = mean(%p) {dims=[0,2]} : f32[1]
  %lc = cast(%x) {dtype=bf16} : bf16[B,1,16]
  %ln = param "ln" : bf16[16]
  %h = rms_norm(%lc, %ln) {eps=1e-06} : bf16[B,1,16]
  return %vals, %idx, %am, %half, %yf, %sl, %c, %n, %s, %mn, %h, %r, %wt state(%kc1, %vc1)
}
"""


def test_example_round_trips_exactly():
    text = example_text()
    m = ir.parse_module(text)
    printed = ir.print_module(m)
    assert ir.parse_module(printed) == m
    assert ir.print_module(ir.parse_module(printed)) == printed


def test_kitchen_sink_round_trips_and_verifies():
    m = ir.parse_module(KITCHEN_SINK)
    assert ir.print_module(m) == KITCHEN_SINK
    ir.verify_module(m)
    g = m.graph("decode")
    q_node = g.producer("q")
    assert q_node.op is Op.SPLIT and q_node.result_names == ("q", "k")
    assert g.producer("r").inputs == ("x", "m", None, "x")
    assert g.producer("am").attr("keepdim") is True
    assert g.producer("o").attr("causal") is False
    assert g.state[0].owner == "model.layers.0.self_attn"
    assert g.producer("wqk").source == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj")
    assert g.type_of("flat") == TensorType(DType.F32, (32 * sym("B"),))


@pytest.mark.parametrize("owner", ["0.attn", "blocks.0 attn", 'a"b', "model.layers.0.self_attn"])
def test_any_state_owner_round_trips(owner):
    """An owner the parser cannot read as one name (an nn.Sequential numbers its children) prints as a string."""
    m = ir.parse_module(KITCHEN_SINK)
    g = m.graph("decode")
    g = dataclasses.replace(g, state=tuple(dataclasses.replace(s, owner=owner) for s in g.state))
    m = ir.Module(tuple(g if x.name == "decode" else x for x in m.graphs), m.params)
    text = ir.print_module(m)
    assert ir.parse_module(text) == m and ir.print_module(ir.parse_module(text)) == text


def test_graph_built_in_code_round_trips_with_data_values():
    b = GraphBuilder("forward")
    x = b.input("x", parse_type("f32[B,S,4]"))
    mu = Data.of("mu", parse_type("f32[4]"), [0.5, -1.0, 2.0, 0.25])
    w = b.add(Op.WEIGHT, attrs={"expr": Scale(Transpose(Param("w")), mu, 1)}, types=[parse_type("f32[4,4]")],
              name="w")
    y = b.add(Op.LINEAR, [x, w], name="y", source=["model.proj"])
    parts = b.add(Op.SPLIT, [y], {"dim": 2, "sizes": [1, 3]}, name="part")
    m = ir.Module.of([b.build(list(parts))], {"w": parse_type("f32[4,4]")})
    ir.verify_module(m)
    again = ir.parse_module(ir.print_module(m))
    assert again == m  # data values are not part of the text; the digest is
    assert again.graphs[0].producer("w").attrs["expr"].by.values is None
    assert f'sha "{mu.digest}"' in ir.print_module(m)


def test_weight_expressions_print_nested():
    e = MatMul(Concat((Param("a"), Param("b")), 1), Transpose(Param("c")))
    from lowerlm.ir.weights import expr_str

    assert expr_str(e) == 'matmul(concat[1](param "a", param "b"), transpose(param "c"))'


@pytest.mark.parametrize("text, message, line", [
    ("graph f(%x: f32[2]) {\n  %y = frobnicate(%x) : f32[2]\n  return %y\n}", "unknown op 'frobnicate'", 2),
    ("graph f(%x: f33[2]) {\n  return %x\n}", "unknown dtype 'f33'", 1),
    ("graph f(%x: f32[2]) {\n  %y = neg(%x) f32[2]\n  return %y\n}", "expected ':'", 2),
    ("graph f(%x: f32[2]) {\n  %y, %z = neg(%x) : f32[2]\n  return %y\n}", "2 results but 1 types", 2),
    ("graph f(%x: f32[S//0]) {\n  return %x\n}", "positive integer divisor", 1),
    ("graph f(%x: f32[2]) {\n  %y = neg(%x) : f32[2]\n", "expected 'return'", 3),
    ("graph f(%x: f32[2]) {\n  %y = linear(%x, bias=%x, %x) : f32[2]\n  return %y\n}", "positional operand", 2),
    ("graph f(%x: f32[2]) {\n  %y = linear(%x, %x, nope=%x) : f32[2]\n  return %y\n}", "has no input 'nope'", 2),
    ("graph f(%x: f32[2]) {\n  %y = neg(%x) {a=1, a=2} : f32[2]\n  return %y\n}", "given twice", 2),
    ("graph f(%x: f32[2]) {\n  %w = weight frob(param \"a\") : f32[2]\n  return %w\n}", "unknown weight", 2),
    ("graph f(%x: f32[2]) {\n  return %x\n}\n}", "expected 'graph', got '}'", 4),
    ("graph f(%x: f32[2]) { return %x } $", "unexpected character", 1),
])
def test_parse_errors_are_typed_and_located(text, message, line):
    with pytest.raises(ir.ParseError) as e:
        ir.parse_module(text)
    assert message in str(e.value)
    assert e.value.line == line


# ---- no crash on any text -----------------------------------------------------------------------------------
_TOKENS = ["graph", "f", "(", ")", "{", "}", "[", "]", ",", ":", "=", "%x", "%y", "f32", "i64", "B", "S", "2",
           "-", "+", "*", "//", "return", "state", "params", '"w"', "param", "weight", "concat", "linear", "neg",
           "split", "@", "# src", "\n", "1e-05", "inf", "true", "dims", "{eps=1e-05}", "data", "sha", "999999"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_TOKENS), max_size=40).map(" ".join))
def test_random_token_soup_parses_or_raises_parse_error(text):
    try:
        ir.parse_module(text)
    except ir.ParseError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_text_parses_or_raises_parse_error(data):
    text = KITCHEN_SINK
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 12)))
        text = text[:i] + data.draw(st.text(alphabet="%(){}[],:=@#*+-/ \n0123456789abfxST.\"\\", max_size=6)) \
            + text[j:]
    try:
        m = ir.parse_module(text)
    except ir.ParseError:
        return
    # whatever parses prints to text that parses back to the same module
    assert ir.parse_module(ir.print_module(m)) == m


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_unicode_parses_or_raises_parse_error(text):
    try:
        ir.parse_module(text)
    except ir.ParseError:
        pass


def test_deep_nesting_is_a_parse_error():
    with pytest.raises(ir.ParseError, match="too deep"):
        ir.parse_module("graph f(%x: f32[" + "(" * 500 + "1" + ")" * 500 + "]) {\n return %x\n}")


def test_parse_type_helper():
    assert parse_type("bf16[B,S*2,576]") == TensorType(DType.BF16, (sym("B"), 2 * sym("S"), 576))
    assert torch.bfloat16 == DType.BF16.to_torch()
