"""Multi-head latent attention over the latent cache (codegen/triton/mla.py: ``cached_mla_attention``) against
ir/compute.py's references (``mla_absorbed`` and ``cached_mla_attention``) on awkward tiny shapes: L=24, R=4 (every
mask), head counts that are not a multiple of the kernel's block of heads, rows that see part of the cache, right
padding and a row that sees nothing, several splits; in Triton's interpreter without a GPU. The GPU-marked tests
repeat decode at DeepSeek-V3's and Kimi Linear's shapes in bf16 against the reference in f32."""

from __future__ import annotations

import pytest
import torch

from lowerlm.codegen.triton import mla
from lowerlm.ir import compute as ref

from .test_triton import close, rand  # the Triton tests' inputs and tolerance, shared

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mla_inputs(b, s, h, p, r, lat, v, t, seed=0, dtype=torch.float32):
    """q [B,S,H*(P+R)], c [B,1,T,L], k_pe [B,1,T,R], w [H*(P+V),L] (std 1/sqrt(L): scores of order 1 at scale
    (P+R)^-0.5)."""
    q = rand(b, s, h * (p + r), seed=seed)
    c, kpe = rand(b, 1, t, lat, seed=seed + 1), rand(b, 1, t, r, seed=seed + 2)
    w = rand(h * (p + v), lat, seed=seed + 3) * lat ** -0.5
    return tuple(x.to(dtype) for x in (q, c, kpe, w))


def decode_rows(pos, lens):
    return (torch.tensor(pos, device=DEV)[:, None],  # positions [B, 1] i64
            torch.tensor(lens, dtype=torch.int32, device=DEV))


# row 0: the usual decode step (sees slots 0..pos); row 1: a query that sees only part of the valid slots
# (pos < seq_lens - 1); row 2: right padding (pos past seq_lens: sees the row's seq_lens slots); row 3: sees
# nothing (seq_lens 0: zeros); row 4: the whole cache
POS, LENS = [12, 9, 30, 4, 39], [13, 35, 21, 0, 40]


@pytest.mark.parametrize("h", [3, 5, 20])
@pytest.mark.parametrize("splits", [None, 1, 3, 64])
def test_decode_against_the_absorbed_reference(h, splits):
    p, r, lat, v, t = 8, 4, 24, 6, 40
    q, c, kpe, w = mla_inputs(5, 1, h, p, r, lat, v, t)
    pos, lens = decode_rows(POS, LENS)
    scale = (p + r) ** -0.5
    want = ref.mla_absorbed(q, c, kpe, w, pos, lens, h, p, scale)
    got = mla.cached_mla_attention(q, c, kpe, w, pos, lens, h, p, scale, splits=splits)
    close(got, want)
    close(got, ref.cached_mla_attention(q, c, kpe, w, pos, lens, h, p, scale))  # the op's reference, too
    assert got[3].abs().max() == 0  # the row that sees nothing


@pytest.mark.parametrize("block_h", [16, 32])
def test_decode_head_blocks_and_gpu_tiles(block_h, monkeypatch):
    """The GPU's launch run by the interpreter (32-slot blocks, splits for 132 SMs), blocks of 16 and 32 heads over
    H=37 (three blocks, the last partial; one and a partial)."""
    monkeypatch.setattr(mla, "interpreted", lambda device: False)
    h, p, r, lat, v, t = 37, 8, 4, 24, 6, 40
    q, c, kpe, w = mla_inputs(5, 1, h, p, r, lat, v, t, seed=5)
    pos, lens = decode_rows(POS, LENS)
    want = ref.mla_absorbed(q, c, kpe, w, pos, lens, h, p, 0.3)
    close(mla.mla_decode(q, c, kpe, w, pos, lens, h, p, 0.3, block_h=block_h), want)


def test_decode_without_rotary_key_and_other_value_width():
    """R = 0 (no shared rotary key: the kernel skips its dot), V > P, L a power of two."""
    h, p, r, lat, v, t = 3, 4, 0, 16, 12, 21
    q, c, kpe, w = mla_inputs(2, 1, h, p, r, lat, v, t, seed=2)
    pos, lens = decode_rows([20, 7], [21, 5])
    close(mla.cached_mla_attention(q, c, kpe, w, pos, lens, h, p, 0.5),
          ref.mla_absorbed(q, c, kpe, w, pos, lens, h, p, 0.5))


def test_decode_strided_query_and_caches():
    """q a view into a wider projection output (row stride > width); caches that are views of larger buffers
    (batch stride > T*L), as a runtime slicing its state might pass them."""
    h, p, r, lat, v, t = 3, 8, 4, 24, 6, 40
    q, c, kpe, w = mla_inputs(3, 1, h, p, r, lat, v, t, seed=7)
    wide = rand(3, 1, h * (p + r) + 10, seed=8)
    wide[..., 5:5 + h * (p + r)] = q
    qv = wide[..., 5:5 + h * (p + r)]
    cbig, kbig = rand(3, 2, t, lat, seed=9), rand(3, 2, t, r, seed=10)
    cbig[:, :1], kbig[:, :1] = c, kpe
    pos, lens = decode_rows([12, 30, 39], [13, 21, 40])
    close(mla.cached_mla_attention(qv, cbig[:, :1], kbig[:, :1], w, pos, lens, h, p, 0.3),
          ref.mla_absorbed(q, c, kpe, w, pos, lens, h, p, 0.3))


def test_decode_bf16_in_the_interpreter():
    h, p, r, lat, v, t = 5, 8, 4, 24, 6, 40
    q, c, kpe, w = mla_inputs(5, 1, h, p, r, lat, v, t, seed=3)
    pos, lens = decode_rows(POS, LENS)
    want = ref.mla_absorbed(q, c, kpe, w, pos, lens, h, p, 0.3)
    got = mla.cached_mla_attention(*(x.bfloat16() for x in (q, c, kpe, w)), pos, lens, h, p, 0.3)
    assert got.dtype == torch.bfloat16
    close(got, want, 2e-2)


@pytest.mark.parametrize("s, lens, start", [(5, [5, 3], [0, 0]), (5, [12, 9], [7, 7]), (3, [40, 2], [37, 0]),
                                            (2, [1, 0], [0, 0])])
def test_several_queries_against_the_naive_reference(s, lens, start):
    """Prefill with right padding, chunked prefill continuing at positions > 0, a row that sees nothing."""
    h, p, r, lat, v, t = 3, 8, 4, 24, 6, 40
    q, c, kpe, w = mla_inputs(2, s, h, p, r, lat, v, t, seed=4)
    pos = torch.tensor(start, device=DEV)[:, None] + torch.arange(s, device=DEV)[None, :]
    lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    want = ref.cached_mla_attention(q, c, kpe, w, pos, lens, h, p, 0.3)
    close(mla.cached_mla_attention(q, c, kpe, w, pos, lens, h, p, 0.3), want)
    close(want, ref.mla_absorbed(q, c, kpe, w, pos, lens, h, p, 0.3))  # the two forms agree


def test_launcher_through_the_program():
    from lowerlm.codegen.triton.program import LAUNCHERS, Call
    from lowerlm.ir.ops import Op

    class Node:  # only what the launchers read
        results, inputs = (), ()

    attrs = {"heads": 5, "nope": 8, "scale": 0.3}
    for s, (pos, lens) in ((1, decode_rows(POS, LENS)),
                           (4, (torch.arange(4, device=DEV).repeat(5, 1), torch.tensor([4, 3, 4, 0, 2], device=DEV,
                                                                                         dtype=torch.int32)))):
        q, c, kpe, w = mla_inputs(5, s, 5, 8, 4, 24, 6, 40, seed=6)
        got = LAUNCHERS[Op.CACHED_MLA_ATTENTION](Call(None, Node(), [q, c, kpe, w, pos, lens], attrs, {}, False, {}))
        close(got, ref.cached_mla_attention(q, c, kpe, w, pos, lens, **attrs))


# ---- DeepSeek-V3 and Kimi Linear shapes on a GPU ------------------------------------------------------------------
@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("h, b", [(128, 1), (128, 8), (32, 1), (32, 8)], ids=["v3-b1", "v3-b8", "kimi-b1", "kimi-b8"])
def test_decode_real_shapes_gpu(h, b):
    """Decode in bf16 at P=128, R=64, L=512, V=128 over a 4096-slot cache with seq_lens about 3000 (one row seeing
    only part of its slots, one right-padded), against the reference in f32."""
    p, r, lat, v, t = 128, 64, 512, 128, 4096
    q, c, kpe, w = mla_inputs(b, 1, h, p, r, lat, v, t, dtype=torch.bfloat16)
    lens = torch.tensor([3000 - 37 * i for i in range(b)], dtype=torch.int32, device=DEV)
    pos = (lens.long() - 1)[:, None]
    if b > 1:
        pos[1] -= 500  # sees only part of its slots
        pos[2] += 300  # right padding: sees its seq_lens slots
    scale = (p + r) ** -0.5
    want = ref.mla_absorbed(*(x.float() for x in (q, c, kpe, w)), pos, lens, h, p, scale)
    got = mla.cached_mla_attention(q, c, kpe, w, pos, lens, h, p, scale)
    torch.cuda.synchronize()
    close(got, want, 2e-2)
    for splits in (1, 7):
        close(mla.cached_mla_attention(q, c, kpe, w, pos, lens, h, p, scale, splits=splits), want, 2e-2)


@pytest.mark.gpu
@GPU
def test_chunked_prefill_real_shapes_gpu():
    """A 64-token chunk continuing two rows (one right-padded) at DeepSeek-V3's shapes, bf16 against f32."""
    b, s, h, p, r, lat, v, t = 2, 64, 128, 128, 64, 512, 128, 4096
    q, c, kpe, w = mla_inputs(b, s, h, p, r, lat, v, t, dtype=torch.bfloat16)
    pos = torch.tensor([[2000], [1000]], device=DEV) + torch.arange(s, device=DEV)[None, :]
    lens = torch.tensor([2064, 1040], dtype=torch.int32, device=DEV)
    scale = (p + r) ** -0.5
    want = ref.cached_mla_attention(*(x.float() for x in (q, c, kpe, w)), pos, lens, h, p, scale)
    close(mla.cached_mla_attention(q, c, kpe, w, pos, lens, h, p, scale), want, 2e-2)
