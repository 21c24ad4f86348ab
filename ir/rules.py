"""Result rules of the op table: from the input types and the attributes (defaults filled in), the result
types, or a ShapeError saying what does not fit."""

from __future__ import annotations

from lowerlm.ir.abi import SILU
from lowerlm.ir.dtypes import DType
from lowerlm.ir.errors import ShapeError
from lowerlm.ir.shapes import Sym, numel
from lowerlm.ir.types import TensorType


# ---- helpers for result rules ---------------------------------------------------------------------------------
def _fail(msg: str):
    raise ShapeError(msg)


def _axis(dim: int, rank: int, what: str = "dim") -> int:
    if not -rank <= dim < max(rank, 1):
        _fail(f"{what} {dim} out of range for rank {rank}")
    return dim % rank if rank else 0


def _same_dtype(*types: TensorType) -> None:
    if len({t.dtype for t in types}) > 1:
        _fail("operand dtypes differ: " + ", ".join(str(t) for t in types) + " (insert a cast)")


def _float(t: TensorType, what: str) -> None:
    if not t.dtype.is_float:
        _fail(f"{what} must be a float tensor, got {t}")


def _int(t: TensorType, what: str) -> None:
    if not t.dtype.is_int:
        _fail(f"{what} must be an integer tensor, got {t}")


def broadcast_shapes(a: tuple, b: tuple) -> tuple:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            _fail(f"shapes {list(map(str, a))} and {list(map(str, b))} do not broadcast")
    return tuple(reversed(out))


def _split_heads(width, heads: int, what: str):
    if heads <= 0:
        _fail(f"{what}: heads must be positive")
    if isinstance(width, Sym) or width % heads:
        _fail(f"{what}: width {width} is not a multiple of {heads} heads")
    return width // heads


def _positions(pos: TensorType, b, s) -> None:
    _int(pos, "positions")
    if pos.shape != (b, s):
        _fail(f"positions must be [{b},{s}], got {pos}")


def _seq_lens(lens: TensorType, b) -> None:
    _int(lens, "seq_lens")
    if lens.shape != (b,):
        _fail(f"seq_lens must be [{b}], got {lens}")


def _tokens(t: TensorType, what: str):
    if t.rank != 3:
        _fail(f"{what} must be [B, S, H*D], got {t}")
    return t.shape


# ---- result rules -------------------------------------------------------------------------------------------
def binary(ts, a):
    _same_dtype(ts[0], ts[1])
    return [TensorType(ts[0].dtype, broadcast_shapes(ts[0].shape, ts[1].shape))]


def compare(ts, a):
    _same_dtype(ts[0], ts[1])
    return [TensorType(DType.BOOL, broadcast_shapes(ts[0].shape, ts[1].shape))]


def where(ts, a):
    cond, x, y = ts
    if cond.dtype is not DType.BOOL:
        _fail(f"where's condition must be a bool tensor, got {cond}")
    _same_dtype(x, y)
    return [TensorType(x.dtype, broadcast_shapes(cond.shape, broadcast_shapes(x.shape, y.shape)))]


def unary_float(ts, a):
    _float(ts[0], "operand")
    return [ts[0]]


def constant(ts, a):
    values = a["value"]
    n = numel(tuple(a["shape"]))
    if isinstance(values, tuple) and len(values) != n:
        _fail(f"constant has {len(values)} values for shape {list(a['shape'])}")
    if any(d < 0 for d in a["shape"]):
        _fail("constant shape has a negative dimension")
    return [TensorType(a["dtype"], tuple(a["shape"]))]


def arange(ts, a):
    start, end, step = a["start"], a["end"], a["step"]
    if step <= 0:
        _fail(f"arange step must be positive, got {step}")
    n = end - start if step == 1 else (end - start + step - 1) // step
    if isinstance(n, int) and n < 0:
        _fail(f"arange from {start} to {end} is empty backwards")
    return [TensorType(a["dtype"], (n,))]


def reduce(ts, a):
    t = ts[0]
    dims = {_axis(d, t.rank) for d in a["dims"]}
    if len(dims) != len(a["dims"]):
        _fail("reduction dims repeat")
    shape = tuple(1 if i in dims else d for i, d in enumerate(t.shape) if a["keepdim"] or i not in dims)
    return [t.with_shape(shape)]


def softmax(ts, a):
    _float(ts[0], "softmax operand")
    _axis(a["dim"], ts[0].rank)
    return [ts[0]]


def argmax(ts, a):
    t = ts[0]
    ax = _axis(a["dim"], t.rank)
    shape = tuple(1 if i == ax else d for i, d in enumerate(t.shape) if a["keepdim"] or i != ax)
    return [TensorType(DType.I64, shape)]


def topk(ts, a):
    t = ts[0]
    ax = _axis(a["dim"], t.rank)
    k = a["k"]
    if k < 1 or (isinstance(t.shape[ax], int) and k > t.shape[ax]):
        _fail(f"topk k={k} does not fit dimension {t.shape[ax]}")
    shape = t.shape[:ax] + (k,) + t.shape[ax + 1:]
    return [t.with_shape(shape), TensorType(DType.I64, shape)]


def sort(ts, a):
    t = ts[0]
    _axis(a["dim"], t.rank)
    return [t, TensorType(DType.I64, t.shape)]


def reshape(ts, a):
    shape = tuple(a["shape"])
    if any(isinstance(d, int) and d < 0 for d in shape):
        _fail(f"reshape target {list(map(str, shape))} has a negative dimension")
    if numel(shape) != ts[0].numel:
        _fail(f"reshape of {ts[0]} to [{','.join(map(str, shape))}] changes the element count")
    return [ts[0].with_shape(shape)]


def transpose(ts, a):
    perm = tuple(a["perm"])
    if sorted(perm) != list(range(ts[0].rank)):
        _fail(f"perm {list(perm)} is not a permutation of {ts[0].rank} axes")
    return [ts[0].with_shape(tuple(ts[0].shape[p] for p in perm))]


def expand(ts, a):
    shape = tuple(a["shape"])
    if len(shape) < ts[0].rank or broadcast_shapes(ts[0].shape, shape) != shape:
        _fail(f"cannot expand {ts[0]} to [{','.join(map(str, shape))}]")
    return [ts[0].with_shape(shape)]


def concat(ts, a):
    if not ts:
        _fail("concat needs at least one operand")
    first = ts[0]
    ax = _axis(a["dim"], first.rank)
    total = 0
    for t in ts:
        _same_dtype(first, t)
        if t.rank != first.rank or any(x != y for i, (x, y) in enumerate(zip(t.shape, first.shape)) if i != ax):
            _fail(f"concat operands {first} and {t} differ outside dim {a['dim']}")
        total = total + t.shape[ax]
    return [first.with_shape(first.shape[:ax] + (total,) + first.shape[ax + 1:])]


def split(ts, a):
    t = ts[0]
    ax = _axis(a["dim"], t.rank)
    sizes = tuple(a["sizes"])
    if not sizes:
        _fail("split needs at least one size")
    if sum(sizes) != t.shape[ax]:
        _fail(f"split sizes {list(map(str, sizes))} do not add up to {t.shape[ax]}")
    return [t.with_shape(t.shape[:ax] + (s,) + t.shape[ax + 1:]) for s in sizes]


def slice(ts, a):
    t = ts[0]
    ax = _axis(a["dim"], t.rank)
    start, end, step = a["start"], a["end"], a["step"]
    if step < 1:
        _fail(f"slice step must be positive, got {step}")
    if isinstance(start, int) and start < 0 or isinstance(end, int) and end < 0:
        _fail("slice bounds must be non-negative")
    size = t.shape[ax]
    if all(isinstance(x, int) for x in (start, end, size)) and not start <= end <= size:
        _fail(f"slice [{start}:{end}] out of range for size {size}")
    length = (end - start + step - 1) // step
    return [t.with_shape(t.shape[:ax] + (length,) + t.shape[ax + 1:])]


def gather(ts, a):
    x, idx = ts
    _int(idx, "gather index")
    if x.rank != idx.rank:
        _fail(f"gather index rank {idx.rank} differs from operand rank {x.rank}")
    _axis(a["dim"], x.rank)
    return [TensorType(x.dtype, idx.shape)]


def scatter(ts, a):
    x, idx, src = ts
    _int(idx, "scatter index")
    if not (x.rank == idx.rank == src.rank) or idx.shape != src.shape:
        _fail(f"scatter of {src} at index {idx} into {x}: index and src must have x's rank and one shape")
    _axis(a["dim"], x.rank)
    _same_dtype(x, src)
    return [x]


def embedding(ts, a):
    w, ids = ts
    _int(ids, "token ids")
    if w.rank != 2:
        _fail(f"embedding table must be [V, H], got {w}")
    return [TensorType(w.dtype, ids.shape + (w.shape[1],))]


def linear(ts, a):
    x, w, bias, residual = ts
    if x.rank < 1 or w.rank != 2 or x.shape[-1] != w.shape[1]:
        _fail(f"linear of {x} by weight {w} (expected [N, {x.shape[-1] if x.rank else '?'}])")
    _same_dtype(x, w)
    out = x.with_shape(x.shape[:-1] + (w.shape[0],))
    if bias is not None and (bias.shape != (w.shape[0],) or bias.dtype != x.dtype):
        _fail(f"linear bias {bias} does not match {w.shape[0]} outputs")
    if residual is not None and residual != out:
        _fail(f"linear residual {residual} does not match result {out}")
    return [out]


def matmul(ts, a):
    x, y = ts
    if x.rank < 2 or y.rank < 2 or x.shape[-1] != y.shape[-2]:
        _fail(f"matmul of {x} and {y}: inner dimensions do not match")
    _same_dtype(x, y)
    batch = broadcast_shapes(x.shape[:-2], y.shape[:-2])
    return [x.with_shape(batch + (x.shape[-2], y.shape[-1]))]


def rms_norm(ts, a):
    x, w = ts
    _float(x, "rms_norm input")
    if x.rank < 1 or w.shape != (x.shape[-1],):
        _fail(f"rms_norm weight {w} does not match the last dimension of {x}")
    _same_dtype(x, w)
    return [x]


def rope(ts, a):
    q, k, pos = ts
    hq, hk = _two_heads(a)
    bq, sq, _ = _tokens(q, "rope q")
    if _tokens(k, "rope k")[:2] != (bq, sq):
        _fail(f"rope q {q} and k {k} differ in batch or sequence")
    dq = _split_heads(q.shape[2], hq, "rope q")
    dk = _split_heads(k.shape[2], hk, "rope k")
    if dq != dk:
        _fail(f"rope q head dim {dq} differs from k head dim {dk}")
    if not a["inv_freq"] or 2 * len(a["inv_freq"]) > dq:
        _fail(f"rope inv_freq has {len(a['inv_freq'])} values; the rotary dim must be in (0, {dq}]")
    _float(q, "rope q")
    _same_dtype(q, k)
    _positions(pos, bq, sq)
    return [q, k]


def _two_heads(a):
    heads = a["heads"]
    if len(heads) != 2:
        _fail(f"heads must be [query heads, kv heads], got {list(heads)}")
    hq, hk = heads
    if hk <= 0 or hq <= 0 or hq % hk:
        _fail(f"query heads {hq} must be a positive multiple of kv heads {hk}")
    return hq, hk


def attention(ts, a):
    q, k, v, pos, lens, sinks = ts
    hq, hk = _two_heads(a)
    b, s, _ = _tokens(q, "attention q")
    for t, what in ((k, "k"), (v, "v")):
        if _tokens(t, f"attention {what}")[:2] != (b, s):
            _fail(f"attention {what} {t} differs from q {q} in batch or sequence")
    if _split_heads(q.shape[2], hq, "attention q") != _split_heads(k.shape[2], hk, "attention k"):
        _fail(f"attention q {q} and k {k} head dims differ")
    dv = _split_heads(v.shape[2], hk, "attention v")
    _same_dtype(q, k, v)
    _positions(pos, b, s)
    _seq_lens(lens, b)
    _window(a)
    _sinks(sinks, hq)
    return [q.with_shape((b, s, hq * dv))]


def _window(a):
    if a["window"] < 0:
        _fail(f"window must be >= 0 (0: none), got {a['window']}")
    if a["softcap"] < 0:
        _fail(f"softcap must be >= 0 (0: none), got {a['softcap']}")


def _sinks(sinks, hq) -> None:
    if sinks is not None and (sinks.shape != (hq,) or not sinks.dtype.is_float):
        _fail(f"sinks {sinks} must be float [{hq}], one logit per query head")


def _cache(t: TensorType, what: str):
    if t.rank != 4:
        _fail(f"{what} must be [B, Hkv, T, D], got {t}")
    return t.shape


def kv_cache_write(ts, a):
    cache, new, pos = ts
    b, hk, _, d = _cache(cache, "kv cache")
    nb, ns, width = _tokens(new, "kv_cache_write values")
    if nb != b or width != hk * d:
        _fail(f"values {new} do not fit cache {cache} (expected [{b}, S, {hk * d}])")
    _same_dtype(cache, new)
    _positions(pos, b, ns)
    return [cache]


def cached_attention(ts, a):
    q, kc, vc, pos, lens, sinks = ts
    b, hk, t, d = _cache(kc, "key cache")
    vb, vh, vt, dv = _cache(vc, "value cache")
    if (vb, vh, vt) != (b, hk, t):
        _fail(f"value cache {vc} does not match key cache {kc}")
    qb, s, width = _tokens(q, "cached_attention q")
    if qb != b:
        _fail(f"q {q} and cache {kc} differ in batch")
    hq = _split_heads(width, d, "cached_attention q") if isinstance(d, int) else _fail("head dim must be static")
    if hq % hk:
        _fail(f"query heads {hq} must be a multiple of kv heads {hk}")
    _same_dtype(q, kc, vc)
    _positions(pos, b, s)
    _seq_lens(lens, b)
    _window(a)
    _sinks(sinks, hq)
    return [q.with_shape((b, s, hq * dv))]


def _conv(x, w, bias, what: str):
    b, s, c = _tokens(x, f"{what} x")
    _float(x, f"{what} x")
    if w.rank != 2 or w.shape[0] != c or not isinstance(w.shape[1], int) or w.shape[1] < 1:
        _fail(f"{what} weight {w} must be [{c}, W] (one filter of static width W per channel)")
    if bias is not None and bias.shape != (c,):
        _fail(f"{what} bias {bias} must be [{c}]")
    _same_dtype(*[t for t in (x, w, bias) if t is not None])
    return b, s, c, w.shape[1]


def short_conv(ts, a):
    x, w, bias = ts
    _conv(x, w, bias, "short_conv")
    return [x]


def cached_short_conv(ts, a):
    x, w, bias, state, pos, lens = ts
    b, s, c, width = _conv(x, w, bias, "cached_short_conv")
    if state.shape != (b, width - 1, c) or state.dtype != x.dtype:
        _fail(f"conv state {state} must be {x.dtype}[{b},{width - 1},{c}] (the last W-1 inputs)")
    _positions(pos, b, s)
    _seq_lens(lens, b)
    return [x, state]


def _delta(q, k, v, g, beta, a, what: str):
    b, s, width = _tokens(q, f"{what} q")
    heads = a["heads"]
    dk = _split_heads(width, heads, f"{what} q")
    if k.shape != q.shape:
        _fail(f"{what} k {k} must be shaped like q {q}")
    if _tokens(v, f"{what} v")[:2] != (b, s):
        _fail(f"{what} v {v} differs from q {q} in batch or sequence")
    dv = _split_heads(v.shape[2], heads, f"{what} v")
    if g.shape not in ((b, s, heads * dk), (b, s, heads)):
        _fail(f"{what} g {g} must be [{b},{s},{heads * dk}] (per channel) or [{b},{s},{heads}] (per head)")
    if beta.shape != (b, s, heads):
        _fail(f"{what} beta {beta} must be [{b},{s},{heads}]")
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (g, "g"), (beta, "beta")):
        _float(t, f"{what} {name}")
    _same_dtype(q, k, v)
    return b, s, heads, dk, dv


def delta_rule(ts, a):
    q, k, v, g, beta = ts
    b, s, heads, _, dv = _delta(q, k, v, g, beta, a, "delta_rule")
    return [q.with_shape((b, s, heads * dv))]


def cached_delta_rule(ts, a):
    q, k, v, g, beta, state, pos, lens = ts
    b, s, heads, dk, dv = _delta(q, k, v, g, beta, a, "cached_delta_rule")
    if state.shape != (b, heads, dk, dv) or state.dtype != DType.F32:
        _fail(f"delta-rule state {state} must be f32[{b},{heads},{dk},{dv}]")
    _positions(pos, b, s)
    _seq_lens(lens, b)
    return [q.with_shape((b, s, heads * dv)), state]


def rms_norm_linear(ts, a):
    x, nw, w, bias, residual = ts
    _float(x, "rms_norm_linear input")
    h = x.shape[-1] if x.rank else None
    if x.rank < 1 or nw.shape != (h,) or w.rank != 2 or w.shape[1] != h:
        _fail(f"rms_norm_linear of {x} with norm weight {nw} and weight {w} (expected [H] and [N, {h}])")
    _same_dtype(x, nw, w)
    splits = tuple(a["splits"])
    if not splits or sum(splits) != w.shape[0]:
        _fail(f"splits {list(splits)} do not add up to the weight's {w.shape[0]} rows")
    if bias is not None and (bias.shape != (w.shape[0],) or bias.dtype != x.dtype):
        _fail(f"rms_norm_linear bias {bias} does not match {w.shape[0]} outputs")
    if residual is not None and residual != x:
        _fail(f"rms_norm_linear residual {residual} does not match input {x}")
    if a["act"] != "none":
        if len(splits) != 2 or splits[0] != splits[1]:
            _fail(f"a swiglu epilogue needs two equal splits (gate, up), got {list(splits)}")
        splits = splits[:1]
    out = [x.with_shape(x.shape[:-1] + (n,)) for n in splits]
    return out + ([x] if residual is not None else [])


def swiglu(ts, a):
    gate, up = ts
    _float(gate, "swiglu gate")
    if gate != up:
        _fail(f"swiglu gate {gate} and up {up} differ")
    return [gate]


def arm_mlp(ts, a):
    x, nw, wgm, wu, wd, mu, scale, residual = ts
    _float(x, "arm_mlp input")
    h = x.shape[-1] if x.rank else None
    if wu.rank != 2 or wu.shape[1] != h or nw.shape != (h,):
        _fail(f"arm_mlp up weight {wu} or norm weight {nw} does not fit input {x}")
    i = wu.shape[0]
    if wgm.shape != (i + h, h) or wd.shape != (h, i) or mu.shape != (i,) or scale.shape != (i,):
        _fail(f"arm_mlp weights do not fit: [W_g; M] {wgm}, down {wd}, mu {mu}, scale {scale} for I={i}, H={h}")
    _same_dtype(x, nw, wgm, wu, wd, mu, scale)
    if a["tau"] < 0:
        _fail(f"arm_mlp tau must be >= 0, got {a['tau']}")
    if residual is not None and residual != x:
        _fail(f"arm_mlp residual {residual} does not match input {x}")
    return [x]


# ---- MoE ------------------------------------------------------------------------------------------------------
def _router(x, router, bias, a):
    _float(x, "moe input")
    h = x.shape[-1] if x.rank else None
    if router.rank != 2 or router.shape[1] != h:
        _fail(f"moe router weight {router} does not fit input {x} (expected [E, {h}])")
    e = router.shape[0]
    if bias is not None and bias.shape != (e,):
        _fail(f"moe correction bias {bias} does not match {e} experts")
    k, groups, keep = a["top_k"], a["n_group"], a["topk_group"]
    if isinstance(e, int) and not (1 <= k <= e and groups >= 1 and e % groups == 0 and 1 <= keep <= groups
                                   and k <= keep * (e // groups)):
        _fail(f"moe routing of top {k} of {e} experts in {groups} groups keeping {keep} is impossible")
    return e


def moe(ts, a):
    x, router, bias, gate_up, down, sg, su, sd = ts
    e = _router(x, router, bias, a)
    h = x.shape[-1]
    if gate_up.rank != 3 or gate_up.shape[0] != e or gate_up.shape[2] != h or down.rank != 3 or \
            down.shape[:2] != (e, h) or gate_up.shape[1] != 2 * down.shape[2]:
        _fail(f"moe experts {gate_up} (gate|up) and {down} (down) do not fit {e} experts of input {x}")
    _same_dtype(x, router, gate_up, down)
    shared = [t for t in (sg, su, sd) if t is not None]
    if shared:
        if len(shared) != 3 or sg.rank != 2 or sg.shape[1] != h or su != sg or sd.shape != (h, sg.shape[0]):
            _fail(f"moe shared expert gate {sg}, up {su}, down {sd} do not fit input {x}")
        _same_dtype(x, *shared)
    return [x]


def _unit(a, what: str):
    """The gated unit's attributes (opdefs' GLU) make sense together: alpha scales SiLU's sigmoid only."""
    if a["alpha"] != 1.0 and a["act"] != SILU:
        _fail(f"{what} alpha={a['alpha']} is SiLU's (gate * sigmoid(alpha * gate)), not {a['act']}'s")
    if a["limit"] < 0:
        _fail(f"{what} limit must be >= 0 (0: no clamp), got {a['limit']}")


def experts(ts, a):
    x, ids, w, gate_up, down, gate_up_bias, down_bias = ts
    _unit(a, "experts")
    _float(x, "experts input")
    _int(ids, "expert ids")
    _float(w, "routing weights")
    if x.rank != 2 or ids.rank != 2 or ids.shape[0] != x.shape[0] or w.shape != ids.shape:
        _fail(f"experts of tokens {x} routed by ids {ids} and weights {w} (expected [T, H], [T, k], [T, k])")
    h = x.shape[1]
    if gate_up.rank != 3 or gate_up.shape[2] != h or down.rank != 3 or down.shape[:2] != (gate_up.shape[0], h) \
            or gate_up.shape[1] != 2 * down.shape[2]:
        _fail(f"experts {gate_up} (gate|up) and {down} (down) do not fit input {x}")
    _same_dtype(x, gate_up, down)
    for bias, rows in ((gate_up_bias, gate_up), (down_bias, down)):
        if bias is not None and (bias.shape != rows.shape[:2] or bias.dtype != x.dtype):
            _fail(f"experts bias {bias} does not fit {rows} (expected {x.dtype}{list(rows.shape[:2])})")
    return [x]


def moe_route(ts, a):
    x, router, bias = ts
    _router(x, router, bias, a)
    k = a["top_k"]
    return [TensorType(DType.I32, x.shape[:-1] + (k,)),
            TensorType(DType.F32 if a["weights_f32"] else x.dtype, x.shape[:-1] + (k,))]


def moe_sort(ts, a):
    (ids,) = ts
    _int(ids, "expert ids")
    return [TensorType(DType.I32, (numel(ids.shape),)), TensorType(DType.I32, (a["experts"] + 1,))]


def grouped_gemm(ts, a):
    x, w, order, offsets, scale, bias = ts
    _unit(a, "grouped_gemm")
    _float(x, "grouped_gemm input")
    _int(order, "grouped_gemm order")
    _int(offsets, "grouped_gemm offsets")
    if w.rank != 3 or x.rank < 1 or w.shape[2] != x.shape[-1] or offsets.shape != (w.shape[0] + 1,):
        _fail(f"grouped_gemm of {x} by experts {w} with offsets {offsets} (expected [E, N, {x.shape[-1]}] "
              f"and [E+1])")
    _same_dtype(x, w)
    if order.rank != 1:
        _fail(f"grouped_gemm order must be [R], got {order}")
    rows = order.shape[0]
    if not a["gather"] and (x.rank != 2 or x.shape[0] != rows):
        _fail(f"grouped_gemm without gather takes rows [R, K] in sorted order, got {x} for {rows} rows")
    n = w.shape[1]
    if a["act"] != "none":
        n = n // 2 if isinstance(n, int) else n
    if scale is not None and (scale.rank < 1 or numel(scale.shape) != rows):
        _fail(f"grouped_gemm scale {scale} does not have one value per row ({rows})")
    if bias is not None and (bias.shape != w.shape[:2] or bias.dtype != x.dtype):
        _fail(f"grouped_gemm bias {bias} does not fit experts {w} (expected {x.dtype}{list(w.shape[:2])})")
    return [TensorType(x.dtype, (rows, n))]


def moe_combine(ts, a):
    y, order, like = ts
    _int(order, "moe_combine order")
    if y.rank != 2 or like.rank < 1 or y.shape[1] != like.shape[-1] or order.shape != (y.shape[0],):
        _fail(f"moe_combine of rows {y} in order {order} into {like}")
    return [like.with_dtype(y.dtype)]


# ---- backend fusions: the composition of the ops each replaces -------------------------------------------------
def rope_cache_write(ts, a):
    q, k, v, pos, kc, vc = ts
    rq, rk = rope([q, k, pos], a)
    kv_cache_write([kc, rk, pos], a)
    kv_cache_write([vc, v, pos], a)
    return [rq, kc, vc]


def rope_cached_attention(ts, a):
    q, k, v, pos, lens, kc, vc, qn, kn, sinks = ts
    if (qn is None) != (kn is None):
        _fail("rope_cached_attention takes both q_norm and k_norm or neither")
    if qn is not None:
        d = kc.shape[-1] if kc.rank == 4 else None
        for w, x, what in ((qn, q, "q_norm"), (kn, k, "k_norm")):
            if w.shape != (d,):
                _fail(f"{what} {w} must be [{d}], one weight per head dim")
            _same_dtype(x, w)
    rq, kc, vc = rope_cache_write([q, k, v, pos, kc, vc], a)
    return [cached_attention([rq, kc, vc, pos, lens, sinks], a)[0], kc, vc]


def rms_norm_moe_route(ts, a):
    x, w, router, bias = ts
    (normed,) = rms_norm([x, w], a)
    return [normed, *moe_route([normed, router, bias], a)]



# ---- multi-head latent attention ----------------------------------------------------------------------------------
def _mla(c, k_pe, w, a, what: str):
    """(b, s, heads, nope, rope, v_dim) of the latent c [B,S,L], the shared rotary key k_pe [B,S,R] and kv_b's
    weight w [H*(P+V), L]."""
    b, s, lat = _tokens(c, f"{what} c")
    if _tokens(k_pe, f"{what} k_pe")[:2] != (b, s):
        _fail(f"{what} k_pe {k_pe} differs from c {c} in batch or sequence")
    h, p = a["heads"], a["nope"]
    rows = w.shape[0] if w.rank == 2 else None
    if w.rank != 2 or w.shape[1] != lat or not isinstance(rows, int) or h < 1 or rows % h or rows // h <= p or p < 0:
        _fail(f"{what} w {w} must be [heads*(nope+v), {lat}] with heads {h} and nope {p} < its rows per head")
    _float(c, f"{what} c")
    _same_dtype(c, k_pe, w)
    return b, s, h, p, k_pe.shape[2], rows // h - p


def mla_expand(ts, a):
    c, k_pe, w = ts
    b, s, h, p, r, v = _mla(c, k_pe, w, a, "mla_expand")
    return [c.with_shape((b, s, h * (p + r))), c.with_shape((b, s, h * v))]


def _mla_query(q, b, s, h, p, r, c, what: str):
    if q.shape != (b, s, h * (p + r)):
        _fail(f"{what} q {q} must be [{b}, {s}, {h * (p + r)}] (heads x (nope + rope))")
    _same_dtype(q, c)


def mla_attention(ts, a):
    q, c, k_pe, w, pos, lens = ts
    b, s, h, p, r, v = _mla(c, k_pe, w, a, "mla_attention")
    _mla_query(q, b, s, h, p, r, c, "mla_attention")
    _positions(pos, b, s)
    _seq_lens(lens, b)
    return [q.with_shape((b, s, h * v))]


def cached_mla_attention(ts, a):
    q, cc, kc, w, pos, lens = ts
    b, one, t, lat = _cache(cc, "latent cache")
    kb, kone, kt, r = _cache(kc, "k_pe cache")
    if one != 1 or kone != 1 or (kb, kt) != (b, t):
        _fail(f"latent cache {cc} and k_pe cache {kc} must be [B, 1, T, L] and [B, 1, T, R] alike")
    qb, s, _ = _tokens(q, "cached_mla_attention q")
    if qb != b:
        _fail(f"q {q} and cache {cc} differ in batch")
    h, p = a["heads"], a["nope"]
    rows = w.shape[0] if w.rank == 2 else None
    if w.rank != 2 or w.shape[1] != lat or not isinstance(rows, int) or h < 1 or rows % h or rows // h <= p:
        _fail(f"cached_mla_attention w {w} must be [heads*(nope+v), {lat}] with heads {h} and nope {p}")
    _mla_query(q, b, s, h, p, r, cc, "cached_mla_attention")
    _same_dtype(q, cc, kc, w)
    _positions(pos, b, s)
    _seq_lens(lens, b)
    return [q.with_shape((b, s, h * (rows // h - p)))]


# ---- tensor parallelism -------------------------------------------------------------------------------------------
def _world(a):
    if a["world"] < 2:
        _fail(f"a collective needs a world of 2 or more ranks, got {a['world']}")


def allreduce(ts, a):
    _world(a)
    _float(ts[0], "allreduce operand")
    return [ts[0]]


def allgather(ts, a):
    _world(a)
    x = ts[0]
    if x.rank < 1:
        _fail(f"allgather of a scalar {x}")
    return [x.with_shape(x.shape[:-1] + (x.shape[-1] * a["world"],))]


def allreduce_add_rms_norm(ts, a):
    x, residual, w = ts
    _world(a)
    _float(x, "allreduce_add_rms_norm input")
    if residual != x or x.rank < 1 or w.shape != (x.shape[-1],):
        _fail(f"allreduce_add_rms_norm of {x} with residual {residual} and norm weight {w} (expected one type and "
              f"[{x.shape[-1] if x.rank else '?'}])")
    _same_dtype(x, w)
    return [x, x]
