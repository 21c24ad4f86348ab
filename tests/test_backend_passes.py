"""The backend tails (passes/backend.py): golden IR before -> after, cases where each must not fire, and the
reference backend computing the same before and after (each fused op is the composition it replaces)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lowerlm.ir as ir
from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.passes import TAILS, run_pipeline
from lowerlm.passes.backend import (
    fuse_decode_attention,
    fuse_ew_chains,
    fuse_gqa_attention,
    fuse_rope_cache_write,
    fuse_route_norm,
)

from .conftest import example_text


def _attention_ir(s="1", window=0, layout="half", norms=False, d=16, returned_q=False) -> str:
    """One attention layer's cache chain: 2 query heads, 1 kv head of size d, S = s."""
    q, k = "%q", "%k"
    lines = []
    if norms:
        lines += [
            f"  %q4 = reshape(%q) {{shape=[B,{s},2,{d}]}} : f32[B,{s},2,{d}]",
            "  %qn = param \"qn\" : f32[" + str(d) + "]",
            f"  %q4n = rms_norm(%q4, %qn) {{eps=1e-06}} : f32[B,{s},2,{d}]",
            f"  %qh = reshape(%q4n) {{shape=[B,{s},{2 * d}]}} : f32[B,{s},{2 * d}]",
            f"  %k4 = reshape(%k) {{shape=[B,{s},1,{d}]}} : f32[B,{s},1,{d}]",
            "  %kn = param \"kn\" : f32[" + str(d) + "]",
            f"  %k4n = rms_norm(%k4, %kn) {{eps=1e-06}} : f32[B,{s},1,{d}]",
            f"  %kh = reshape(%k4n) {{shape=[B,{s},{d}]}} : f32[B,{s},{d}]",
        ]
        q, k = "%qh", "%kh"
    freqs = ",".join(repr(10.0 ** -i) for i in range(d // 2))
    lines += [
        f"  %qr, %kr = rope({q}, {k}, %positions) {{heads=[2,1], inv_freq=[{freqs}], layout={layout}}} : "
        f"f32[B,{s},{2 * d}], f32[B,{s},{d}]  # layers.0.attn",
        f"  %kc1 = kv_cache_write(%kc, %kr, %positions) : f32[B,1,T,{d}]  # layers.0.attn",
        f"  %vc1 = kv_cache_write(%vc, %v, %positions) : f32[B,1,T,{d}]  # layers.0.attn",
        f"  %o = cached_attention(%qr, %kc1, %vc1, %positions, %seq_lens) {{scale=0.25, window={window}}} : "
        f"f32[B,{s},{2 * d}]  # layers.0.attn",
    ]
    params = f'params {{\n  "qn": f32[{d}]\n  "kn": f32[{d}]\n}}\n\n' if norms else ""
    outs = "%o, %qr" if returned_q else "%o"
    return (f"{params}graph decode(%q: f32[B,{s},{2 * d}], %k: f32[B,{s},{d}], %v: f32[B,{s},{d}], "
            f"%positions: i64[B,{s}], %seq_lens: i32[B])\n"
            f"    state(%kc: f32[B,1,T,{d}] kv @layers.0.attn, %vc: f32[B,1,T,{d}] kv @layers.0.attn) {{\n"
            + "\n".join(lines) + f"\n  return {outs} state(%kc1, %vc1)\n}}\n")


def _body(m: ir.Module) -> list:
    return [line.strip() for line in ir.print_module(m).splitlines() if " = " in line]


def _apply(fn, text: str):
    m = ir.verify_module(ir.parse_module(text))
    g, count = fn.apply(m.graphs[0])
    return m, ir.verify_module(dataclasses.replace(m, graphs=(g,))), count


def _same_results(before: ir.Module, after: ir.Module, s: int, symbols=None) -> None:
    """The reference backend gives identical outputs and state on both modules."""
    torch.manual_seed(0)
    g = before.graphs[0]
    env = {"B": 2, "S": s, "T": 8, **(symbols or {})}
    inputs = {}
    for v in g.inputs:
        shape = [ir.evaluate(d, env) for d in v.type.shape]
        if v.name == "positions":
            inputs[v.name] = torch.arange(3, 3 + s).repeat(2, 1)
        elif v.name == "seq_lens":
            inputs[v.name] = torch.full((2,), 3 + s, dtype=torch.int32)
        elif v.type.dtype.is_float:
            inputs[v.name] = torch.randn(shape, dtype=v.type.dtype.to_torch())
        else:
            inputs[v.name] = torch.randint(-5, 5, shape, dtype=v.type.dtype.to_torch())
    state = {st.name: torch.randn([ir.evaluate(d, env) for d in st.type.shape]) for st in g.state}
    weights = {name: torch.rand([int(d) for d in t.shape]) + 0.5 for name, t in before.params}
    out = [ReferenceProgram(m, weights).run(m.graphs[0].name, inputs, state) for m in (before, after)]
    for a, b in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in out[0][1]:
        torch.testing.assert_close(out[0][1][name], out[1][1][name], rtol=0, atol=0)


# ---- fuse_decode_attention ----------------------------------------------------------------------------------------
def test_decode_attention_golden_and_same_results():
    before, after, count = _apply(fuse_decode_attention, _attention_ir())
    assert count == 1
    assert _body(after) == [
        "%o, %kc1, %vc1 = rope_cached_attention(%q, %k, %v, %positions, %seq_lens, %kc, %vc) "
        "{heads=[2,1], inv_freq=[1.0,0.1,0.01,0.001,0.0001,1e-05,1e-06,1e-07], scale=0.25} "
        ": f32[B,1,32], f32[B,1,T,16], f32[B,1,T,16]  # layers.0.attn",
    ]
    _same_results(before, after, 1)


def test_decode_attention_folds_per_head_norms():
    before, after, count = _apply(fuse_decode_attention, _attention_ir(norms=True))
    assert count == 1
    ops = [line.split(" = ")[1].split("(")[0].split(" ")[0] for line in _body(after)]
    assert ops == ["param", "param", "rope_cached_attention"]
    fused = _body(after)[-1]
    assert "rope_cached_attention(%q, %k, %v, %positions, %seq_lens, %kc, %vc, q_norm=%qn, k_norm=%kn)" in fused
    assert "eps=1e-06" in fused
    _same_results(before, after, 1)


@pytest.mark.parametrize("case", ["prefill", "q returned"])
def test_decode_attention_must_not_fire(case):
    text = _attention_ir(s="S") if case == "prefill" else _attention_ir(returned_q=True)
    before, after, count = _apply(fuse_decode_attention, text)
    assert count == 0 and after == before


# ---- fuse_gqa_attention -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", ["1", "S"])
def test_gqa_attention_fires_in_prefill_and_decode_without_norms(s):
    before, after, count = _apply(fuse_gqa_attention, _attention_ir(s=s))
    assert count == 1
    assert [line.split(" = ")[1].split("(")[0] for line in _body(after)] == ["rope_cached_attention"]
    _same_results(before, after, 3 if s == "S" else 1)
    before, after, count = _apply(fuse_gqa_attention, _attention_ir(s=s, norms=True))
    assert count == 1 and "q_norm" not in _body(after)[-1]  # the norms stay ops of their own
    assert sum(line.split(" = ")[1].startswith("rms_norm") for line in _body(after)) == 2


@pytest.mark.parametrize("kind", ["window", "interleaved", "head size 8"])
def test_gqa_attention_must_not_fire(kind):
    text = {"window": _attention_ir(window=4), "interleaved": _attention_ir(layout="interleaved"),
            "head size 8": _attention_ir(d=8)}[kind]
    before, after, count = _apply(fuse_gqa_attention, text)
    assert count == 0 and after == before


# ---- fuse_rope_cache_write ----------------------------------------------------------------------------------------
def test_rope_cache_write_golden_and_same_results():
    before, after, count = _apply(fuse_rope_cache_write, _attention_ir(s="S"))
    assert count == 1
    assert _body(after) == [
        "%qr, %kc1, %vc1 = rope_cache_write(%q, %k, %v, %positions, %kc, %vc) "
        "{heads=[2,1], inv_freq=[1.0,0.1,0.01,0.001,0.0001,1e-05,1e-06,1e-07]} "
        ": f32[B,S,32], f32[B,1,T,16], f32[B,1,T,16]  # layers.0.attn",
        "%o = cached_attention(%qr, %kc1, %vc1, %positions, %seq_lens) {scale=0.25} : f32[B,S,32]  "
        "# layers.0.attn",
    ]
    _same_results(before, after, 3)


def test_rope_cache_write_must_not_fire_when_k_is_read_twice():
    text = _attention_ir(s="S").replace("return %o state", "return %o, %kr state")
    before, after, count = _apply(fuse_rope_cache_write, text)
    assert count == 0 and after == before


# ---- fuse_route_norm ----------------------------------------------------------------------------------------------
_ROUTE_HEAD = """\
params {
  "nw": f32[8]
  "router": f32[4,8]
}

graph forward(%x: f32[B,S,8]) {
  %w = param "nw" : f32[8]
  %r = param "router" : f32[4,8]
"""
ROUTE = _ROUTE_HEAD + """\
  %n = rms_norm(%x, %w) {eps=1e-05} : f32[B,S,8]  # post_attention_layernorm
  %ids, %wts = moe_route(%n, %r) {top_k=2} : i32[B,S,2], f32[B,S,2]  # mlp.gate
  %y = mul(%n, %n) : f32[B,S,8]  # mlp
  return %ids, %wts, %y
}
"""


def test_route_norm_golden_and_same_results():
    before, after, count = _apply(fuse_route_norm, ROUTE)
    assert count == 1
    assert _body(after)[2:] == [
        "%n, %ids, %wts = rms_norm_moe_route(%x, %w, %r) {top_k=2, eps=1e-05} : f32[B,S,8], i32[B,S,2], "
        "f32[B,S,2]  # post_attention_layernorm, mlp.gate",
        "%y = mul(%n, %n) : f32[B,S,8]  # mlp",
    ]
    _same_results(before, after, 3)


@pytest.mark.parametrize("kind", ["returned", "first user not the route"])
def test_route_norm_must_not_fire(kind):
    if kind == "returned":
        text = ROUTE.replace("return %ids, %wts, %y", "return %ids, %wts, %y, %n")
    else:
        text = ROUTE.replace("  %y = mul(%n, %n) : f32[B,S,8]  # mlp\n", "").replace(
            "  %ids, %wts", "  %y = mul(%n, %n) : f32[B,S,8]  # mlp\n  %ids, %wts")
    before, after, count = _apply(fuse_route_norm, text)
    assert count == 0 and after == before


FLAT_ROUTE = _ROUTE_HEAD + """\
  %n = rms_norm(%x, %w) {eps=1e-05} : f32[B,S,8]  # post_attention_layernorm
  %t = reshape(%n) {shape=[B*S,8]} : f32[B*S,8]  # mlp
  %ids, %wts = moe_route(%t, %r) {top_k=2} : i32[B*S,2], f32[B*S,2]  # mlp.gate
  %e = mul(%t, %t) : f32[B*S,8]  # mlp.experts
  %y = mul(%n, %n) : f32[B,S,8]  # mlp.shared
  return %ids, %wts, %e, %y
}
"""


def test_route_norm_of_flattened_tokens_golden_and_same_results():
    """A traced MoE block routes the norm's rows flattened to [T, H]: the fused node takes the flattened input,
    yields the flattened rows, and the norm's later users read them reshaped back."""
    before, after, count = _apply(fuse_route_norm, FLAT_ROUTE)
    assert count == 1
    assert _body(after)[2:] == [
        "%t.in = reshape(%x) {shape=[B*S,8]} : f32[B*S,8]  # post_attention_layernorm, mlp, mlp.gate",
        "%t, %ids, %wts = rms_norm_moe_route(%t.in, %w, %r) {top_k=2, eps=1e-05} : f32[B*S,8], i32[B*S,2], "
        "f32[B*S,2]  # post_attention_layernorm, mlp, mlp.gate",
        "%n = reshape(%t) {shape=[B,S,8]} : f32[B,S,8]  # post_attention_layernorm, mlp, mlp.gate",
        "%e = mul(%t, %t) : f32[B*S,8]  # mlp.experts",
        "%y = mul(%n, %n) : f32[B,S,8]  # mlp.shared",
    ]
    _same_results(before, after, 4)
    # a user of the norm before the route (a shared expert reading the rows first) keeps the norm its own launch
    early = FLAT_ROUTE.replace("  %y = mul(%n, %n) : f32[B,S,8]  # mlp.shared\n", "").replace(
        "  %t = reshape", "  %y = mul(%n, %n) : f32[B,S,8]  # mlp.shared\n  %t = reshape")
    before, after, count = _apply(fuse_route_norm, early)
    assert count == 0 and after == before


# ---- fuse_ew_chains -----------------------------------------------------------------------------------------------
CHAIN = """\
graph forward(%x: f32[B,S,8], %y: f32[B,S,8], %i: i64[B,S,8]) {
  %a = silu(%x) : f32[B,S,8]  # act
  %b = mul(%a, %y) : f32[B,S,8]  # mlp
  %c = add(%b, %x) : f32[B,S,8]  # mlp
  %p = pow(%c) {exponent=2.0} : f32[B,S,8]  # out
  %q = add(%p, %c) : f32[B,S,8]  # out
  %j = add(%i, %i) : i64[B,S,8]  # ints
  return %q, %j
}
"""


def test_ew_chains_golden_and_same_results():
    before, after, count = _apply(fuse_ew_chains, CHAIN)
    assert count == 2  # %c has two users: it ends one chain and is an operand of the next; ints stay
    assert _body(after) == [
        "%c = ew_chain(%x, %y) {body=add(mul(silu(%0), %1), %0)} : f32[B,S,8]  # act, mlp",
        "%q = ew_chain(%c) {body=add(pow[exponent=2.0](%0), %0)} : f32[B,S,8]  # out",
        "%j = add(%i, %i) : i64[B,S,8]  # ints",
    ]
    _same_results(before, after, 3)


def test_ew_chains_must_not_fire_without_element_wise_nodes():
    text = "graph forward(%x: f32[B,S,8]) {\n  %s = softmax(%x) {dim=-1} : f32[B,S,8]\n  return %s\n}\n"
    before, after, count = _apply(fuse_ew_chains, text)
    assert count == 0 and after == before


# ---- the tails in the pipeline ------------------------------------------------------------------------------------
def test_each_backend_tail_on_the_tiny_llama():
    """After the shared pipeline (goldens unchanged), each backend's tail: what it makes of one Llama layer."""
    module = ir.verify_module(ir.parse_module(example_text()))
    shared = run_pipeline(module, dump=set())
    assert run_pipeline(module, dump=set(), backend="reference") == shared
    triton = run_pipeline(module, dump=set(), backend="triton")
    ops = {g.name: [n.op.value for n in g.nodes if n.op not in (ir.Op.PARAM, ir.Op.WEIGHT)] for g in triton.graphs}
    assert ops["decode"] == ["embedding", "rms_norm_linear", "rope_cached_attention", "linear", "rms_norm_linear",
                             "linear", "rms_norm_linear"]
    assert "rope_cache_write" in ops["prefill"] and "cached_attention" in ops["prefill"]
    assert set(TAILS) == {"reference", "onnx", "triton"}
