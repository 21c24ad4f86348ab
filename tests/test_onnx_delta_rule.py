"""The ONNX lowerings of the linear-attention ops (codegen/onnx/linear_attention.py) against their reference
implementations (ir/compute.py): short_conv and delta_rule from zeros, their cached forms from a non-zero state with
right padding of other lengths per row and continuations (first positions > 0); per-channel (KDA) and per-head
(gated DeltaNet) gates, l2norm on and off, bias or none; decode (S = 1), a prefill within one chunk and one past it.
Each model is standard ONNX (onnx.checker, no com.microsoft op, subgraphs included) and runs with every state bound
to one buffer in and out, as OnnxProgram runs it; results and new states within 1e-5 of the reference's max |value|
(f32)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import lowerlm.ir as ir
from lowerlm.codegen.onnx import linear_attention as la
from lowerlm.codegen.onnx.lower import lower_graph
from lowerlm.ir.fold import run_op

B, H, K, V, W = 2, 2, 8, 6, 4
C = 6  # conv channels


def _ops(graph) -> list:
    out = []
    for n in graph.node:
        out.append((n.domain, n.op_type))
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _ops(a.g)
    return out


def _run(text: str, feeds: dict) -> tuple:
    """The one-node graph of ``text`` lowered (standalone: standard ops only) and run by ONNX Runtime with each state
    bound to one OrtValue as input and output, and run by the reference: (op types, ORT's results, the reference's),
    a state result as its new version."""
    import onnxruntime as ort

    g = ir.verify_module(ir.parse_module(text)).graphs[0]
    (node,) = g.nodes
    model = lower_graph(g, constants=None, contrib=False)
    onnx.checker.check_model(model, full_check=True)
    ops = _ops(model.graph)
    assert all(domain in ("", "ai.onnx") for domain, _ in ops)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    for o in g.outputs:  # first: get_outputs() answers in binding order
        binding.bind_output(o, "cpu")
    for v in g.inputs:
        binding.bind_cpu_input(v.name, feeds[v.name].numpy())
    buffers = {}
    for s in g.state:  # in place, as OnnxProgram binds it
        buffers[s.name] = feeds[s.name].numpy().copy()
        value = ort.OrtValue.ortvalue_from_numpy(buffers[s.name])
        binding.bind_ortvalue_input(s.name, value)
        binding.bind_ortvalue_output(s.name + ".out", value)
    session.run_with_iobinding(binding)
    outs = dict(zip(g.outputs, (v.numpy() for v in binding.get_outputs()[:len(g.outputs)])))
    outs |= {o: buffers[s.name] for s, o in zip(g.state, g.state_outputs)}
    got = [torch.from_numpy(np.asarray(outs[r.name])) for r in node.results]
    env = {str(d): n for v in g.inputs for d, n in zip(v.type.shape, feeds[v.name].shape) if not isinstance(d, int)}
    want = run_op(node, [feeds[v].clone() for v in node.inputs if v is not None], env)
    want = list(want) if isinstance(want, tuple) else [want]
    return [t for _, t in ops], got, want


def _close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def _rows(s: int) -> tuple:
    """(positions, seq_lens): continuations from positions 3 and 9, row 1 right-padded (in decode: a padding token;
    with 5 tokens its 3 valid ones are exactly the conv's W-1)."""
    starts = torch.tensor([3, 9])
    positions = starts[:, None] + torch.arange(s)[None, :]
    pad = max(s // 2, 1) if s > 1 else 1
    lens = (starts + s - torch.tensor([0, pad])).to(torch.int32)
    return positions, lens


# ---- short convolution ----------------------------------------------------------------------------------------------
def _conv_text(cached: bool, s: str, bias: bool, act: str) -> str:
    bias_in, bias_arg = (", %b: f32[6]", ", %b") if bias else ("", "")
    if not cached:
        return (f"graph g(%x: f32[B,{s},6], %w: f32[6,4]{bias_in}) {{\n"
                f"  %y = short_conv(%x, %w{bias_arg}) {{act={act}}} : f32[B,{s},6]\n  return %y\n}}\n")
    call = f"cached_short_conv(%x, %w{bias_arg}, state=%st, positions=%positions, seq_lens=%seq_lens)"
    return (f"graph g(%x: f32[B,{s},6], %w: f32[6,4]{bias_in}, %positions: i64[B,{s}], %seq_lens: i32[B])\n"
            f"    state(%st: f32[B,3,6] recurrent @layer0) {{\n"
            f"  %y, %st1 = {call} {{act={act}}} : f32[B,{s},6], f32[B,3,6]\n"
            f"  return %y state(%st1)\n}}\n")


@pytest.mark.parametrize("s", [1, 5, 70])
@pytest.mark.parametrize("cached", [False, True], ids=["zeros", "cached"])
@pytest.mark.parametrize("bias,act", [(True, "silu"), (False, "none")], ids=["bias-silu", "plain"])
def test_short_conv_lowers_as_its_reference(s, cached, bias, act):
    """Shifted slices over [state or zeros; x]; the new state: each row's last W-1 inputs before its padding (row 1
    of a decode is a padding token: its state stays)."""
    gen = torch.Generator().manual_seed(s)
    feeds = {"x": torch.randn(B, s, C, generator=gen), "w": torch.randn(C, W, generator=gen),
             "b": torch.randn(C, generator=gen)}
    if not bias:
        del feeds["b"]
    if cached:
        feeds["positions"], feeds["seq_lens"] = _rows(s)
        feeds["st"] = torch.randn(B, W - 1, C, generator=gen)
    ops, got, want = _run(_conv_text(cached, "1" if s == 1 else "S", bias, act), feeds)
    assert "Conv" not in ops and ("Sigmoid" in ops) == (act == "silu")
    for a, b in zip(got, want):
        _close(a, b)
    if cached and s == 1:
        torch.testing.assert_close(got[1][1], feeds["st"][1], rtol=0, atol=0)


# ---- the delta rule -------------------------------------------------------------------------------------------------
def _delta_text(cached: bool, s: str, per_channel: bool, l2norm: bool) -> str:
    gw = H * K if per_channel else H
    attrs = f"heads={H}, scale=0.35, l2norm={str(l2norm).lower()}, eps=1e-06"
    inputs = (f"%q: f32[B,{s},{H * K}], %k: f32[B,{s},{H * K}], %v: f32[B,{s},{H * V}], %g: f32[B,{s},{gw}], "
              f"%beta: f32[B,{s},{H}]")
    if not cached:
        return (f"graph g({inputs}) {{\n"
                f"  %o = delta_rule(%q, %k, %v, %g, %beta) {{{attrs}}} : f32[B,{s},{H * V}]\n  return %o\n}}\n")
    return (f"graph g({inputs}, %positions: i64[B,{s}], %seq_lens: i32[B])\n"
            f"    state(%st: f32[B,{H},{K},{V}] recurrent @layer0) {{\n"
            f"  %o, %st1 = cached_delta_rule(%q, %k, %v, %g, %beta, %st, %positions, %seq_lens) {{{attrs}}} : "
            f"f32[B,{s},{H * V}], f32[B,{H},{K},{V}]\n"
            f"  return %o state(%st1)\n}}\n")


def _delta_feeds(s: int, cached: bool, per_channel: bool, l2norm: bool) -> dict:
    """Model-like operands: decaying gates (log-sigmoid, mostly mild), beta in (0, 1), keys of norm <= 1 without
    l2norm (the delta rule's stable range), a state of the recurrence's scale."""
    gen = torch.Generator().manual_seed(100 + s + 2 * per_channel + l2norm)
    q = torch.randn(B, s, H * K, generator=gen)
    # keys sharing a direction (as a model's do): large A entries, so the WY inverse's high powers count
    k = torch.randn(B, s, H * K, generator=gen) + 2 * torch.randn(1, 1, H * K, generator=gen)
    if not l2norm:
        kh = k.reshape(B, s, H, K)
        k = (kh / kh.norm(dim=-1, keepdim=True) * torch.rand(B, s, H, 1, generator=gen)).reshape(B, s, H * K)
    g = torch.nn.functional.logsigmoid(torch.randn(B, s, H * K if per_channel else H, generator=gen) * 2 + 4)
    feeds = {"q": q, "k": k, "v": torch.randn(B, s, H * V, generator=gen), "g": g,
             "beta": torch.rand(B, s, H, generator=gen)}
    if cached:
        feeds["positions"], feeds["seq_lens"] = _rows(s)
        feeds["st"] = torch.randn(B, H, K, V, generator=gen) * 0.5
    return feeds


# (tokens, S in the type): decode; a prefill graph run with one token (a one-iteration Scan: its state read and
# written in one step, through one buffer); 5 tokens (within a chunk); 70 (past the first chunks, the last padded)
_DELTA_CASES = [(1, "1", "chunked"), *((s, "S", form) for s in (1, 5, 70) for form in ("chunked", "scan"))]


@pytest.mark.parametrize("s,dim,form", _DELTA_CASES)
@pytest.mark.parametrize("cached", [False, True], ids=["zeros", "cached"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["kda", "per-head"])
@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "raw"])
def test_delta_rule_lowers_as_its_reference(s, dim, form, cached, per_channel, l2norm, monkeypatch):
    """Decode (S = 1 in the type): the recurrent step in plain ops; a prefill: a Scan over chunks or over tokens
    (both forms); cached: continuing a non-zero state from positions 3 and 9, row 1 right-padded (its padding leaves
    the state unchanged)."""
    monkeypatch.setattr(la, "PREFILL", form)
    feeds = _delta_feeds(s, cached, per_channel, l2norm)
    ops, got, want = _run(_delta_text(cached, dim, per_channel, l2norm), feeds)
    assert ops.count("Scan") == (0 if dim == "1" else 1)
    for a, b in zip(got, want):
        _close(a, b)
    if cached and s == 1:  # row 1's token is padding: its state as it was
        torch.testing.assert_close(got[1][1], feeds["st"][1], rtol=0, atol=0)


@pytest.mark.parametrize("form", ["chunked", "scan"])
def test_padding_never_enters_the_delta_state(form, monkeypatch):
    """A right-padded row's new state and valid results are those of its valid tokens alone."""
    monkeypatch.setattr(la, "PREFILL", form)
    feeds = _delta_feeds(70, True, True, True)
    text = _delta_text(True, "S", True, True)
    _, got, _ = _run(text, feeds)
    n = int(feeds["seq_lens"][1] - feeds["positions"][1, 0])
    alone = {k: v[1:, :n] if k in ("q", "k", "v", "g", "beta", "positions") else v[1:] for k, v in feeds.items()}
    _, got_alone, want_alone = _run(text, alone)
    _close(got_alone[1], want_alone[1])
    assert (got[1][1] - got_alone[1][0]).abs().max() <= 1e-5 * want_alone[1].abs().max()
    assert (got[0][1, :n] - got_alone[0][0]).abs().max() <= 1e-5 * want_alone[0].abs().max()
