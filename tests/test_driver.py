"""The pass driver: pipeline order, verification after each pass, dumps keyed by pass name, name errors."""

from __future__ import annotations

import io

import pytest

import lowerlm.ir as ir
from lowerlm.ir import Op
from lowerlm.passes import PASSES, PIPELINE, resolve, run_pipeline
from lowerlm.passes.pattern import Pat, rewrite

from .conftest import example_text


def test_pipeline_is_a_visible_list_of_known_passes():
    assert [name for name, _ in PIPELINE][:3] == ["upcast", "canonicalize", "arm"]
    assert all(PASSES[name] is fn for name, fn in PIPELINE if fn is not None)
    assert resolve("default") == [(n, fn) for n, fn in PIPELINE if n not in ("upcast", "arm")]
    assert resolve("none") == []
    with pytest.raises(ir.PassError, match="pass 'arm' needs calibration data"):
        resolve(["arm"])  # arm needs calibration data
    with pytest.raises(ir.PassError, match=r"pass 'upcast' needs the dtype.*dtype=torch.float32"):
        resolve(["upcast"])
    assert resolve("canonicalize") == [("canonicalize", PASSES["canonicalize"])]
    # a model computed in f32 is upcast first, whatever else runs
    assert [n for n, _ in resolve("none", upcast_from=ir.DType.BF16)] == ["upcast"]
    assert [n for n, _ in resolve("default", upcast_from=ir.DType.F16)] == ["upcast"] + [
        n for n, _ in resolve("default")]


def test_unknown_pass_name_is_a_pass_error():
    with pytest.raises(ir.PassError, match="unknown pass 'fuse_everything'.*canonicalize"):
        resolve(["fuse_everything"])


def test_dump_after_named_pass_with_rewrite_count():
    out = io.StringIO()
    records = []
    run_pipeline(ir.parse_module(example_text()), dump={"canonicalize"}, out=out, on_pass=records.append)
    text = out.getvalue()
    assert text.startswith("// after canonicalize (5 rewrites)\n")
    assert "graph forward(" in text
    assert [(r.name, r.rewrites) for r in records] == [
        ("canonicalize", 5), ("raise_moe_route", 0), ("raise_mla", 0), ("fuse_linear_residual", 2),
        ("fuse_rmsnorm_linear", 3), ("fuse_swiglu", 1), ("moe_dispatch", 0), ("insert_state", 1), ("specialize", 2),
        ("select_logits", 1)]


def test_dump_from_environment(monkeypatch, capsys):
    monkeypatch.setenv("LOWERLM_DUMP", "all")
    run_pipeline(ir.parse_module(example_text()))
    assert "// after canonicalize" in capsys.readouterr().err
    monkeypatch.setenv("LOWERLM_DUMP", "other_pass")
    run_pipeline(ir.parse_module(example_text()))
    assert capsys.readouterr().err == ""


def test_a_pass_that_breaks_the_graph_is_caught_and_named():
    def break_types(g: ir.Graph) -> ir.Graph:
        node = g.nodes[1]
        bad = node.with_(results=(ir.Value(node.name, ir.parse_type("f32[B,S,17]")),))
        return g.with_(nodes=(g.nodes[0], bad) + g.nodes[2:])

    with pytest.raises(ir.PassError, match="pass 'break_types' produced an invalid graph.*declares f32"):
        run_pipeline(ir.parse_module(example_text()), passes=[("break_types", break_types)], dump=set())


def test_rewrite_driver_rejects_type_changing_rules_and_counts():
    g = ir.parse_module(example_text()).graphs[0]

    def to_wrong_type(ctx, root):
        return root.args[1]  # the rms_norm weight: f32[16], not f32[B,S,16]

    with pytest.raises(ir.PassError, match="replaced %h"):
        rewrite(g, [(Pat(Op.RMS_NORM, name="root"), to_wrong_type)], name="bad")

    def silu_to_sigmoid_mul(ctx, root):
        x = root.args[0]
        return ctx.add(Op.MUL, [x, ctx.add(Op.SIGMOID, [x], name="sig")])

    out, count = rewrite(g, [(Pat(Op.SILU, (Pat(Op.LINEAR),), name="root"), silu_to_sigmoid_mul)], name="expand")
    ir.verify_graph(out)
    assert count == 1
    assert [n.op for n in out.nodes].count(Op.SILU) == 0
    assert out.producer("act").op is Op.MUL  # the replacement reuses the root's name
