"""The rule engine (passes/pattern.py): predicates, commutative matching, replacing a producer above the root, and
rewrite counts returned by ``rewrite`` and ``Pass`` (no module-level counter)."""

from __future__ import annotations

import pytest

import lowerlm.ir as ir
import lowerlm.passes.pattern as pattern
from lowerlm.ir import Op
from lowerlm.passes import run_pass
from lowerlm.passes.pattern import Pass, Pat, matches, rewrite, single_use


def _graph(body: str, inputs: str = "%x: f32[B,4], %y: f32[B,4]") -> ir.Graph:
    return ir.verify_module(ir.parse_module(f"graph forward({inputs}) {{\n{body}\n}}\n")).graphs[0]


def _ops(g: ir.Graph) -> dict:
    return {n.name: (n.op, n.args) for n in g.nodes}


def _to_swiglu(ctx, root, act, gate, up):
    return ctx.add(Op.SWIGLU, [gate, up], {"act": "silu"})


GATE = Pat(name="gate")
ACT = Pat(Op.SILU, (GATE,), name="act")


# ---- predicates -------------------------------------------------------------------------------------------------
SINGLE_USE_EXP = """\
  %e1 = exp(%x) : f32[B,4]
  %s1 = silu(%e1) : f32[B,4]
  %e2 = exp(%y) : f32[B,4]
  %s2 = silu(%e2) : f32[B,4]
  %n2 = neg(%e2) : f32[B,4]
  return %s1, %s2, %n2"""


def _silu_of_exp_to_sigmoid(ctx, root, e):
    return ctx.add(Op.MUL, [e.name, ctx.add(Op.SIGMOID, [e.name], name="sig")])


def test_a_node_predicate_must_hold():
    """``where`` on a node: silu(exp(v)) is rewritten only where the exp has one reader."""
    g = _graph(SINGLE_USE_EXP)
    rule = (Pat(Op.SILU, (Pat(Op.EXP, name="e", where=single_use),), name="root"), _silu_of_exp_to_sigmoid)
    out, count = rewrite(g, [rule])
    ir.verify_graph(out)
    assert count == 1
    assert out.producer("s1").op is Op.MUL  # %e1 has one reader: fires
    assert out.producer("s2").op is Op.SILU  # %e2 is read by the neg too: must not fire


def test_a_value_predicate_must_hold():
    """``where`` on a value (a pattern without op) gets the value name: a type condition."""
    g = _graph("  %a = silu(%x) : f32[B,4]\n  %p = mul(%a, %y) : f32[B,4]\n  %b = silu(%x) : f32[B,4]\n"
               "  %q = mul(%b, %z) : f32[B,4]\n  return %p, %q", "%x: f32[B,4], %y: f32[B,4], %z: f32[4]")
    same_type = Pat(name="up", where=lambda ctx, v: ctx.type_of(v) == ctx.type_of("x"))
    out, count = rewrite(g, [(Pat(Op.MUL, (ACT, same_type), name="root"), _to_swiglu)])
    assert count == 1
    assert _ops(out)["p"] == (Op.SWIGLU, ("x", "y"))
    assert _ops(out)["q"] == (Op.MUL, ("b", "z"))  # %z broadcasts: must not fire


def test_a_root_predicate_decides_which_roots_fire():
    seen = []

    def root_ok(ctx, node):
        seen.append(node.name)
        return node.name == "q"

    g = _graph("  %a = silu(%x) : f32[B,4]\n  %p = mul(%a, %y) : f32[B,4]\n  %q = mul(%a, %y) : f32[B,4]\n"
               "  return %p, %q")
    out, count = rewrite(g, [(Pat(Op.MUL, (ACT, Pat(name="up")), name="root", where=root_ok), _to_swiglu)])
    assert count == 1 and seen[:2] == ["p", "q"]
    assert out.producer("p").op is Op.MUL and out.producer("q").op is Op.SWIGLU


# ---- commutative matching -----------------------------------------------------------------------------------------
BOTH_ORDERS = """\
  %a = silu(%x) : f32[B,4]
  %p = mul(%a, %y) : f32[B,4]
  %b = silu(%y) : f32[B,4]
  %q = mul(%x, %b) : f32[B,4]
  return %p, %q"""


def test_commutative_matches_both_orders():
    g = _graph(BOTH_ORDERS)
    out, count = rewrite(g, [(Pat(Op.MUL, (ACT, Pat(name="up")), commutative=True, name="root"), _to_swiglu)])
    ir.verify_graph(out)
    assert count == 2
    assert _ops(out)["p"] == (Op.SWIGLU, ("x", "y")) and _ops(out)["q"] == (Op.SWIGLU, ("y", "x"))
    # without it, only the order written matches
    out, count = rewrite(g, [(Pat(Op.MUL, (ACT, Pat(name="up")), name="root"), _to_swiglu)])
    assert count == 1 and _ops(out)["q"] == (Op.MUL, ("x", "b"))


def test_captures_of_a_failed_order_do_not_leak():
    """The first order captures act=%a and gate=%x, then fails on ``up``; the rule sees the second order's
    captures only."""
    g = _graph("  %a = silu(%x) : f32[B,4]\n  %b = silu(%y) : f32[B,4]\n  %p = mul(%a, %b) : f32[B,4]\n  return %p")
    calls = []

    def record(ctx, root, act, gate, up):
        calls.append((act.name, gate, up))
        return _to_swiglu(ctx, root, act, gate, up)

    up = Pat(name="up", where=lambda ctx, v: v != "b")
    out, count = rewrite(g, [(Pat(Op.MUL, (ACT, up), commutative=True, name="root"), record)])
    assert count == 1 and calls == [("b", "y", "a")]
    assert _ops(out)["p"] == (Op.SWIGLU, ("y", "a"))


def test_the_rule_function_sees_each_order_until_it_fires():
    g = _graph("  %p = mul(%x, %y) : f32[B,4]\n  return %p")
    calls = []

    def second_order_only(ctx, root, left, right):
        calls.append((left, right))
        return ctx.add(Op.SUB, [left, right]) if left == "y" else None

    out, count = rewrite(g, [(Pat(Op.MUL, (Pat(name="left"), Pat(name="right")), commutative=True, name="root"),
                              second_order_only)])
    assert calls == [("x", "y"), ("y", "x")] and count == 1
    assert _ops(out)["p"] == (Op.SUB, ("y", "x"))


def test_commutative_needs_two_input_patterns():
    with pytest.raises(ValueError, match="two input patterns"):
        Pat(Op.SILU, (GATE,), commutative=True)


def test_matches_finds_the_captures_on_a_finished_graph():
    g = _graph(BOTH_ORDERS)
    pat = Pat(Op.MUL, (ACT, Pat(name="up")), commutative=True, name="root")
    found = [(c["act"].name, c["gate"], c["up"]) for n in g.nodes for c in matches(g, pat, n)]
    assert found == [("a", "x", "y"), ("b", "y", "x")]


# ---- replacing a producer above the root ---------------------------------------------------------------------------
PRODUCER = """\
  %n, %m = split(%x) {dim=-1, sizes=[2,2]} : f32[B,2], f32[B,2]
  %a = silu(%n) : f32[B,2]
  %p = mul(%a, %m) : f32[B,2]
  %e = exp(%x) : f32[B,4]
  return %p, %e"""


def _fold_split(ctx, root, act, parts):
    if not ctx.replace(parts, act):
        return None
    x = parts.args[0]
    gate, up = ctx.add(Op.SPLIT, [x], parts.attrs, names=["n2", "m2"])
    return ctx.add(Op.SWIGLU, [gate, up], {"act": "silu"})


FOLD = (Pat(Op.MUL, (Pat(Op.SILU, (Pat(Op.SPLIT, name="parts"),), name="act"), Pat()), name="root"), _fold_split)


def test_a_rule_replaces_a_producer_above_the_root():
    out, count = rewrite(_graph(PRODUCER), [FOLD])
    ir.verify_graph(out)
    assert count == 1
    assert [(n.op, n.result_names) for n in out.nodes] == [
        (Op.SPLIT, ("n2", "m2")), (Op.SWIGLU, ("p",)), (Op.EXP, ("e",))]


BETWEEN = """\
  %n, %m = split(%x) {dim=-1, sizes=[2,2]} : f32[B,2], f32[B,2]
  %a = silu(%n) : f32[B,2]
  %k = neg(%m) : f32[B,2]
  %p = mul(%a, %m) : f32[B,2]
  return %p, %k"""


def test_replacing_a_producer_is_refused_when_a_node_between_reads_it():
    """%k reads %m between the split and the product: the split cannot move down to the product."""
    out, count = rewrite(_graph(BETWEEN), [FOLD])
    assert count == 0 and out.producer("p").op is Op.MUL


def test_a_replaced_result_still_read_after_the_root_is_an_error():
    g = _graph(PRODUCER.replace("%e = exp(%x) : f32[B,4]", "%e = exp(%m) : f32[B,2]"))
    with pytest.raises(ir.PassError, match="dropped %m, which is still read"):
        rewrite(g, [FOLD], name="fold")


def test_a_redefined_result_keeps_its_type():
    def wrong(ctx, root, act, parts):
        assert ctx.replace(parts, act)
        ctx.add(Op.EXP, [parts.args[0]], name="n")  # %n was f32[B,2]
        gate, up = ctx.add(Op.SPLIT, [parts.args[0]], parts.attrs, names=["g", "u"])
        return ctx.add(Op.SWIGLU, [gate, up], {"act": "silu"})

    with pytest.raises(ir.PassError, match=r"replaced %n: f32\[B,2\] by %n: f32\[B,4\]"):
        rewrite(_graph(PRODUCER), [(FOLD[0], wrong)], name="bad")


def test_an_emitted_node_must_not_read_a_replaced_result():
    def reads_gone(ctx, root, act, parts):
        assert ctx.replace(parts, act)
        return ctx.add(Op.SWIGLU, [parts.result_names[0], parts.result_names[1]], {"act": "silu"})

    with pytest.raises(ir.PassError, match="dropped %m, which is still read"):
        rewrite(_graph(PRODUCER), [(FOLD[0], reads_gone)], name="bad")


def test_a_rule_must_not_fire_when_replace_refused():
    def stubborn(ctx, root, act, parts):
        ctx.replace(parts)  # %a, between, reads %n: refused
        return ctx.add(Op.SWIGLU, [parts.result_names[0], parts.result_names[1]], {"act": "silu"})

    with pytest.raises(ir.PassError, match="fired although ctx.replace refused"):
        rewrite(_graph(PRODUCER), [(FOLD[0], stubborn)], name="bad")


# ---- rewrite counts ----------------------------------------------------------------------------------------------
def test_no_module_level_counter_remains():
    assert not any(hasattr(pattern, n) for n in ("_counter", "record_rewrites", "take_rewrite_count"))


def test_interleaved_rewrites_count_independently():
    """A rule that runs a rewrite of another graph inside it: each rewrite returns its own count."""
    inner_graph = _graph(BOTH_ORDERS)
    inner_rules = [(Pat(Op.MUL, (ACT, Pat(name="up")), commutative=True, name="root"), _to_swiglu)]
    inner_counts = []

    def outer_fn(ctx, root, e):
        inner_counts.append(rewrite(inner_graph, inner_rules)[1])
        return _silu_of_exp_to_sigmoid(ctx, root, e)

    outer = [(Pat(Op.SILU, (Pat(Op.EXP, name="e"),), name="root"), outer_fn)]
    out, count = rewrite(_graph(SINGLE_USE_EXP), outer)
    assert count == 2 and inner_counts == [2, 2]
    # the same Pass on two graphs, one after the other, counts each on its own
    p = Pass(lambda g: rewrite(g, inner_rules))
    assert p.apply(inner_graph)[1] == 2 and p.apply(out)[1] == 0 and p.apply(inner_graph)[1] == 2


def test_run_pass_sums_a_pass_counts_and_counts_a_plain_function_zero():
    module = ir.verify_module(ir.parse_module(
        "graph prefill(%x: f32[B,4]) {\n  %a = exp(%x) : f32[B,4]\n  return %a\n}\n\n"
        "graph decode(%x: f32[B,4]) {\n  %a = exp(%x) : f32[B,4]\n  return %a\n}\n"))

    @Pass
    def three_per_graph(g: ir.Graph) -> tuple:
        """Three rewrites per graph."""
        return g, 3

    assert three_per_graph.__doc__ == "Three rewrites per graph." and three_per_graph.__name__ == "three_per_graph"
    assert three_per_graph(module.graphs[0]) is module.graphs[0]  # calling a Pass gives the graph only
    assert run_pass("three", three_per_graph, module).rewrites == 6
    assert run_pass("plain", lambda g: g, module).rewrites == 0
