"""The reference backend is the oracle, so each LLM op is checked against an independent formulation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import lowerlm.ir as ir
from lowerlm.codegen.reference import IMPLEMENTED, ReferenceProgram
from lowerlm.ir import Op
from lowerlm.ir.compute import attention, cached_attention, kv_cache_write, rms_norm, rope
from lowerlm.ir.weights import Cast, Concat, Data, MatMul, Param, Scale, Transpose, evaluate_weight, tensor_digest

from .test_ir_text import KITCHEN_SINK


def test_every_op_has_a_definition_and_a_reference_implementation():
    assert set(ir.OPDEFS) == set(Op)
    assert IMPLEMENTED == set(Op)


def _with_data_values(m: ir.Module) -> ir.Module:
    """Give the kitchen sink's data leaf values (text keeps only their digest)."""
    g = m.graphs[0]
    node = g.producer("m")
    expr = node.attrs["expr"]
    mu = Data.of("arm.0.mu", ir.parse_type("f32[24]"), [0.1 * i for i in range(24)])
    new = node.with_(attrs=ir.Attrs({"expr": MatMul(dataclasses.replace(expr.lhs, by=mu), expr.rhs)}))
    return dataclasses.replace(m, graphs=(g.with_(nodes=tuple(new if n is node else n for n in g.nodes)),))


def test_kitchen_sink_runs_and_results_have_declared_types():
    m = ir.parse_module(KITCHEN_SINK)
    weights = {n: torch.randn([ir.evaluate(d, {}) for d in t.shape]).to(t.dtype.to_torch()) for n, t in m.params}
    with pytest.raises(ir.LowerlmError, match="has no values"):
        ReferenceProgram(m, weights)
    m = _with_data_values(m)
    prog = ReferenceProgram(m, weights)
    b, s, t = 2, 5, 6
    inputs = {"input_ids": torch.zeros(b, 1, dtype=torch.long), "x": torch.randn(b, 1, 16),
              "positions": torch.tensor([[3], [0]]), "seq_lens": torch.tensor([4, 1], dtype=torch.int32),
              "y": torch.randn(b, (s + 1) // 2, 4)}
    state = {"kc0": torch.randn(b, 2, t, 8), "vc0": torch.randn(b, 2, t, 8)}
    with pytest.raises(ir.InputError, match="symbols S cannot be read off"):
        prog.run("decode", inputs, state)
    outs, new_state = prog.run("decode", inputs, state, symbols={"S": s})
    g = m.graphs[0]
    env = {"B": b, "S": s, "T": t}
    for name, value in zip(g.outputs, outs):
        want = g.type_of(name)
        assert value.dtype == want.dtype.to_torch(), name
        assert list(value.shape) == [ir.evaluate(d, env) for d in want.shape], name
    assert set(new_state) == {"kc0", "vc0"}
    assert torch.equal(state["kc0"][0, :, 0], new_state["kc0"][0, :, 0])  # untouched slot
    assert not torch.equal(state["kc0"][0, :, 3], new_state["kc0"][0, :, 3])  # written slot


def test_rms_norm_matches_the_formula():
    x, w = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rms_norm(x.float(), w.float(), 1e-5), want.float())


def _hf_rope(q, k, positions, inv_freq, scaling):
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb, in the [B, H, S, D] layout."""
    inv = torch.tensor(inv_freq)[None, :, None].float().expand(positions.shape[0], -1, 1)
    freqs = (inv @ positions[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * scaling).unsqueeze(1), (emb.sin() * scaling).unsqueeze(1)

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _flat(x):  # [B, H, S, D] -> [B, S, H*D]
    return x.transpose(1, 2).flatten(2)


def _split(x, h):  # [B, S, H*D] -> [B, H, S, D]
    return x.unflatten(2, (h, -1)).transpose(1, 2)


def test_rope_half_layout_matches_transformers():
    b, s, hq, hk, d = 2, 7, 4, 2, 8
    q, k = torch.randn(b, hq, s, d), torch.randn(b, hk, s, d)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [5, 6, 7, 8, 9, 10, 11]])
    inv_freq = [1.0 / 10000 ** (i / d) for i in range(0, d, 2)]
    want_q, want_k = _hf_rope(q, k, positions, inv_freq, 0.7)
    got_q, got_k = rope(_flat(q), _flat(k), positions, (hq, hk), inv_freq, 0.7, "half")
    torch.testing.assert_close(got_q, _flat(want_q), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_k, _flat(want_k), rtol=0, atol=1e-6)


def test_rope_interleaved_layout_is_complex_rotation():
    b, s, h, d = 1, 5, 2, 6
    x = torch.randn(b, s, h * d, dtype=torch.float64)
    positions = torch.arange(s)[None]
    inv_freq = [1.0, 0.5, 0.25]
    got, _ = rope(x.float(), x.float(), positions, (h, h), inv_freq, 1.0, "interleaved")
    z = torch.view_as_complex(x.reshape(b, s, h, d // 2, 2).contiguous())
    angle = positions[..., None].double() * torch.tensor(inv_freq, dtype=torch.float64)
    want = torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)[:, :, None, :]).reshape(b, s, h * d)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)


def test_partial_rotary_leaves_the_rest_of_each_head():
    x = torch.randn(1, 3, 2 * 8)
    got, _ = rope(x, x, torch.arange(3)[None], (2, 2), [1.0, 0.1], 1.0, "half")
    torch.testing.assert_close(got.unflatten(2, (2, 8))[..., 4:], x.unflatten(2, (2, 8))[..., 4:])
    assert not torch.allclose(got.unflatten(2, (2, 8))[0, 1:, :, :4], x.unflatten(2, (2, 8))[0, 1:, :, :4])


def _naive_attention(q, k, v, q_pos, k_pos, k_valid, scale, causal, window, softcap=0.0, sinks=None):
    """Loops over batch, head and query in float64; q: [B,Hq,S,D], k/v: [B,Hk,L,D]; softcap and one sink logit
    per head as transformers' eager attention applies them."""
    b, hq, s, _ = q.shape
    rep = hq // k.shape[1]
    out = torch.zeros(b, hq, s, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(s):
                keys = [j for j in range(k.shape[2]) if k_valid[bi, j]
                        and (not causal or k_pos[bi, j] <= q_pos[bi, i])
                        and (not window or q_pos[bi, i] - k_pos[bi, j] < window)]
                if not keys:
                    continue
                scores = torch.stack([q[bi, h, i].double() @ k[bi, h // rep, j].double() * scale for j in keys])
                if softcap:
                    scores = torch.tanh(scores / softcap) * softcap
                if sinks is not None:
                    scores = torch.cat([scores, sinks[h:h + 1].double()])
                p = torch.softmax(scores, 0)
                out[bi, h, i] = sum(p[n] * v[bi, h // rep, j].double() for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("causal, window, softcap, sinks", [(True, 0, 0.0, False), (False, 0, 0.0, False),
                                                            (True, 3, 0.0, False), (True, 0, 0.5, False),
                                                            (True, 3, 0.0, True), (False, 0, 0.7, True)])
def test_attention_matches_naive_loops(causal, window, softcap, sinks):
    torch.manual_seed(0)
    b, s, hq, hk, d = 2, 6, 4, 2, 4
    q, k, v = torch.randn(b, hq, s, d), torch.randn(b, hk, s, d), torch.randn(b, hk, s, d)
    positions = torch.arange(s).repeat(b, 1)
    lens = torch.tensor([6, 4], dtype=torch.int32)
    sink = torch.randn(hq) if sinks else None
    got = attention(_flat(q), _flat(k), _flat(v), positions, lens, sink, (hq, hk), 0.3, causal, window, softcap)
    valid = torch.arange(s)[None] < lens[:, None]
    want = _naive_attention(q, k, v, positions, positions, valid, 0.3, causal, window, softcap, sink)
    torch.testing.assert_close(got, _flat(want).float(), rtol=0, atol=1e-5)


def test_a_query_that_sees_no_key_gives_zeros():
    q = torch.randn(1, 2, 4)
    for sinks in (None, torch.ones(1)):
        out = attention(q, q, q, torch.arange(2)[None], torch.tensor([0], dtype=torch.int32), sinks, (1, 1), 1.0,
                        True, 0)
        assert torch.equal(out, torch.zeros_like(out))


def test_cache_prefill_then_decode_equals_full_attention():
    """Right-padded prefill of two prompts (lengths 5 and 3), then three decode steps per sequence, equals
    attention over each whole sequence alone."""
    torch.manual_seed(1)
    hq, hk, d, t, scale = 4, 2, 4, 10, 0.5
    lens = [5, 3]
    total = [n + 3 for n in lens]
    seqs = [(torch.randn(n, hq * d), torch.randn(n, hk * d), torch.randn(n, hk * d)) for n in total]
    s = max(lens)
    q = torch.zeros(2, s, hq * d)
    k = torch.zeros(2, s, hk * d)
    v = torch.zeros(2, s, hk * d)
    for i, n in enumerate(lens):
        q[i, :n], k[i, :n], v[i, :n] = seqs[i][0][:n], seqs[i][1][:n], seqs[i][2][:n]
    positions = torch.arange(s).repeat(2, 1)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kc = kv_cache_write(torch.zeros(2, hk, t, d), k, positions)
    vc = kv_cache_write(torch.zeros(2, hk, t, d), v, positions)
    prefill = cached_attention(q, kc, vc, positions, seq_lens, None, scale, True, 0)
    outs = [[prefill[i, :n]] for i, n in enumerate(lens)]
    for step in range(3):
        pos = torch.tensor([[n + step] for n in lens])
        new = [torch.stack([seqs[i][j][lens[i] + step] for i in range(2)])[:, None] for j in range(3)]
        kc = kv_cache_write(kc, new[1], pos)
        vc = kv_cache_write(vc, new[2], pos)
        o = cached_attention(new[0], kc, vc, pos, (pos[:, 0] + 1).int(), None, scale, True, 0)
        for i in range(2):
            outs[i].append(o[i])
    for i, n in enumerate(total):
        qi, ki, vi = (x[None] for x in seqs[i])
        want = attention(qi, ki, vi, torch.arange(n)[None], torch.tensor([n], dtype=torch.int32), None, (hq, hk),
                         scale, True, 0)
        torch.testing.assert_close(torch.cat(outs[i]), want[0], rtol=0, atol=1e-6)


def test_kv_cache_write_is_functional_and_skips_positions_past_the_end():
    cache = torch.zeros(1, 1, 4, 2)
    out = kv_cache_write(cache, torch.ones(1, 2, 2), torch.tensor([[3, 4]]))
    assert torch.equal(cache, torch.zeros(1, 1, 4, 2))
    assert out[0, 0, 3].tolist() == [1.0, 1.0] and out.sum() == 2


def test_weight_expressions_evaluate_and_fingerprint():
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    params = {"a": a, "b": b}
    mu = Data.of("mu", ir.parse_type("f32[4]"), [1.0, 2.0, 3.0, 4.0])
    expr = MatMul(Concat((Param("a"), Param("b")), 0), Transpose(Scale(Param("a"), mu, 1)))
    want = torch.cat([a, b]) @ (a * torch.tensor([1.0, 2.0, 3.0, 4.0])).t()
    torch.testing.assert_close(evaluate_weight(expr, params.__getitem__), want)
    assert evaluate_weight(Cast(Param("a"), ir.DType.BF16), params.__getitem__).dtype == torch.bfloat16
    assert ir.parse_type("f32[5,3]") == __import__("lowerlm.ir.weights", fromlist=["x"]).weight_type(
        expr, {"a": ir.parse_type("f32[3,4]"), "b": ir.parse_type("f32[2,4]")})

    module = ir.parse_module('params {\n  "a": f32[3,4]\n  "b": f32[2,4]\n}\ngraph f(%x: f32[4]) {\n'
                             '  %w = weight concat[0](param "a", param "b") : f32[5,4]\n  return %w\n}\n')
    fp = ReferenceProgram(module, params).weight_fingerprint()
    assert ReferenceProgram(module, dict(params)).weight_fingerprint() == fp
    changed = dict(params, b=b.clone().index_fill_(0, torch.tensor([1]), 0.5))
    assert ReferenceProgram(module, changed).weight_fingerprint() != fp
    assert tensor_digest(a) != tensor_digest(a.to(torch.bfloat16))


def test_expert_layout_expressions_transpose_stacks_and_deinterleave():
    """gpt-oss's experts: [E, H, 2I] with gate|up interleaved by column become [E, 2I, H] = [gate; up] rows."""
    from lowerlm.ir.weights import Deinterleave, weight_type

    w = torch.randn(3, 4, 6)  # E=3, H=4, 2I=6
    expr = Deinterleave(Transpose(Param("w")), 1)
    got = evaluate_weight(expr, {"w": w}.__getitem__)
    want = torch.cat([w[..., ::2], w[..., 1::2]], dim=-1).transpose(1, 2)
    assert torch.equal(got, want)
    assert weight_type(expr, {"w": ir.parse_type("f32[3,4,6]")}) == ir.parse_type("f32[3,6,4]")
    module = ir.parse_module('params {\n  "w": f32[3,4,6]\n}\ngraph f(%x: f32[4]) {\n'
                             '  %w = weight deinterleave[1](transpose(param "w")) : f32[3,6,4]\n  return %w\n}\n')
    assert module.graphs[0].producer("w").attrs["expr"] == expr
    with pytest.raises(ir.ShapeError, match="even length"):
        weight_type(Deinterleave(Param("w"), 1), {"w": ir.parse_type("f32[3,5,6]")})


def test_bad_inputs_are_input_errors():
    m = ir.parse_module("graph f(%x: f32[B,S], %y: f32[S]) {\n  %z = add(%x, %y) : f32[B,S]\n  return %z\n}\n")
    prog = ReferenceProgram(m, {})
    outs, _ = prog.run("f", [torch.ones(2, 3), torch.ones(3)])
    assert outs[0].shape == (2, 3)
    with pytest.raises(ir.InputError, match="dtype f32"):
        prog.run("f", [torch.ones(2, 3, dtype=torch.float64), torch.ones(3)])
    with pytest.raises(ir.InputError, match="dimension S is 3 elsewhere but 4"):
        prog.run("f", [torch.ones(2, 3), torch.ones(4)])
    with pytest.raises(ir.InputError, match="was not given"):
        prog.run("f", {"x": torch.ones(2, 3)})
    with pytest.raises(ir.InputError, match="expected rank 2"):
        prog.run("f", [torch.ones(6), torch.ones(3)])


def test_core_ops_follow_torch():
    m = ir.parse_module(
        "graph f(%x: f32[2,6]) {\n"
        "  %s = softmax(%x) {dim=-1} : f32[2,6]\n"
        "  %a, %b = split(%x) {dim=1, sizes=[2,4]} : f32[2,2], f32[2,4]\n"
        "  %v, %i = topk(%x) {k=3} : f32[2,3], i64[2,3]\n"
        "  %g = gather(%x, %i) {dim=1} : f32[2,3]\n"
        "  %sl = slice(%x) {dim=1, start=1, end=6, step=2} : f32[2,3]\n"
        "  %t = transpose(%x) {perm=[1,0]} : f32[6,2]\n"
        "  %e = gelu(%x) {approximate=tanh} : f32[2,6]\n"
        "  return %s, %a, %b, %v, %g, %sl, %t, %e\n}\n")
    x = torch.randn(2, 6)
    s, a, b, v, g, sl, t, e = ReferenceProgram(m, {}).run("f", [x])[0]
    torch.testing.assert_close(s, torch.softmax(x, -1))
    assert torch.equal(torch.cat([a, b], 1), x)
    assert torch.equal(v, x.topk(3).values) and torch.equal(g, v)
    assert torch.equal(sl, x[:, 1:6:2]) and torch.equal(t, x.t())
    torch.testing.assert_close(e, torch.nn.functional.gelu(x, approximate="tanh"))
    assert math.isclose(float(s.sum()), 2.0, rel_tol=1e-6)
