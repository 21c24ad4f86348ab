"""The linear-attention kernels (codegen/triton/delta_rule.py: short convolution, gated delta rule, recurrent and
chunked) against ir/compute.py's references on awkward tiny shapes (K=8, V=6, C=12, W=4: every mask), with
per-channel (KDA) and per-head (gated DeltaNet) gates, right padding and continuations; in Triton's interpreter
without a GPU. The GPU-marked tests repeat them at Kimi's shapes (H=32, K=V=128) in f32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowerlm.codegen.triton import delta_rule as dr
from lowerlm.ir import compute as ref

from .test_triton import close, rand  # the Triton tests' inputs and tolerance, shared

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def delta_inputs(b, s, h, dk, dv, per_channel, l2norm, seed=0, dtype=torch.float32):
    q, k, v = rand(b, s, h * dk, seed=seed), rand(b, s, h * dk, seed=seed + 1), rand(b, s, h * dv, seed=seed + 2)
    if not l2norm:  # keep beta |k|^2 < 2 so the recurrence stays bounded
        q, k = q / dk ** 0.5, k / dk ** 0.5
    g = F.logsigmoid(rand(b, s, h * dk if per_channel else h, seed=seed + 3) + 2.0)  # decays in (0, 1)
    beta = torch.sigmoid(rand(b, s, h, seed=seed + 4))
    return tuple(t.to(dtype) for t in (q, k, v, g, beta))


# ---- short convolution --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [1, 5, 37])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ["none", "silu"])
def test_short_conv(s, bias, act):
    x, w = rand(2, s, 12), rand(12, 4, seed=1)
    bb = rand(12, seed=2) if bias else None
    close(dr.short_conv(x, w, bb, act), ref.short_conv(x, w, bb, act))


@pytest.mark.parametrize("s, lens, start", [(1, [3, 7], [2, 6]), (1, [3, 2], [2, 2]), (5, [5, 3], [0, 0]),
                                            (37, [37, 20], [0, 0]), (5, [12, 9], [7, 7]), (2, [1, 0], [0, 0])])
@pytest.mark.parametrize("bias", [False, True])
def test_cached_short_conv(s, lens, start, bias):
    """Decode (S=1), prefill with right padding (the state stops at each row's last valid token), a continuation
    from positions > 0, and rows with fewer valid tokens than W-1 (the state keeps part of the old one)."""
    x, w, st = rand(2, s, 12), rand(12, 4, seed=1), rand(2, 3, 12, seed=3)
    bb = rand(12, seed=2) if bias else None
    pos = torch.tensor(start, device=DEV)[:, None] + torch.arange(s, device=DEV)[None, :]
    lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    want_y, want_st = ref.cached_short_conv(x, w, bb, st, pos, lens, "silu")
    buf = st.clone()
    got_y, got_st = dr.cached_short_conv(x, w, bb, buf, pos, lens, "silu")
    assert got_st is buf  # written in place
    close(got_y, want_y)
    close(got_st, want_st)


def test_short_conv_strided_input_and_width_2():
    """x a view into a wider projection output (row stride > C); W=2 (a one-row state)."""
    xw = rand(2, 5, 20)
    x, w = xw[..., 3:15], rand(12, 2, seed=1)
    close(dr.short_conv(x, w, None, "none"), ref.short_conv(x, w, None, "none"))
    st = rand(2, 1, 12, seed=3)
    pos, lens = torch.arange(5, device=DEV).repeat(2, 1), torch.tensor([5, 2], dtype=torch.int32, device=DEV)
    want = ref.cached_short_conv(x, w, None, st, pos, lens, "none")
    got = dr.cached_short_conv(x, w, None, st.clone(), pos, lens, "none")
    close(got[0], want[0])
    close(got[1], want[1])


# ---- delta rule ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s, method", [(1, "auto"), (5, "recurrent"), (5, "chunked"), (37, "chunked"),
                                       (37, "recurrent")])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("l2norm", [True, False])
def test_delta_rule(s, method, per_channel, l2norm):
    q, k, v, g, beta = delta_inputs(2, s, 2, 8, 6, per_channel, l2norm)
    want = ref.delta_rule(q, k, v, g, beta, 2, 0.35, l2norm, 1e-6)
    close(dr.delta_rule(q, k, v, g, beta, 2, 0.35, l2norm, 1e-6, chunk=16, method=method), want)


@pytest.mark.parametrize("s, lens, start, method", [
    (1, [4, 9], [3, 8], "auto"),  # decode
    (1, [4, 3], [3, 3], "auto"),  # decode of a finished row: the state stays
    (37, [37, 21], [0, 0], "chunked"),  # prefill with right padding, several chunks
    (37, [37, 21], [0, 0], "recurrent"),
    (5, [12, 9], [7, 7], "chunked"),  # a continuation from a non-zero state
    (5, [12, 9], [7, 7], "recurrent"),
])
@pytest.mark.parametrize("per_channel", [True, False])
def test_cached_delta_rule(s, lens, start, method, per_channel):
    q, k, v, g, beta = delta_inputs(2, s, 2, 8, 6, per_channel, True, seed=5)
    st = rand(2, 2, 8, 6, seed=9) * 0.5
    pos = torch.tensor(start, device=DEV)[:, None] + torch.arange(s, device=DEV)[None, :]
    lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    want_o, want_st = ref.cached_delta_rule(q, k, v, g, beta, st, pos, lens, 2, 0.35, True, 1e-6)
    buf = st.clone()
    got_o, got_st = dr.cached_delta_rule(q, k, v, g, beta, buf, pos, lens, 2, 0.35, True, 1e-6, chunk=16,
                                         method=method)
    assert got_st is buf  # written in place
    close(got_o, want_o)
    close(got_st, want_st)


@pytest.mark.parametrize("s, chunk", [(37, 16), (70, 64)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_chunked_delta_rule_gpu_variant(s, chunk, per_channel, monkeypatch):
    """The GPU's launch run by the interpreter: the forward substitution by reductions, K in slices of 2 for the
    exact per-channel products of a 64-token chunk, 32-wide V blocks."""
    monkeypatch.setattr(dr, "interpreted", lambda device: False)
    q, k, v, g, beta = delta_inputs(2, s, 2, 8, 40, per_channel, True, seed=3)
    st = rand(2, 2, 8, 40, seed=9) * 0.5
    pos = torch.arange(s, device=DEV).repeat(2, 1)
    lens = torch.tensor([s, s - 9], dtype=torch.int32, device=DEV)
    want_o, want_st = ref.cached_delta_rule(q, k, v, g, beta, st, pos, lens, 2, 0.35, True, 1e-6)
    got_o, got_st = dr.cached_delta_rule(q, k, v, g, beta, st.clone(), pos, lens, 2, 0.35, True, 1e-6, chunk=chunk)
    close(got_o, want_o)
    close(got_st, want_st)


def test_delta_rule_strided_views():
    """q, k, v as views into one fused projection output (row stride > width), as the model gives them."""
    b, s, h, dk, dv = 2, 5, 2, 8, 6
    qkv = rand(b, s, h * (2 * dk + dv))
    q, k, v = qkv[..., :h * dk], qkv[..., h * dk:2 * h * dk], qkv[..., 2 * h * dk:]
    _, _, _, g, beta = delta_inputs(b, s, h, dk, dv, True, True)
    want = ref.delta_rule(q, k, v, g, beta, h, 0.35, True, 1e-6)
    for method in ("chunked", "recurrent"):
        close(dr.delta_rule(q, k, v, g, beta, h, 0.35, True, 1e-6, chunk=16, method=method), want)


def test_launchers_through_the_program():
    """The four ops through TritonProgram's launcher table, functional state (a copy) and in place."""
    from lowerlm.codegen.triton.program import LAUNCHERS, Call
    from lowerlm.ir.ops import Op

    class Node:  # only what the launchers read
        results, inputs = (), ()

    q, k, v, g, beta = delta_inputs(2, 5, 2, 8, 6, True, True)
    st = rand(2, 2, 8, 6, seed=9)
    pos = torch.arange(5, device=DEV).repeat(2, 1)
    lens = torch.tensor([5, 3], dtype=torch.int32, device=DEV)
    attrs = {"heads": 2, "scale": 0.35, "l2norm": True, "eps": 1e-6}
    want_o, want_st = ref.cached_delta_rule(q, k, v, g, beta, st, pos, lens, **attrs)
    for inplace in (False, True):
        buf = st.clone()
        c = Call(None, Node(), [q, k, v, g, beta, buf, pos, lens], attrs, {}, inplace, {})
        o, new = LAUNCHERS[Op.CACHED_DELTA_RULE](c)
        close(o, want_o)
        close(new, want_st)
        assert (new is buf) == inplace and (inplace or torch.equal(buf, st))
    c = Call(None, Node(), [q, k, v, g, beta], attrs, {}, False, {})
    close(LAUNCHERS[Op.DELTA_RULE](c), ref.delta_rule(q, k, v, g, beta, **attrs))
    x, w, cst = rand(2, 5, 12), rand(12, 4, seed=1), rand(2, 3, 12, seed=3)
    close(LAUNCHERS[Op.SHORT_CONV](Call(None, Node(), [x, w, None], {"act": "silu"}, {}, False, {})),
          ref.short_conv(x, w, None, "silu"))
    c = Call(None, Node(), [x, w, None, cst.clone(), pos, lens], {"act": "silu"}, {}, False, {})
    for got, want in zip(LAUNCHERS[Op.CACHED_SHORT_CONV](c), ref.cached_short_conv(x, w, None, cst, pos, lens, "silu")):
        close(got, want)


# ---- Kimi shapes on a GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [True, False])
def test_kimi_shapes_gpu(dtype, per_channel):
    """H=32, K=V=128: a prefill of 300 tokens (two rows, one right-padded) from a zero state, then one decode
    step from the prefill's state; the short convolution at C=4096, W=4."""
    b, s, h, d = 2, 300, 32, 128
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    q, k, v, g, beta = delta_inputs(b, s, h, d, d, per_channel, True, dtype=dtype)
    pos = torch.arange(s, device=DEV).repeat(b, 1)
    lens = torch.tensor([s, 211], dtype=torch.int32, device=DEV)
    st = torch.zeros(b, h, d, d, device=DEV)
    scale = d ** -0.5
    want_o, want_st = ref.cached_delta_rule(q, k, v, g, beta, st, pos, lens, h, scale, True, 1e-6)
    got_o, got_st = dr.cached_delta_rule(q, k, v, g, beta, st.clone(), pos, lens, h, scale, True, 1e-6)
    close(got_o, want_o, tol)
    close(got_st, want_st, tol)
    close(dr.delta_rule(q, k, v, g, beta, h, scale, True, 1e-6), ref.delta_rule(q, k, v, g, beta, h, scale, True,
                                                                                1e-6), tol)
    q1, k1, v1, g1, beta1 = delta_inputs(b, 1, h, d, d, per_channel, True, seed=7, dtype=dtype)
    pos1, lens1 = lens[:, None].long(), lens + 1
    want = ref.cached_delta_rule(q1, k1, v1, g1, beta1, want_st, pos1, lens1, h, scale, True, 1e-6)
    got = dr.cached_delta_rule(q1, k1, v1, g1, beta1, want_st.clone(), pos1, lens1, h, scale, True, 1e-6)
    close(got[0], want[0], tol)
    close(got[1], want[1], tol)
    x, w, bias, cst = (t.to(dtype) for t in (rand(b, s, 4096), rand(4096, 4, seed=1), rand(4096, seed=2),
                                            rand(b, 3, 4096, seed=3)))
    with torch.backends.cudnn.flags(allow_tf32=False):  # the reference's conv1d in true f32
        close(dr.short_conv(x, w, bias, "silu"), ref.short_conv(x, w, bias, "silu"), tol)
        for got, want in zip(dr.cached_short_conv(x, w, bias, cst.clone(), pos, lens, "silu"),
                             ref.cached_short_conv(x, w, bias, cst, pos, lens, "silu")):
            close(got, want, tol)
        x1 = x[:, :1]
        for got, want in zip(dr.cached_short_conv(x1, w, bias, cst.clone(), pos1, lens1, "silu"),
                             ref.cached_short_conv(x1, w, bias, cst, pos1, lens1, "silu")):
            close(got, want, tol)
