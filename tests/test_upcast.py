"""upcast: golden IR before → after, cases where it must not fire, and differential runs on the reference backend
(a bf16 model computed in f32 against the same model converted with ``model.float()``)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import lowerlm
import lowerlm.ir as ir
from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.errors import CompileError
from lowerlm.passes import run_pass, run_pipeline
from lowerlm.passes.upcast import upcast

from .conftest import tiny_model

BEFORE = """\
params {
  "w": bf16[8,4]
  "v": bf16[8,4]
  "n": f32[4]
}

graph forward(%x: bf16[B,S,4], %positions: i64[B,S])
    state(%kc0: bf16[B,1,T,4] kv @layer0) {
  %w = param "w" : bf16[8,4]
  %wv = weight concat[0](param "w", param "v") : bf16[16,4]
  %n = param "n" : f32[4]
  %x32 = cast(%x) {dtype=f32} : f32[B,S,4]
  %xn = mul(%x32, %n) : f32[B,S,4]
  %xb = cast(%xn) {dtype=bf16} : bf16[B,S,4]
  %half = constant {value=0.5, dtype=bf16} : bf16[]
  %h = mul(%xb, %half) : bf16[B,S,4]
  %a = linear(%h, %w) : bf16[B,S,8]
  %b = linear(%h, %wv) : bf16[B,S,16]
  %kc1 = kv_cache_write(%kc0, %x, %positions) : bf16[B,1,T,4]
  return %a, %b state(%kc1)
}
"""

AFTER = """\
params {
  "w": bf16[8,4]
  "v": bf16[8,4]
  "n": f32[4]
}

graph forward(%x: f32[B,S,4], %positions: i64[B,S])
    state(%kc0: f32[B,1,T,4] kv @layer0) {
  %w = weight cast[f32](param "w") : f32[8,4]
  %wv = weight cast[f32](concat[0](param "w", param "v")) : f32[16,4]
  %n = param "n" : f32[4]
  %x32 = cast(%x) {dtype=f32} : f32[B,S,4]
  %xn = mul(%x32, %n) : f32[B,S,4]
  %xb = cast(%xn) {dtype=f32} : f32[B,S,4]
  %half = constant {value=0.5, dtype=f32} : f32[]
  %h = mul(%xb, %half) : f32[B,S,4]
  %a = linear(%h, %w) : f32[B,S,8]
  %b = linear(%h, %wv) : f32[B,S,16]
  %kc1 = kv_cache_write(%kc0, %x, %positions) : f32[B,1,T,4]
  return %a, %b state(%kc1)
}
"""


def test_golden_before_after_and_rewrite_count():
    """Values, state, params, weight expressions, casts and constants of bf16 become f32; the weight table keeps
    bf16 (the program converts at load); f32 and integer values are left as they are."""
    record = run_pass("upcast", upcast(ir.DType.BF16), ir.verify_module(ir.parse_module(BEFORE)))
    assert ir.print_module(record.module) == AFTER
    assert record.rewrites == 8  # every node but %n, %x32 and %xn (already f32)
    # the casts that became no-ops are canonicalize's to drop
    canonical = run_pipeline(record.module, passes=["canonicalize"], dump=set())
    assert [n.op for n in canonical.graphs[0].nodes].count(ir.Op.CAST) == 0


def test_must_not_fire_without_the_narrow_dtype():
    """An f32 graph, and a bf16 graph asked to upcast f16: nothing changes. Only upcasts to f32 exist."""
    after = ir.parse_module(AFTER)
    record = run_pass("upcast", upcast(ir.DType.BF16), after)
    assert record.rewrites == 0 and ir.print_module(record.module) == AFTER
    before = ir.parse_module(BEFORE)
    record = run_pass("upcast", upcast(ir.DType.F16), before)
    assert record.rewrites == 0 and ir.print_module(record.module) == BEFORE
    for src, dst in ((ir.DType.F32, ir.DType.F32), (ir.DType.BF16, ir.DType.F16), (ir.DType.I64, ir.DType.F32)):
        with pytest.raises(ir.PassError, match="upcast goes from bf16 or f16 to f32"):
            upcast(src, dst)


def test_differential_on_the_reference_backend():
    """The golden pair on the reference backend: the upcast graph equals the same graph written in f32 (f32
    weights in the table), exactly, and is the bf16 graph's function: within bf16 rounding of its results."""
    g = torch.Generator().manual_seed(0)
    w = {"w": torch.randn(8, 4, generator=g).bfloat16(), "v": torch.randn(8, 4, generator=g).bfloat16(),
         "n": torch.randn(4, generator=g)}
    x = torch.randn(2, 3, 4, generator=g).bfloat16()
    positions = torch.tensor([[0, 1, 2], [4, 5, 6]])
    kc0 = torch.randn(2, 1, 8, 4, generator=g).bfloat16()
    got, got_state = ReferenceProgram(ir.parse_module(AFTER), w).run(
        "forward", {"x": x.float(), "positions": positions}, {"kc0": kc0.float()})
    f32_text = re.sub(r"weight cast\[f32\]\((.*)\)( : f32)", r"weight \1\2", AFTER).replace("bf16", "f32")
    want, want_state = ReferenceProgram(ir.parse_module(f32_text), {k: v.float() for k, v in w.items()}).run(
        "forward", {"x": x.float(), "positions": positions}, {"kc0": kc0.float()})
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(got_state["kc0"], want_state["kc0"])
    bf16, bf16_state = ReferenceProgram(ir.parse_module(BEFORE), w).run(
        "forward", {"x": x, "positions": positions}, {"kc0": kc0})
    for a, b in zip(got, bf16):
        assert b.dtype == torch.bfloat16
        assert (a - b.float()).abs().max() <= 2 * 2**-8 * b.float().abs().max()  # two bf16 ulps of the largest
    assert torch.equal(got_state["kc0"], bf16_state["kc0"].float())  # the written rows are bf16 values


def _without_weight_casts(module: ir.Module) -> str:
    text = ir.print_module(module)
    text = re.sub(r'cast\[f32\]\(param ("[^"]*")\)', r"param \1", text).replace("weight param ", "param ")
    return text.split("graph ", 1)[1]  # the graphs; the weight table keeps the model's dtype


def test_a_bf16_model_computed_in_f32_is_the_f32_models_program():
    """Through the whole default pipeline, tiny Llama in bf16 computed in f32 gives the IR tiny Llama converted with
    ``model.float()`` gives, but for its weights' load-time casts, and the same logits on the reference backend."""
    model = tiny_model("llama").to(torch.bfloat16)
    upcast_cm = lowerlm.compile_model(model, backend="reference", dtype=torch.float32, use_cache=False)
    f32_model = copy.deepcopy(model).float()
    f32_cm = lowerlm.compile_model(f32_model, backend="reference", use_cache=False)
    assert [r.name for r in upcast_cm.records][0] == "upcast"
    assert _without_weight_casts(upcast_cm.ir) == _without_weight_casts(f32_cm.ir)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    got = upcast_cm(ids)
    assert got.dtype == torch.float32  # asked for f32: f32 logits
    assert torch.equal(got, f32_cm(ids))
    with torch.no_grad():
        torch.testing.assert_close(got, f32_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_dtypes_compile_model_refuses():
    """Only the model's own dtype, or f32 for a bf16/f16 model: a downcast would lose the f32 the model keeps on
    purpose, so the user converts the model instead."""
    model = tiny_model("llama")
    with pytest.raises(CompileError, match=r"convert the model first \(model.to\(torch.bfloat16\)\)"):
        lowerlm.compile_model(model, dtype=torch.bfloat16, backend="reference", use_cache=False)
    with pytest.raises(CompileError, match="in float32"):
        lowerlm.compile_model(model.half(), dtype=torch.bfloat16, backend="reference", use_cache=False)
