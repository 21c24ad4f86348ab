"""The verifier rejects each kind of malformed graph with a message naming the problem."""

from __future__ import annotations

import pytest

import lowerlm.ir as ir

HEAD = """params {
  "w": f32[8,4]
}
graph g(%x: f32[B,S,4], %positions: i64[B,S], %seq_lens: i32[B], %kv: f32[B,1,T,4])
    state(%kc0: f32[B,1,T,4] kv @layer0) {
"""

GOOD_BODY = """\
  %w = param "w" : f32[8,4]
  %y = linear(%x, %w) : f32[B,S,8]
  %kc1 = kv_cache_write(%kc0, %x, %positions) : f32[B,1,T,4]
  %o = cached_attention(%x, %kc1, %kc1, %positions, %seq_lens) {scale=0.5} : f32[B,S,4]
  return %y, %o state(%kc1)
}
"""


def check(body: str):
    return ir.verify_module(ir.parse_module(HEAD + body))


def test_good_graph_verifies():
    check(GOOD_BODY)


@pytest.mark.parametrize("old, new, message", [
    # arity
    ("%y = linear(%x, %w)", "%y = linear(%x)", "operand 'w' is missing"),
    # attributes: unknown, wrong kind, bad choice, missing
    ("{scale=0.5}", "{scale=0.5, colour=1}", "has no attribute 'colour'"),
    ("{scale=0.5}", "{scale=\"big\"}", "attribute 'scale' must be float"),
    ("{scale=0.5}", "", "needs attribute 'scale'"),
    ("{scale=0.5}", "{scale=0.5, window=-1}", "window must be >= 0"),
    # shapes and types
    ("%y = linear(%x, %w) : f32[B,S,8]", "%y = linear(%x, %w) : f32[B,S,9]", "declares f32[B,S,9]"),
    ("%y = linear(%x, %w) : f32[B,S,8]", "%y = linear(%w, %x) : f32[B,S,8]", "linear of f32[8,4]"),
    ("%y = linear(%x, %w) : f32[B,S,8]", "%y = add(%x, %positions) : f32[B,S,4]", "dtypes differ"),
    ("%y = linear(%x, %w) : f32[B,S,8]", "%y = add(%x, %kv) : f32[B,S,4]", "do not broadcast"),
    ("%w = param \"w\" : f32[8,4]", "%w = param \"v\" : f32[8,4]", "param 'v' is not in the weight table"),
    ("%w = param \"w\" : f32[8,4]", "%w = weight transpose(param \"w\") : f32[8,4]", "declares f32[8,4]"),
    # SSA order
    ("%y = linear(%x, %w) : f32[B,S,8]\n", "%y = linear(%x, %w2) : f32[B,S,8]\n  %w2 = param \"w\" : f32[8,4]\n",
     "%w2 is used before it is defined"),
    ("%y = linear(%x, %w) : f32[B,S,8]\n", "%y = linear(%x, %w) : f32[B,S,8]\n  %y = neg(%x) : f32[B,S,4]\n",
     "%y is defined twice"),
    ("return %y, %o", "return %z, %o", "output %z is not defined"),
    # state linearity
    ("return %y, %o state(%kc1)", "return %y, %o", "every state must be returned"),
    ("%o = cached_attention(%x, %kc1, %kc1,", "%o = cached_attention(%x, %kc0, %kc0,", "read after overwritten"),
    ("return %y, %o state(%kc1)",
     "%kc2 = kv_cache_write(%kc0, %x, %positions) : f32[B,1,T,4]\n  return %y, %o state(%kc2)",
     "written twice"),
    ("return %y, %o state(%kc1)",
     "%kc2 = kv_cache_write(%kc1, %x, %positions) : f32[B,1,T,4]\n  return %y, %o state(%kc1)",
     "was overwritten"),
    ("return %y, %o state(%kc1)", "return %y, %o state(%x)", "does not descend from state %kc0"),
    ("return %y, %o state(%kc1)", "return %y, %kc1 state(%kc1)", "returned as a plain output"),
    ("%kc1 = kv_cache_write(%kc0,", "%kc1 = kv_cache_write(%kv,", "not a state version"),
])
def test_malformed_graphs_are_rejected(old, new, message):
    assert old in GOOD_BODY
    with pytest.raises(ir.VerifyError) as e:
        check(GOOD_BODY.replace(old, new, 1))
    assert message in str(e.value)
    assert "graph g" in str(e.value)


def test_state_declared_differently_in_two_graphs():
    text = HEAD + GOOD_BODY + HEAD.split("\n", 3)[3].replace("graph g", "graph h").replace("T,4]", "T,8]") + \
        "  return %x state(%kc0)\n}\n"
    with pytest.raises(ir.VerifyError, match="declared differently"):
        ir.verify_module(ir.parse_module(text))


def test_shape_error_is_a_verify_error():
    with pytest.raises(ir.ShapeError):
        check(GOOD_BODY.replace("f32[B,S,8]", "f32[B,S,9]", 1))


@pytest.mark.parametrize("body, message", [
    ("%s, %t = split(%x) {dim=2, sizes=[1,2]} : f32[B,S,1], f32[B,S,2]", "do not add up to 4"),
    ("%s = reshape(%x) {shape=[B,S,5]} : f32[B,S,5]", "changes the element count"),
    ("%s = transpose(%x) {perm=[0,0,1]} : f32[B,B,S]", "not a permutation"),
    ("%s = slice(%x) {dim=2, end=9} : f32[B,S,9]", "out of range"),
    ("%s, %t = topk(%x) {k=5} : f32[B,S,5], i64[B,S,5]", "does not fit"),
    ("%s = gelu(%x) {approximate=erf} : f32[B,S,4]", "must be one of"),
    ("%s = constant {value=[1.0,2.0], dtype=f32, shape=[3]} : f32[3]", "2 values for shape"),
    ("%s, %t = rope(%x, %x, %positions) {heads=[2,2], inv_freq=[1.0,1.0,1.0]} : f32[B,S,4], f32[B,S,4]",
     "rotary dim"),
    ("%s, %t = rope(%x, %x, %positions) {heads=[3,2], inv_freq=[1.0]} : f32[B,S,4], f32[B,S,4]", "multiple of kv"),
    ("%s = attention(%x, %x, %x, %seq_lens, %seq_lens) {heads=[2,2], scale=1.0} : f32[B,S,4]", "positions must"),
    ("%s = embedding(%x, %x) : f32[B,S,4,4]", "token ids must be an integer"),
])
def test_result_rules_reject_bad_operands(body, message):
    with pytest.raises(ir.VerifyError, match=message):
        check(f"  {body}\n  return %x state(%kc0)\n}}\n")


# ---- operand counts, dimensions, names, empty modules ----------------------------------------------------------
def _graph_of(node: ir.Node, inputs=("x",), name: str = "g") -> ir.Module:
    t = ir.parse_type("f32[B,S,4]")
    return ir.Module((ir.Graph(name, tuple(ir.Value(n, t) for n in inputs), (), (node,), node.result_names, ()),))


@pytest.mark.parametrize("op, inputs, message", [
    (ir.Op.NEG, ["x", "x"], "neg takes 1 operands, got 2"),
    (ir.Op.LINEAR, ["x", "x", None, "x", "x"], "linear takes at most 4 operands, got 5"),
    (ir.Op.MOE_ROUTE, ["x", "x", None, "x"], "moe_route takes at most 3 operands, got 4"),
])
def test_more_operands_than_the_op_has_slots(op, inputs, message):
    """Built in code (the parser refuses such text): an operand past the op's slots has no name in the text."""
    node = ir.Node.make(op, inputs, [ir.Value("y", ir.parse_type("f32[B,S,4]"))])
    with pytest.raises(ir.VerifyError, match=message):
        ir.verify_module(_graph_of(node))


@pytest.mark.parametrize("type_", ["f32[-5]", "f32[B,-1]", "f32[S-S-1]", "f32[-S-1]", "f32[2,-B*S-2]"])
def test_negative_dimensions_are_rejected(type_):
    """A static negative dimension, one that is negative once canonical (S-S-1 is -1), or one negative for every
    value of its symbols (symbols are >= 0): in a graph input, a state, a node's result and the weight table."""
    text = f"graph g(%x: {type_}) {{\n  return %x\n}}\n"
    with pytest.raises(ir.ShapeError, match=r"graph g: at inputs: %x: type .* has a negative dimension"):
        ir.verify_module(ir.parse_module(text))
    with pytest.raises(ir.ShapeError, match=r"at state: %c: .* negative dimension"):
        ir.verify_module(ir.parse_module(f"graph g() state(%c: {type_}) {{\n  return state(%c)\n}}\n"))
    with pytest.raises(ir.ShapeError, match=r"at %c: %c: .* negative dimension"):
        ir.verify_module(ir.parse_module(f"graph g() {{\n  %c = constant {{value=0, dtype=f32, shape=[1]}} : "
                                         f"{type_}\n  return %c\n}}\n"))
    with pytest.raises(ir.ShapeError, match=r"param 'w': .* negative dimension"):
        ir.verify_module(ir.parse_module(f'params {{\n  "w": {type_}\n}}\n' + text.replace(type_, "f32[2]")))


@pytest.mark.parametrize("type_", ["f32[0]", "f32[B,S,0]", "f32[S-1]", "f32[-S]", "f32[S//2-3]"])
def test_zero_and_possibly_non_negative_dimensions_are_allowed(type_):
    """Empty tensors exist in torch, and the importer makes them (``x[..., n:]`` of an n-wide x: a full-width
    rotary part leaves an empty rest); a symbolic dimension that some binding makes non-negative stays."""
    ir.verify_module(ir.parse_module(f"graph g(%x: {type_}) {{\n  return %x\n}}\n"))


def test_an_empty_slice_verifies():
    check("  %e = slice(%x) {dim=2, start=4, end=4} : f32[B,S,0]\n  %c = concat(%x, %e) {dim=2} : f32[B,S,4]\n"
          "  return %c state(%kc0)\n}\n")


@pytest.mark.parametrize("text", ["", "\n", "// nothing here\n", 'params {\n  "w": f32[2]\n}\n'])
def test_a_module_without_graphs_is_rejected(text):
    with pytest.raises(ir.VerifyError, match="module has no graph"):
        ir.verify_module(ir.parse_module(text))


def test_a_graph_without_nodes_is_legal():
    m = ir.verify_module(ir.parse_module("graph forward(%x: f32[B,S,4]) {\n  return %x\n}\n"))
    assert ir.print_module(m) == "graph forward(%x: f32[B,S,4]) {\n  return %x\n}\n"


@pytest.mark.parametrize("name", ["", "a b", "1g", "g(%x: f32[2])", "return-x"])
def test_graph_names_the_text_cannot_hold_are_rejected(name):
    node = ir.Node.make(ir.Op.NEG, ["x"], [ir.Value("y", ir.parse_type("f32[B,S,4]"))])
    with pytest.raises(ir.VerifyError, match="bad graph name"):
        ir.verify_module(_graph_of(node, name=name))


def test_source_paths_must_be_strings():
    node = ir.Node.make(ir.Op.NEG, ["x"], [ir.Value("y", ir.parse_type("f32[B,S,4]"))], source=[3])
    with pytest.raises(ir.VerifyError, match="source paths must be strings"):
        ir.verify_module(_graph_of(node))
