"""Lowerings of multi-head latent attention (``mla_expand``, ``mla_attention``, ``cached_mla_attention``) into
standard ONNX ops, with ``ir/compute.py``'s semantics.

w [H*(P+V), L] holds, per head h, the P key rows W_UK_h [P, L] and then the V value rows W_UV_h [V, L].

``mla_expand`` is c @ w.T (w as it is, never quantized: prefill's expansion and decode's absorbed views of it must
be the same weight), split per head
into the non-rotary keys and the values, the shared rotary key k_pe broadcast over the heads and concatenated after
each head's non-rotary part. ``mla_attention`` is that expansion read by ``attention``'s lowering.

``cached_mla_attention`` takes two forms, chosen by the graph:

- one token per row (decode, S = 1 in the type): the absorbed form, which never expands the cache. W_UK is folded
  into the query (q_lat_h = q_nope_h @ W_UK_h), the scores are q_lat . c_t + q_pe . k_pe_t over the cache's first
  max(seq_lens) slots, times the scale, masked (t < seq_lens, t <= position) and normalised in f32; the latent
  output probs @ c goes through W_UV_h.T. The products run with the cache on the left ([T, L] @ [L, H]) and the
  weights on the right, so no cache-sized tensor is transposed or copied; the views W_UK [H, P, L] and W_UV.T
  [H, L, V] are Reshape + Slice (+ Transpose) of w, which ONNX Runtime folds once at session creation when w is an
  initializer (a param: ``Lowering.weight``).
- several tokens (prefill, chunked prefill; S free): the naive form: keys [B, H, T', P+R] and values [B, H, T', V]
  expanded from the cache's first T' = max(seq_lens) slots, then ``cached_attention``'s lowering over them.
"""

from __future__ import annotations

from dataclasses import replace

from lowerlm.ir.dtypes import DType
from lowerlm.ir.ops import Op

_END = 2 ** 62


def _dims(c) -> tuple:
    """(heads H, nope P, rope R, value dim V, latent L) of an MLA call (w is input 2 of mla_expand, 3 otherwise)."""
    h, p = c.a["heads"], c.a["nope"]
    wt = c.ins[2] if c.op is Op.MLA_EXPAND else c.ins[3]
    rows, lat = wt.shape
    r = c.ins[1].shape[-1] if c.op is Op.MLA_EXPAND else c.ins[2].shape[-1]
    return h, p, r, rows // h - p, lat


def _transposed(lw, w: str) -> str:
    """w.T [L, H*(P+V)], made once per weight (folded by ONNX Runtime when w is an initializer)."""
    key = ("mla-wt", w)
    if key not in lw._memo:
        lw._memo[key] = lw.op("Transpose", [w], perm=[1, 0])
    return lw._memo[key]


def _expand(lw, c_lat: str, k_pe: str, w: str, h: int, p: int, r: int, v: int) -> tuple:
    """(k [B, S, H, P+R], v [B, S, H, V]) from the latent c [B, S, L] and k_pe [B, S, R]."""
    kv = lw.op("Reshape", [lw.op("MatMul", [c_lat, _transposed(lw, w)]), lw.const([0, 0, h, p + v])])
    k_nope, values = lw.op("Split", [kv, lw.const([p, v])], 2, axis=-1)
    k_rope = lw.op("Expand", [lw.op("Unsqueeze", [k_pe, lw.const([2])]), lw.const([1, 1, h, 1])])  # [B, S, H, R]
    return lw.op("Concat", [k_nope, k_rope], axis=-1), values


def mla_expand(lw, c) -> list:
    c_lat, k_pe, w = c.x
    h, p, r, v, _ = _dims(c)
    k, values = _expand(lw, c_lat, k_pe, w, h, p, r, v)
    return [lw.op("Reshape", [k, lw.const([0, 0, h * (p + r)])]), lw.op("Reshape", [values, lw.const([0, 0, h * v])])]


def mla_attention(lw, c) -> str:
    q, c_lat, k_pe, w, positions, seq_lens = c.x
    qt, ct, _, _, pt, lt = c.ins
    h, p, r, v, _ = _dims(c)
    b, s = ct.shape[0], ct.shape[1]
    k, values = mla_expand(lw, replace(c, op=Op.MLA_EXPAND, x=[c_lat, k_pe, w], a={"heads": h, "nope": p},
                                       ins=c.ins[1:4], outs=[], node=None))
    kt, vt = ct.with_shape((b, s, h * (p + r))), ct.with_shape((b, s, h * v))
    attrs = {"heads": (h, h), "scale": c.a["scale"], "causal": True, "window": 0, "softcap": 0.0}
    return lw.emit(replace(c, op=Op.ATTENTION, x=[q, k, values, positions, seq_lens, None], a=attrs,
                           ins=[qt, kt, vt, pt, lt, None], node=None))


def cached_mla_attention(lw, c) -> str:
    if c.ins[0].shape[1] == 1:
        return _absorbed(lw, c)
    return _naive(lw, c)


def _length(lw, seq_lens: str) -> str:
    """max(1, max(seq_lens)) as int64 [1]: the cache slots any row can see (made once per graph)."""
    key = ("mla-len", seq_lens)
    if key not in lw._memo:
        longest = lw.op("ReduceMax", [lw.cast(seq_lens, DType.I64)], keepdims=1)
        lw._memo[key] = lw.op("Max", [longest, lw.const([1])])
    return lw._memo[key]


def _slots(lw, cache: str, length: str) -> str:
    """The cache's first ``length`` slots: [B, 1, T, D] -> [B, 1, T', D]."""
    return lw.op("Slice", [cache, lw.const([0]), length, lw.const([2])])


def _naive(lw, c) -> str:
    """Keys and values expanded from the cached latents, then ``cached_attention``."""
    q, cc, kc, w, positions, seq_lens = c.x
    qt, cct, _, _, pt, lt = c.ins
    h, p, r, v, lat = _dims(c)
    length = _length(lw, seq_lens)
    c_lat = lw.op("Squeeze", [_slots(lw, cc, length), lw.const([1])])  # [B, T', L]
    k_pe = lw.op("Squeeze", [_slots(lw, kc, length), lw.const([1])])  # [B, T', R]
    k, values = _expand(lw, c_lat, k_pe, w, h, p, r, v)
    k4, v4 = (lw.op("Transpose", [x], perm=[0, 2, 1, 3]) for x in (k, values))  # [B, H, T', D]
    b, _, t, _ = cct.shape
    kt, vt = cct.with_shape((b, h, t, p + r)), cct.with_shape((b, h, t, v))
    attrs = {"scale": c.a["scale"], "causal": True, "window": 0, "softcap": 0.0}
    return lw.emit(replace(c, op=Op.CACHED_ATTENTION, x=[q, k4, v4, positions, seq_lens, None], a=attrs,
                           ins=[qt, kt, vt, pt, lt, None], node=None))


def _weights(lw, w: str, h: int, p: int, v: int, lat: int) -> tuple:
    """(W_UK [H, P, L], W_UV transposed [H, L, V]): views of w, made once per weight."""
    key = ("mla-w", w, h, p)
    if key not in lw._memo:
        wh = lw.op("Reshape", [w, lw.const([h, p + v, lat])])
        axes = lw.const([1])
        w_uk = lw.op("Slice", [wh, lw.const([0]), lw.const([p]), axes])
        w_uv = lw.op("Transpose", [lw.op("Slice", [wh, lw.const([p]), lw.const([_END]), axes])], perm=[0, 2, 1])
        lw._memo[key] = (w_uk, w_uv)
    return lw._memo[key]


def _decode_mask(lw, positions: str, seq_lens: str, length: str) -> str:
    """[B, 1, 1, T'] bool: slot t visible to the row's one token (t < seq_lens, t <= position); once per graph."""
    key = ("mla-mask", positions, seq_lens)
    if key not in lw._memo:
        slots = lw.op("Range", [lw.const(0), lw.op("Squeeze", [length]), lw.const(1)])  # [T']
        lens = lw.op("Unsqueeze", [lw.cast(seq_lens, DType.I64), lw.const([1])])  # [B, 1]
        vis = lw.op("And", [lw.op("Less", [slots, lens]), lw.op("LessOrEqual", [slots, positions])])  # [B, T']
        lw._memo[key] = lw.op("Unsqueeze", [vis, lw.const([1, 2])])
    return lw._memo[key]


def _absorbed(lw, c) -> str:
    """One token per row: W_UK folded into the query, scores against the latents, W_UV after the latent output."""
    q, cc, kc, w, positions, seq_lens = c.x
    qt = c.ins[0]
    dtype = qt.dtype
    h, p, r, v, lat = _dims(c)
    w_uk, w_uv = _weights(lw, w, h, p, v, lat)
    length = _length(lw, seq_lens)
    c_lat, k_pe = _slots(lw, cc, length), _slots(lw, kc, length)  # [B, 1, T', L], [B, 1, T', R]
    q_nope, q_pe = lw.op("Split", [lw.op("Reshape", [q, lw.const([0, h, 1, p + r])]), lw.const([p, r])], 2,
                         axis=-1)  # [B, H, 1, P], [B, H, 1, R]
    q_lat = lw.op("MatMul", [q_nope, w_uk])  # [B, H, 1, L]
    # scores with the cache on the left: [B, 1, T', L] @ [B, 1, L, H] -> [B, 1, T', H]
    scores = lw.op("Add", [lw.op("MatMul", [c_lat, lw.op("Transpose", [q_lat], perm=[0, 2, 3, 1])]),
                           lw.op("MatMul", [k_pe, lw.op("Transpose", [q_pe], perm=[0, 2, 3, 1])])])
    scores = lw.op("Mul", [lw.op("Transpose", [scores], perm=[0, 1, 3, 2]), lw.scalar(c.a["scale"], dtype)])
    if dtype != DType.F32:
        scores = lw.cast(scores, DType.F32)
    vis = _decode_mask(lw, positions, seq_lens, length)  # [B, 1, 1, T']
    masked = lw.op("Where", [vis, scores, lw.scalar(-1e30, DType.F32)])
    # the mask zeroes the weights of a row that sees no slot (its softmax is uniform over hidden scores)
    probs = lw.op("Mul", [lw.op("Softmax", [masked], axis=-1), lw.cast(vis, DType.F32)])  # [B, 1, H, T']
    if dtype != DType.F32:
        probs = lw.cast(probs, dtype)
    o_lat = lw.op("MatMul", [probs, c_lat])  # [B, 1, H, L]
    out = lw.op("MatMul", [lw.op("Reshape", [o_lat, lw.const([0, h, 1, lat])]), w_uv])  # [B, H, 1, V]
    return lw.op("Reshape", [out, lw.const([0, 1, h * v])])
