"""The ONNX lowerings of multi-head latent attention (codegen/onnx/mla.py) against their reference implementations
(ir/compute.py): mla_expand, mla_attention over right-padded rows, and cached_mla_attention over a latent cache
holding earlier tokens (random values past each row's length, which must stay hidden): decode (S = 1: the absorbed
form, no key or value expanded), a prefill and a chunk continuing the cache (the naive form over cached_attention),
a row that sees no slot (zeros); with the masked softmax and standalone (opset-24 Attention); kv_b's weight as a
graph input and as an initializer (ONNX Runtime folds the absorbed form's views of it). f32: within 1e-5 of the
reference's max |value|."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import lowerlm.ir as ir
from lowerlm.codegen.onnx.lower import lower_graph
from lowerlm.ir.fold import run_op

B, L, R, H, P, V, T = 3, 16, 4, 2, 8, 6, 24  # batch, latent, rotary, heads, nope, values, cache slots
ATTRS = f"heads={H}, nope={P}"
SCALE = 0.3


def _graph(text: str):
    g = ir.verify_module(ir.parse_module(text)).graphs[0]
    (node,) = [n for n in g.nodes if n.op is not ir.Op.PARAM]
    return g, node


def _session(model, optimized=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized is not None:  # ONNX Runtime's basic optimisations (constant folding), the result written out
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(text: str, feeds: dict, contrib: bool = True, param: bool = False, optimized=None) -> tuple:
    """The one-op graph of ``text`` lowered and run by ONNX Runtime, and its op run by the reference: (the model,
    ORT's results, the reference's); with ``param`` the weight %w is a param (an initializer) read from feeds."""
    g, node = _graph(text)
    model = lower_graph(g, constants=lambda n: feeds[n.attrs["name"]], contrib=contrib)
    onnx.checker.check_model(model, full_check=True)
    if not contrib:
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    session = _session(model, optimized)
    inputs = {v.name: feeds[v.name].numpy() for v in g.inputs}
    got = [torch.from_numpy(x) for x in session.run(None, inputs)]
    env = {str(d): n for v in g.inputs for d, n in zip(v.type.shape, feeds[v.name].shape) if not isinstance(d, int)}
    want = run_op(node, [feeds[v].clone() for v in node.inputs], env)
    want = list(want) if isinstance(want, tuple) else [want]
    return model, got, want


def _close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def _w(param: bool) -> tuple:
    """(module prefix, graph input declaration, body line) of kv_b's weight [H*(P+V), L]: an input, or a param."""
    wt = f"f32[{H * (P + V)},{L}]"
    if param:
        return f'params {{\n  "w": {wt}\n}}\n\n', "", f'  %w = param "w" : {wt}\n'
    return "", f", %w: {wt}", ""


def _feeds(s: int, starts: list, lens: list, gen_seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(gen_seed + s + sum(lens))
    b = len(lens)
    return {"q": torch.randn(b, s, H * (P + R), generator=gen), "c": torch.randn(b, s, L, generator=gen),
            "k_pe": torch.randn(b, s, R, generator=gen),
            "w": torch.randn(H * (P + V), L, generator=gen) * L ** -0.5,
            "positions": torch.arange(s)[None, :] + torch.tensor(starts)[:, None],
            "seq_lens": torch.tensor(lens, dtype=torch.int32),
            "cc": torch.randn(b, 1, T, L, generator=gen), "kc": torch.randn(b, 1, T, R, generator=gen)}


# ---- mla_expand and mla_attention ---------------------------------------------------------------------------------
@pytest.mark.parametrize("param", [False, True], ids=["input", "param"])
def test_mla_expand_lowers_as_its_reference(param):
    params, decl, body = _w(param)
    text = (f"{params}graph g(%c: f32[B,S,{L}], %k_pe: f32[B,S,{R}]{decl}) {{\n{body}"
            f"  %k, %v = mla_expand(%c, %k_pe, %w) {{{ATTRS}}} : f32[B,S,{H * (P + R)}], f32[B,S,{H * V}]\n"
            "  return %k, %v\n}\n")
    _, got, want = _run(text, _feeds(5, [0, 0, 0], [5, 5, 5]), param=param)
    for a, b in zip(got, want):
        _close(a, b)


# (each row's seq_lens over S = 6 tokens from 0): right padding of other lengths per row, a row that sees nothing
_PROMPTS = [[6, 4, 1], [6, 3, 0]]


@pytest.mark.parametrize("contrib", [True, False], ids=["masked-softmax", "standalone"])
@pytest.mark.parametrize("lens", _PROMPTS)
def test_mla_attention_lowers_as_its_reference(lens, contrib):
    """mla_expand + attention's lowering: the reference's result at every query, padded ones included."""
    text = (f"graph g(%q: f32[B,S,{H * (P + R)}], %c: f32[B,S,{L}], %k_pe: f32[B,S,{R}], %w: f32[{H * (P + V)},{L}], "
            f"%positions: i64[B,S], %seq_lens: i32[B]) {{\n"
            f"  %o = mla_attention(%q, %c, %k_pe, %w, %positions, %seq_lens) {{{ATTRS}, scale={SCALE}}} : "
            f"f32[B,S,{H * V}]\n  return %o\n}}\n")
    model, got, want = _run(text, _feeds(6, [0] * len(lens), lens), contrib=contrib)
    assert [n.op_type for n in model.graph.node].count("Attention") == (not contrib)
    _close(got[0], want[0])
    for row, n in enumerate(lens):
        if n == 0:
            assert not got[0][row].any()


# ---- cached_mla_attention -------------------------------------------------------------------------------------------
def _cached_text(s: str, param: bool = False) -> str:
    params, decl, body = _w(param)
    return (f"{params}graph g(%q: f32[B,{s},{H * (P + R)}], %cc: f32[B,1,T,{L}], %kc: f32[B,1,T,{R}]{decl}, "
            f"%positions: i64[B,{s}], %seq_lens: i32[B]) {{\n{body}"
            f"  %o = cached_mla_attention(%q, %cc, %kc, %w, %positions, %seq_lens) {{{ATTRS}, scale={SCALE}}} : "
            f"f32[B,{s},{H * V}]\n  return %o\n}}\n")


# (S, each row's first position, seq_lens): decode at other lengths per row with a padding token (position 11 at
# seq_lens 11) and a row that sees no slot; decode with every row valid; a prefill over a cache holding earlier
# tokens with right-padded rows; a first prompt; a chunk continuing the cache with every row full
_CACHED = [(1, [5, 11, 0], [6, 11, 0]), (1, [5, 11, 2], [6, 12, 3]), (5, [4, 9, 0], [9, 12, 5]),
           (5, [0, 0, 0], [5, 2, 4]), (4, [7, 7, 7], [11, 11, 11])]


def _matmul_sizes(model, feeds: dict) -> list:
    """The number of elements of every MatMul's output when ``model`` runs on ``feeds``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [o for n in probe.graph.node if n.op_type == "MatMul" for o in n.output]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    outs = _session(probe).run(names, feeds)
    return [int(np.prod(x.shape)) for x in outs]


@pytest.mark.parametrize("contrib", [True, False], ids=["masked-softmax", "standalone"])
@pytest.mark.parametrize("s,starts,lens", _CACHED)
def test_cached_mla_attention_lowers_as_its_reference(s, starts, lens, contrib):
    """Decode (S = 1 in the type): the absorbed form, whose products are never as large as the expanded keys of the
    visible slots; S free: the naive form (keys and values expanded from the cache, then cached_attention)."""
    feeds = _feeds(s, starts, lens)
    text = _cached_text("1" if s == 1 else "S")
    model, got, want = _run(text, feeds, contrib=contrib)
    _close(got[0], want[0])
    for row, n in enumerate(lens):
        if n == 0:
            assert not got[0][row].any()
    ops = [n.op_type for n in model.graph.node]
    sizes = _matmul_sizes(model, {k: feeds[k].numpy() for k in ("q", "cc", "kc", "w", "positions", "seq_lens")})
    expanded = len(lens) * max(lens) * H * (P + R)  # the keys of the visible slots, expanded
    if s == 1:
        assert "Attention" not in ops and max(sizes) < expanded
    else:
        assert max(sizes) >= expanded and ops.count("Attention") == (not contrib)


def test_decode_with_the_weight_as_an_initializer_folds_its_views(tmp_path):
    """kv_b's weight as a param (an initializer, as OnnxProgram lowers it): W_UK and W_UV.T are Reshape + Slice (+
    Transpose) of it, which ONNX Runtime's constant folding computes at session creation: no node of the optimised
    model reads the weight any more."""
    feeds = _feeds(1, [5, 11, 2], [6, 12, 3])
    optimized = tmp_path / "decode.onnx"
    model, got, want = _run(_cached_text("1", param=True), feeds, optimized=optimized)
    _close(got[0], want[0])
    (w,) = [t.name for t in model.graph.initializer if tuple(t.dims) == (H * (P + V), L)]
    opt = onnx.load(str(optimized))
    assert any(w in n.input for n in model.graph.node) and not any(w in n.input for n in opt.graph.node)


@pytest.mark.parametrize("s", [1, 5])
def test_cached_mla_attention_in_f16(s):
    """f16: the scores rounded to f16 before the f32 softmax, the weights back in f16, as the reference: within
    f16 rounding (2e-3 of the max |value|)."""
    feeds = _feeds(s, [5, 11, 2], [5 + s, 11 + s, 2 + s])
    feeds = {k: v.half() if v.is_floating_point() else v for k, v in feeds.items()}
    _, got, want = _run(_cached_text("1" if s == 1 else "S").replace("f32", "f16"), feeds)
    assert got[0].dtype == want[0].dtype == torch.float16
    assert (got[0].float() - want[0].float()).abs().max() <= 2e-3 * want[0].float().abs().max()
