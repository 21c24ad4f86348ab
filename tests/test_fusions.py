"""Fusion passes: golden IR before → after (tests/golden/passes; each BEFORE holds cases where the pass must not
fire), rewrite counts, differential runs on the reference backend, and the fused tiny Llama layer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowerlm.ir as ir
from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.ir import Op
from lowerlm.passes import PASSES, run_pass

from .conftest import ROOT, example_text, random_weights, token_inputs

GOLDEN = ROOT / "tests" / "golden" / "passes"
CASES = [("raise_moe_route", 4), ("fuse_linear_residual", 1), ("fuse_rmsnorm_linear", 2), ("fuse_swiglu", 3),
         ("moe_dispatch", 3)]


def _random_inputs(g: ir.Graph, b=2, s=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    env = {"B": b, "S": s}
    return {v.name: torch.randn([ir.evaluate(d, env) for d in v.type.shape], generator=gen) for v in g.inputs}


def _golden(name):
    before = ir.verify_module(ir.parse_module((GOLDEN / f"{name}.before.ir").read_text()))
    return before, run_pass(name, PASSES[name], before)


@pytest.mark.parametrize("name, rewrites", CASES)
def test_golden_and_differential(name, rewrites):
    before, record = _golden(name)
    assert ir.print_module(record.module) == (GOLDEN / f"{name}.after.ir").read_text()
    assert record.rewrites == rewrites
    # a second run finds nothing left to fuse
    again = run_pass(name, PASSES[name], record.module)
    assert again.rewrites == 0 and ir.print_module(again.module) == ir.print_module(record.module)


@pytest.mark.parametrize("name", [name for name, _ in CASES])
@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_differential_over_shapes(name, batch, seed, seq):
    """The reference backend gives the same results before and after the pass, on any batch and sequence length
    and random weights and inputs."""
    before, record = _golden(name)
    weights = random_weights(before, seed=seed)
    inputs = _random_inputs(before.graphs[0], batch, seq, seed)
    want = ReferenceProgram(before, weights).run("forward", inputs)[0]
    got = ReferenceProgram(record.module, weights).run("forward", inputs)[0]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tiny_llama_layer_becomes_five_ops_plus_rope_and_cache_writes():
    m = ir.parse_module(example_text())
    m = run_pass("canonicalize", PASSES["canonicalize"], m).module
    for name in ("fuse_linear_residual", "fuse_rmsnorm_linear", "fuse_swiglu"):
        before = ir.print_module(m)
        m = run_pass(name, PASSES[name], m).module
        assert ir.print_module(m) != before, f"{name} did not fire on the tiny Llama layer"
    assert ir.print_module(m) == (GOLDEN / "tiny_llama_fused.ir").read_text()
    for name in ("insert_state", "specialize"):
        m = run_pass(name, PASSES[name], m).module
    decode = m.graph("decode")
    compute = [n.op for n in decode.nodes if n.op not in (Op.PARAM, Op.WEIGHT)]
    assert compute == [Op.EMBEDDING, Op.RMS_NORM_LINEAR, Op.ROPE, Op.KV_CACHE_WRITE, Op.KV_CACHE_WRITE,
                       Op.CACHED_ATTENTION, Op.LINEAR, Op.RMS_NORM_LINEAR, Op.LINEAR, Op.RMS_NORM_LINEAR]
    gate_up = [n for n in decode.nodes if n.op is Op.RMS_NORM_LINEAR][1]
    assert gate_up.attr("act") == "silu" and gate_up.source == (
        "model.layers.0.post_attention_layernorm", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.act_fn", "model.layers.0.mlp")


def test_fused_example_matches_unfused_on_the_reference_backend():
    plain = ir.parse_module(example_text())
    fused = plain
    for name in ("canonicalize", "fuse_linear_residual", "fuse_rmsnorm_linear", "fuse_swiglu"):
        fused = run_pass(name, PASSES[name], fused).module
    weights = random_weights(plain, seed=4)
    inputs = token_inputs(2, 7, 64, seed=4, lens=[7, 4])
    want = ReferenceProgram(plain, weights).run("forward", inputs)[0][0]
    got = ReferenceProgram(fused, weights).run("forward", inputs)[0][0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


SWIGLU_RESIDUAL = """\
params {
  "ln": f32[4]
  "wgu": f32[12,4]
}

graph forward(%x: f32[B,S,4], %r: f32[B,S,4]) {
  %ln = param "ln" : f32[4]
  %wgu = param "wgu" : f32[12,4]
  %g, %u, %s.r = rms_norm_linear(%x, %ln, %wgu, residual=%r) {eps=1e-06, splits=[6,6]} : f32[B,S,6], f32[B,S,6], \
f32[B,S,4]  # m.norm
  %a = silu(%g) : f32[B,S,6]  # m.act_fn
  %e = exp(%s.r) : f32[B,S,4]
  %y = mul(%a, %u) : f32[B,S,6]  # m
  return %y, %e
}
"""


@pytest.mark.parametrize("between", [False, True])
def test_swiglu_epilogue_keeps_the_residual_sum_unless_it_is_read_before_the_product(between):
    """The epilogue rule moves the rms_norm_linear down to the product (keeping %s.r); when a node between the two
    reads %s.r it cannot, and the product becomes a standalone swiglu."""
    text = SWIGLU_RESIDUAL if between else SWIGLU_RESIDUAL.replace(
        "  %e = exp(%s.r) : f32[B,S,4]\n", "").replace("  return", "  %e = exp(%s.r) : f32[B,S,4]\n  return")
    before = ir.verify_module(ir.parse_module(text))
    record = run_pass("fuse_swiglu", PASSES["fuse_swiglu"], before)
    lines = ir.print_module(record.module).splitlines()
    if between:
        assert "  %y = swiglu(%g, %u) : f32[B,S,6]  # m.act_fn, m" in lines
    else:
        assert ("  %y, %s.r = rms_norm_linear(%x, %ln, %wgu, residual=%r) {eps=1e-06, splits=[6,6], act=silu} : "
                "f32[B,S,6], f32[B,S,4]  # m.norm, m.act_fn, m") in lines
    assert record.rewrites == 1
    weights = random_weights(before, seed=1)
    inputs = _random_inputs(before.graphs[0])
    want = ReferenceProgram(before, weights).run("forward", inputs)[0]
    got = ReferenceProgram(record.module, weights).run("forward", inputs)[0]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
