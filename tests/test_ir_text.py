"""Printer and parser: exact round trips, typed errors with positions, and no crash on any text."""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowerlm.ir as ir
from lowerlm.ir import OPDEFS, AttrKind, DType, GraphBuilder, Op, TensorType, parse_type, sym
from lowerlm.ir.body import Apply
from lowerlm.ir.types import StateSpec
from lowerlm.ir.weights import Cast, Concat, Data, MatMul, Param, Scale, Transpose

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
    state(%kc0: f32[B,2,T,8] kv @model.layers.0.self_attn, %vc0: f32[B,2,T,8] kv @model.layers.0.self_attn) {
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
  %e = ew_chain(%g, %p) {body=mul(gelu[approximate=tanh](%0), add(pow[exponent=3.0](%1), %0))} : f32[B,1,32]
  %eh = ew_chain(%lc) {body=cast[dtype=f32](sub(%0, neg(%0)))} : f32[B,1,16]
  return %vals, %idx, %am, %half, %yf, %sl, %c, %n, %s, %mn, %h, %r, %wt, %e, %eh state(%kc1, %vc1)
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


# ---- operands, names, sources: what the printer writes reads back as the same module ---------------------------
@pytest.mark.parametrize("node, message", [
    ("linear(%x, %x, residual=%x, residual=%y)", "operand 'residual' given twice"),
    ("linear(%x, %x, %y, bias=%x)", "operand 'bias' given twice"),
    ("linear(%x, %x, %x, %x, %y)", "linear takes at most 4 operands"),
    ("neg(%x, %y)", "neg takes 1 operands"),
    ("constant(%x) {value=1.0, dtype=f32}", "constant takes 0 operands"),
    ("linear(%x, %x, gate=%x)", "linear has no input 'gate' (it takes: x, w, bias, residual)"),
    ("concat(xs=%x) {dim=0}", "concat has no input 'xs'"),
])
def test_operand_lists_that_do_not_name_one_slot_each_are_refused(node, message):
    """A repeated name used to keep the last operand (``residual=%a, residual=%b`` dropped %a); extra operands
    printed as repeated names and read back differently."""
    text = f"graph f(%x: f32[2,2], %y: f32[2,2]) {{\n  %z = {node} : f32[2,2]\n  return %z\n}}\n"
    with pytest.raises(ir.ParseError, match=re.escape(message)) as e:
        ir.parse_module(text)
    assert e.value.line == 2


def test_extra_operands_never_print_as_text_that_reads_back_differently():
    """A node built in code with more operands than its op has slots: the verifier refuses it, and its text does
    not parse (it used to parse, dropping or moving operands)."""
    x = ir.Value("x", parse_type("f32[2,2]"))
    for op, inputs in [(Op.LINEAR, ["x", "x", "x", "x", "x"]), (Op.LINEAR, ["x", "x", None, "x", "x"]),
                       (Op.NEG, ["x", "x"]), (Op.MOE_ROUTE, ["x", "x", None, "x"])]:
        node = ir.Node.make(op, inputs, [ir.Value("y", x.type)])
        m = ir.Module((ir.Graph("f", (x,), (), (node,), ("y",), ()),))
        with pytest.raises(ir.VerifyError, match="operands, got"):
            ir.verify_module(m)
        with pytest.raises(ir.ParseError):
            ir.parse_module(ir.print_module(m))


SOURCE_PATHS = ["model.layers.0.self-attn", "blocks.0 attn", "a,b", " lead", "trail ", "", "two  spaces", 'q"uote',
                "new\nline", "tab\there", "cr\rx", "ünïcødé.ℓ", "#hash", "a, b", "\u2028sep", "back\\slash", "nul\x00"]


@pytest.mark.parametrize("path", SOURCE_PATHS)
def test_any_source_path_round_trips(path):
    """nn.Module names may hold any character but '.': a path that does not read back as itself (a comma, a quote,
    a line break, spaces at its ends) prints as a JSON string."""
    b = GraphBuilder("f")
    x = b.input("x", parse_type("f32[2]"))
    y = b.add(Op.NEG, [x], source=[path, "model.norm"])
    m = ir.Module.of([b.build([y])])
    text = ir.print_module(m)
    assert text.count("\n") == 4  # one line per node
    assert ir.parse_module(text) == m and ir.print_module(ir.parse_module(text)) == text


def test_hand_written_sources_keep_their_reading():
    text = 'graph f(%x: f32[2]) {\n  %y = neg(%x) : f32[2]  # a.b , c-d,, "e,f"  \n  return %y\n}\n'
    assert ir.parse_module(text).graphs[0].nodes[0].source == ("a.b", "c-d", "e,f")
    with pytest.raises(ir.ParseError, match="bad source path string"):
        ir.parse_module(text.replace('"e,f"', '"e,f'))
    with pytest.raises(ir.ParseError, match="expected ',' after a source path string"):
        ir.parse_module(text.replace('"e,f"', '"e" f'))


def test_leaf_with_operands_does_not_print_as_its_short_form():
    """``param "w"`` has no place for operands: a param node given some (refused by the verifier) used to print as
    a plain ``param "w"``, which read back without them. Now it shows them, and the parser refuses the text."""
    t = parse_type("f32[2]")
    node = ir.Node.make(Op.PARAM, ["x"], [ir.Value("w", t)], {"name": "w"})
    m = ir.Module((ir.Graph("f", (ir.Value("x", t),), (), (node,), ("w",), ()),), (("w", t),))
    text = ir.print_module(m)
    assert "%w = param(%x) {name=w}" in text
    with pytest.raises(ir.ParseError, match="param takes 0 operands"):
        ir.parse_module(text)
    # a param without a name attribute prints like any op, and reads back
    _assert_round_trip(dataclasses.replace(m, graphs=(m.graphs[0].with_(
        nodes=(ir.Node.make(Op.PARAM, [], [ir.Value("w", t)]),)),)))


def test_eighteen_factor_shape_is_a_located_parse_error_quickly():
    """430 bytes of IR whose shape expands to 2**18 terms never finished parsing."""
    from .test_shapes import FACTORS_18, within

    text = f"graph f(%x: f32[{FACTORS_18},4]) {{\n  return %x\n}}\n"
    with within(1), pytest.raises(ir.ParseError, match=r"shape expression too large") as e:
        ir.parse_module(text)
    assert e.value.line == 1


# ---- every op row, every operand pattern ----------------------------------------------------------------------
_T = {
    "x": "f32[B,S,4]", "x1": "f32[B,1,4]", "w": "f32[8,4]", "b8": "f32[8]", "r8": "f32[B,S,8]", "v4": "f32[4]",
    "q": "f32[B,S,8]", "pos": "i64[B,S]", "lens": "i32[B]", "cache": "f32[B,1,T,4]", "ids": "i64[B,S]",
    "idx": "i64[B,S,4]", "table": "f32[64,4]", "xt": "f32[B,4,S]", "router": "f32[4,4]", "gate_up": "f32[4,6,4]",
    "down": "f32[4,4,3]", "sg": "f32[5,4]", "sd": "f32[4,5]", "eids": "i32[B,S,2]", "rows": "f32[2*B*S,4]",
    "order": "i32[2*B*S]", "offsets": "i32[5]", "ew": "f32[4,6,4]", "rw": "f32[B,S,2]", "wgm": "f32[10,4]",
    "up": "f32[6,4]", "wd": "f32[4,6]", "v6": "f32[6]", "mask": "bool[B,S,1]", "v2": "f32[2]",
    "tok": "f32[T,4]", "tids": "i64[T,2]", "tw": "f32[T,2]", "gub": "f32[4,6]", "db": "f32[4,4]",
    "cw": "f32[4,3]", "cst": "f32[B,2,4]", "bh": "f32[B,S,2]", "dst": "f32[B,2,2,2]", "q6": "f32[B,S,6]",
    "kpec": "f32[B,1,T,2]",
}
# per op: the example type of each input (by _T key) and attributes that make the result rule accept them
VERIFIED_EXAMPLES = {
    Op.PARAM: ((), {"name": "w"}),
    Op.WEIGHT: ((), {"expr": Concat((Param("w"), Param("w")), 0)}),
    Op.CONSTANT: ((), {"value": [1.0, 2.0], "dtype": DType.F32, "shape": [2]}),
    Op.ARANGE: ((), {"start": 1, "end": parse_type("f32[S+1]").shape[0], "dtype": DType.I64}),
    **{op: (("x", "x"), {}) for op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MINIMUM, Op.MAXIMUM)},
    **{op: (("x",), {}) for op in (Op.NEG, Op.EXP, Op.RSQRT, Op.SILU, Op.SIGMOID, Op.TANH, Op.COS, Op.SIN,
                                        Op.RELU, Op.EXPM1, Op.LOG, Op.FLOOR, Op.ABS)},
    Op.SOFTPLUS: (("x",), {"beta": 2.0, "threshold": 10.0}),
    Op.COMPARE: (("x", "v4"), {"pred": "le"}),
    Op.WHERE: (("mask", "x", "v4"), {}),
    Op.POW: (("x",), {"exponent": 2.0}),
    Op.GELU: (("x",), {"approximate": "tanh"}),
    Op.CAST: (("x",), {"dtype": DType.BF16}),
    Op.MEAN: (("x",), {"dims": [-1], "keepdim": True}),
    Op.SUM: (("x",), {"dims": [0, 2]}),
    Op.SOFTMAX: (("x",), {"dim": -1}),
    Op.ARGMAX: (("x",), {"dim": 1, "keepdim": True}),
    Op.TOPK: (("x",), {"k": 2, "largest": False}),
    Op.SORT: (("x",), {"dim": 1, "descending": True}),
    Op.RESHAPE: (("x",), {"shape": [parse_type("f32[B*S]").shape[0], 4]}),
    Op.TRANSPOSE: (("x",), {"perm": [0, 2, 1]}),
    Op.EXPAND: (("x1",), {"shape": list(parse_type(_T["x"]).shape)}),
    Op.CONCAT: (("x",), {"dim": 2}),  # the variadic input: 0 to 3 operands
    Op.SPLIT: (("x",), {"dim": 2, "sizes": [1, 3]}),
    Op.SLICE: (("x",), {"dim": 2, "start": 1, "end": 3}),
    Op.GATHER: (("x", "idx"), {"dim": 1}),
    Op.SCATTER: (("x", "idx", "x"), {"dim": 1}),
    Op.EMBEDDING: (("table", "ids"), {}),
    Op.LINEAR: (("x", "w", "b8", "r8"), {}),
    Op.MATMUL: (("x", "xt"), {}),
    Op.RMS_NORM: (("x", "v4"), {"eps": 1e-5}),
    Op.ROPE: (("q", "x", "pos"), {"heads": [2, 1], "inv_freq": [1.0, 0.1], "layout": "interleaved"}),
    Op.ATTENTION: (("q", "x", "x", "pos", "lens", "v2"), {"heads": [2, 1], "scale": 0.5, "window": 2,
                                                        "softcap": 30.0}),
    Op.RMS_NORM_LINEAR: (("x", "v4", "w", "b8", "x"), {"eps": 1e-5, "splits": [6, 2]}),
    Op.SWIGLU: (("x", "x"), {"act": "gelu"}),
    Op.ARM_MLP: (("x", "v4", "wgm", "up", "wd", "v6", "v6", "x"), {"eps": 1e-5, "tau": 0.1}),
    Op.MOE: (("x", "router", "v4", "gate_up", "down", "sg", "sg", "sd"), {"top_k": 2}),
    Op.EXPERTS: (("tok", "tids", "tw", "gate_up", "down", "gub", "db"),
                 {"act": "silu", "limit": 7.0, "clamp": "act", "alpha": 1.702, "up_shift": 1.0}),
    Op.MOE_ROUTE: (("x", "router", "v4"), {"top_k": 2, "router": "sigmoid"}),
    Op.MOE_SORT: (("eids",), {"experts": 4}),
    Op.GROUPED_GEMM: (("rows", "ew", "order", "offsets", "rw", "gub"), {"act": "silu", "limit": 7.0}),
    Op.MOE_COMBINE: (("rows", "order", "x"), {"top_k": 2}),
    Op.SHORT_CONV: (("x", "cw", "v4"), {"act": "silu"}),
    Op.DELTA_RULE: (("x", "x", "x", "x", "bh"), {"heads": 2, "scale": 0.5, "l2norm": True}),
    Op.CACHED_SHORT_CONV: (("x", "cw", "v4", "cst", "pos", "lens"), {}),
    Op.CACHED_DELTA_RULE: (("x", "x", "x", "bh", "bh", "dst", "pos", "lens"), {"heads": 2, "scale": 0.5}),
    # MLA: latent 4, rotary 2, 2 heads of nope 1 and values 2 (kv_b's weight [2 * (1 + 2), 4])
    Op.MLA_EXPAND: (("x", "bh", "up"), {"heads": 2, "nope": 1}),
    Op.ALLREDUCE: (("x",), {"world": 2}),
    Op.ALLREDUCE_ADD_RMS_NORM: (("x", "x", "v4"), {"world": 2, "eps": 1e-6}),
    Op.ALLGATHER: (("x",), {"world": 2}),
    Op.MLA_ATTENTION: (("q6", "x", "bh", "up", "pos", "lens"), {"heads": 2, "nope": 1, "scale": 0.5}),
    Op.CACHED_MLA_ATTENTION: (("q6", "cache", "kpec", "up", "pos", "lens"), {"heads": 2, "nope": 1, "scale": 0.5}),
    Op.KV_CACHE_WRITE: (("cache", "x", "pos"), {}),
    Op.CACHED_ATTENTION: (("q", "cache", "cache", "pos", "lens", "v2"), {"scale": 0.5}),
    Op.ROPE_CACHE_WRITE: (("q", "x", "x", "pos", "cache", "cache"), {"heads": [2, 1], "inv_freq": [1.0, 0.1]}),
    Op.ROPE_CACHED_ATTENTION: (("q", "x", "x", "pos", "lens", "cache", "cache", "v4", "v4", "v2"),
                               {"heads": [2, 1], "inv_freq": [1.0], "scale": 0.5, "eps": 1e-6, "window": 3,
                                "softcap": 50.0}),
    Op.RMS_NORM_MOE_ROUTE: (("x", "v4", "router", "v4"), {"eps": 1e-5, "top_k": 2, "router": "sigmoid"}),
    Op.EW_CHAIN: (("x",), {}),  # the body reads each of its operands: made per operand count
}
_TIED = {Op.MOE: [{"shared_gate", "shared_up", "shared_down"}],  # the shared expert: whole or absent
         Op.ROPE_CACHED_ATTENTION: [{"q_norm", "k_norm"}]}


def _chain_body(n: int):
    """An ew_chain body reading operands 0..n-1: silu(%0) + %1 + ..."""
    body = Apply(Op.SILU, (0,))
    for i in range(1, n):
        body = Apply(Op.ADD, (body, i))
    return body


def operand_patterns(op: Op, tied: bool = False) -> list:
    """Every allowed presence pattern of an op's operands, as lists of input slots (None: absent); a variadic
    input takes 0 to 3 operands. With ``tied``, inputs the result rule wants together are present together."""
    specs = OPDEFS[op].inputs
    if OPDEFS[op].variadic:
        return [[0] * n for n in range(4)]
    optional = [i for i, s in enumerate(specs) if s.optional]
    out = []
    for present in itertools.product((False, True), repeat=len(optional)):
        on = {i for i, p in zip(optional, present) if p}
        names = {specs[i].name for i in on}
        if tied and any(names & group and not group <= names for group in _TIED.get(op, ())):
            continue
        out.append([i if not specs[i].optional or i in on else None for i in range(len(specs))])
    return out


def test_examples_cover_the_op_table():
    assert set(VERIFIED_EXAMPLES) == set(OPDEFS) == set(Op)


def _verified_module(op: Op, pattern: list) -> ir.Module:
    keys, attrs = VERIFIED_EXAMPLES[op]
    if op is Op.EW_CHAIN:
        attrs = {"body": _chain_body(len(pattern))}
    b = GraphBuilder("forward")
    inputs, state_outputs = [], []
    for j, slot in enumerate(pattern):
        if slot is None:
            inputs.append(None)
            continue
        t = parse_type(_T[keys[slot]])
        name = f"in{j}.{keys[slot]}"
        is_state = OPDEFS[op].inputs[slot].state
        inputs.append(b.add_state(name, t, owner="model.layers.0.self-attn", kind=OPDEFS[op].state) if is_state
                      else b.input(name, t))
    types = {Op.PARAM: [parse_type("f32[4,4]")], Op.WEIGHT: [parse_type("f32[8,4]")]}.get(op)
    out = b.add(op, inputs, attrs, name=f"{op.value}.out", types=types, source=["model.layers.0", "a,b"])
    outs = list(out) if isinstance(out, tuple) else [out]
    if OPDEFS[op].writes:
        new = set(OPDEFS[op].writes.values())
        state_outputs, outs = [o for i, o in enumerate(outs) if i in new], [o for i, o in enumerate(outs) if i not in new]
    return ir.Module.of([b.build(outs, state_outputs)], {"w": parse_type("f32[4,4]")})


@pytest.mark.parametrize("op", list(OPDEFS), ids=lambda op: op.value)
def test_every_op_and_operand_pattern_verifies_and_round_trips(op):
    """The verified subset: each op from a table of example input types, with every allowed pattern of optional
    operands (and 1 to 3 operands for concat), built with the builder's type inference and verified."""
    for pattern in operand_patterns(op, tied=True):
        if OPDEFS[op].variadic and not pattern:
            continue  # concat needs at least one operand
        m = ir.verify_module(_verified_module(op, pattern))
        text = ir.print_module(m)
        assert ir.parse_module(text) == m, text
        assert ir.print_module(ir.parse_module(text)) == text


# strategies for the unverified round trip: any value name, attribute value of the declared kind, source path
_NAME_CHARS = "abcxyzABCLS0123456789_."
NAMES = st.text(_NAME_CHARS, min_size=1, max_size=8)
SOURCES = st.lists(st.one_of(st.text(max_size=10), st.text("ab.0_- ,\"\n", max_size=10)), max_size=3)
DTYPES = st.sampled_from(list(DType))
FLOATS_ = st.floats(allow_nan=True, allow_infinity=True)
INTS_ = st.integers(-2**40, 2**40)


def _dims():
    from .test_shapes import exprs

    return exprs(depth=2).map(lambda e: e[1])


def _types():
    return st.builds(TensorType, DTYPES, st.lists(_dims(), max_size=3).map(tuple))


def _weight_exprs():
    leaves = st.one_of(st.builds(Param, st.text(max_size=6)),
                       st.builds(Data, st.text(max_size=6), _types(), st.text(max_size=6)))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.builds(lambda args, axis: Concat(tuple(args), axis), st.lists(inner, max_size=3), st.integers(-3, 3)),
        st.builds(Transpose, inner), st.builds(MatMul, inner, inner),
        st.builds(Scale, inner, inner, st.integers(-3, 3)), st.builds(Cast, inner, DTYPES)), max_leaves=5)


ATTR_VALUES = {
    AttrKind.INT: INTS_, AttrKind.FLOAT: FLOATS_, AttrKind.BOOL: st.booleans(), AttrKind.STR: st.text(max_size=8),
    AttrKind.DTYPE: DTYPES, AttrKind.INTS: st.lists(INTS_, max_size=4).map(tuple),
    AttrKind.FLOATS: st.lists(FLOATS_, max_size=4).map(tuple), AttrKind.DIM: _dims(),
    AttrKind.DIMS: st.lists(_dims(), max_size=4).map(tuple),
    AttrKind.NUMBERS: st.one_of(INTS_, FLOATS_, st.lists(st.one_of(INTS_, FLOATS_), max_size=4).map(tuple)),
    AttrKind.EXPR: _weight_exprs(),
}
_EW_OPS = sorted(ir.ELEMENTWISE, key=str)


@st.composite
def _body_step(draw, args):
    op = draw(st.sampled_from(_EW_OPS))
    spec = OPDEFS[op].attrs
    attrs = tuple((k, draw(ATTR_VALUES[s.kind])) for k, s in spec.items() if draw(st.booleans()))
    return Apply(op, tuple(draw(args) for _ in OPDEFS[op].inputs), attrs)


ATTR_VALUES[AttrKind.BODY] = st.recursive(st.integers(0, 3), lambda args: _body_step(args), max_leaves=6).filter(
    lambda b: isinstance(b, Apply))


def test_attribute_strategies_cover_every_kind():
    assert set(ATTR_VALUES) == set(AttrKind)


@st.composite
def unverified_nodes(draw, op: Op | None = None):
    """A node of any op with an allowed operand pattern, any value names, attribute values of the declared kinds
    (any subset), any result count and types, any sources: not a valid graph, but a valid text form."""
    op = op or draw(st.sampled_from(list(OPDEFS)))
    pattern = draw(st.sampled_from(operand_patterns(op)))
    inputs = [None if slot is None else draw(NAMES) for slot in pattern]
    attrs = {name: draw(ATTR_VALUES[spec.kind]) for name, spec in OPDEFS[op].attrs.items() if draw(st.booleans())}
    results = [ir.Value(draw(NAMES), draw(_types())) for _ in range(draw(st.integers(1, 3)))]
    return ir.Node.make(op, inputs, results, attrs, draw(SOURCES))


@st.composite
def unverified_modules(draw):
    nodes = draw(st.lists(unverified_nodes(), min_size=1, max_size=3))
    inputs = [ir.Value(n, draw(_types())) for n in dict.fromkeys(a for node in nodes for a in node.args)]
    state = [StateSpec(draw(NAMES), draw(_types()), draw(st.text(max_size=8))) for _ in range(draw(st.integers(0, 2)))]
    graph = ir.Graph(draw(st.sampled_from(["f", "forward", "decode", "g_1.x"])), tuple(inputs),
                     tuple(state), tuple(nodes), tuple(draw(st.lists(NAMES, max_size=3))),
                     tuple(draw(st.lists(NAMES, max_size=2))))
    return ir.Module((graph,), tuple(draw(st.lists(st.tuples(st.text(max_size=6), _types()), max_size=2))))


def _assert_round_trip(m: ir.Module) -> None:
    text = ir.print_module(m)
    again = ir.parse_module(text)
    assert again == m, text
    assert ir.print_module(again) == text


def test_every_op_and_operand_pattern_round_trips_unverified():
    """Every op, every pattern of present/absent optional operands (0 to 3 for concat), through the text."""
    for op in OPDEFS:
        for pattern in operand_patterns(op):
            names = [None if slot is None else f"v{j}" for j, slot in enumerate(pattern)]
            node = ir.Node.make(op, names, [ir.Value("out", parse_type("f32[2]"))])
            inputs = tuple(ir.Value(n, parse_type("f32[2]")) for n in names if n is not None)
            _assert_round_trip(ir.Module((ir.Graph("f", inputs, (), (node,), ("out",), ()),)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unverified_modules())
def test_random_modules_round_trip(m):
    """Any op, operand pattern, value name, attribute kind and value, source path, state owner, param name: what
    the printer writes parses back to the same module and prints the same text."""
    _assert_round_trip(m)
