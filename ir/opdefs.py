"""The op table: for every ``Op`` one row holding all that defines it: its inputs, typed attributes, result rule,
reference implementation (``ir/compute.py``), traits and a one-line doc.

The verifier checks each node against its row; the parser uses the attribute kinds to read values; the reference
backend runs every row's ``impl``, and canonicalize folds constants with it where the row has ``Trait.FOLDS``;
passes ask for traits (``ops_with``) instead of keeping op lists. Layout conventions shared by the
LLM ops: activations are token-major ``[B, S, H*D]``; caches are head-major ``[B, Hkv, T, D]``; ``positions`` is
``i64[B, S]`` and ``seq_lens`` ``i32[B]`` (valid tokens per sequence, so padding never leaks into results).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

from lowerlm.ir import body as bd
from lowerlm.ir import compute as c
from lowerlm.ir import rules as r
from lowerlm.ir import stateful as sf
from lowerlm.ir.abi import ACTS, SILU
from lowerlm.ir.compute import F, torch
from lowerlm.ir.ops import Op
from lowerlm.ir.types import KV, RECURRENT


class AttrKind(enum.Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"
    DTYPE = "dtype"
    INTS = "ints"
    FLOATS = "floats"
    DIM = "dim"
    DIMS = "dims"
    NUMBERS = "numbers"  # a number or a list of numbers (constants)
    EXPR = "expr"  # a weight expression
    BODY = "body"  # an element-wise expression over a node's operands (ew_chain; ir/body.py)


class Trait(enum.Enum):
    """What passes and backends may ask of an op without naming it."""

    LEAF = "leaf"  # no inputs: a parameter, weight expression or constant
    WEIGHT = "weight"  # computed from the weight table alone, once at load time
    UNARY = "unary"  # element-wise over one operand
    BINARY = "binary"  # element-wise over two operands, numpy broadcasting
    REDUCE = "reduce"  # reduces or ranks along axes
    VIEW = "view"  # the same elements seen in another shape (no arithmetic)
    FOLDS = "folds"  # a core op: canonicalize folds it on constants with its impl
    RESIDUAL_EPILOGUE = "residual_epilogue"  # an optional ``residual`` input added to the result
    MIXES_TOKENS = "mixes_tokens"  # a token's result reads other tokens (attention)
    COLLECTIVE = "collective"  # exchanges values with the other ranks of the tensor-parallel group


REQUIRED = object()


@dataclass(frozen=True)
class AttrSpec:
    kind: AttrKind
    default: object = REQUIRED
    choices: tuple = ()


@dataclass(frozen=True)
class InputSpec:
    name: str
    optional: bool = False
    variadic: bool = False
    state: bool = False  # consumes a state version that the op overwrites


@dataclass(frozen=True)
class OpDef:
    op: Op
    inputs: tuple
    attrs: dict
    rule: Callable  # (input types, attrs with defaults) -> list of result types, or None: declared types stand
    doc: str
    writes: dict = field(default_factory=dict)  # state input index -> result index holding the new version
    impl: Callable | None = None  # impl(*inputs by slot, **attrs) -> result(s); None: params and weights
    traits: frozenset = frozenset()
    state: str = ""  # the kind of state the op writes (ir/types.py's STATE_KINDS), "" when none
    # an op that reads earlier tokens: its stateful form (ir/stateful.py), which insert_state makes of it
    stateful: Callable | None = None

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].variadic


# ---- the table ----------------------------------------------------------------------------------------------
K = AttrKind
I = InputSpec  # noqa: E741


T = Trait
_EW1 = frozenset({T.UNARY, T.FOLDS})
_EW2 = frozenset({T.BINARY, T.FOLDS})
_CORE = frozenset({T.FOLDS})


def _d(op, inputs, rule, doc, attrs=None, writes=None, impl=None, traits=(), state="", stateful=None) -> OpDef:
    return OpDef(op, tuple(I(n) if isinstance(n, str) else n for n in inputs), attrs or {}, rule, doc,
                 writes or {}, impl, frozenset(traits), state, stateful)


def _pow(x, exponent):
    return x.pow(int(exponent) if float(exponent).is_integer() else exponent)


def _constant(value, dtype, shape):
    if isinstance(value, tuple):
        return torch.tensor(value, dtype=dtype.to_torch()).reshape(shape)
    return torch.full(shape, value, dtype=dtype.to_torch())


def _slice(x, dim, start, end, step):
    return x[(slice(None),) * (dim % x.dim()) + (slice(start, end, step),)]


def _linear(x, w, bias, residual):
    out = F.linear(x, w, bias)
    return out if residual is None else out + residual


_X = ("x",)
COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")  # torch's names
_AB = ("a", "b")
_ATTN = {"heads": AttrSpec(K.INTS), "scale": AttrSpec(K.FLOAT), "causal": AttrSpec(K.BOOL, True),
         "window": AttrSpec(K.INT, 0), "softcap": AttrSpec(K.FLOAT, 0.0)}
_SINKS = I("sinks", optional=True)
_CACHED_ATTN = {k: v for k, v in _ATTN.items() if k != "heads"}
_ROUTE = {"router": AttrSpec(K.STR, "softmax", ("softmax", "sigmoid", "topk_softmax")), "top_k": AttrSpec(K.INT),
          "n_group": AttrSpec(K.INT, 1), "topk_group": AttrSpec(K.INT, 1), "renormalize": AttrSpec(K.BOOL, True),
          "scaling": AttrSpec(K.FLOAT, 1.0), "router_f32": AttrSpec(K.BOOL, False),
          "weights_f32": AttrSpec(K.BOOL, True), "renorm_eps": AttrSpec(K.FLOAT, 1e-20)}
_MOE = dict(_ROUTE, act=AttrSpec(K.STR, SILU, ACTS))
# the experts' gated unit (ir/compute.py's ``glu``): act(gate) * up, or the clamped and shifted forms of DeepSeek-V4,
# Bailing, MiniMax and gpt-oss: with a limit L > 0, up clamped to [-L, L] and gate to at most L before the act
# (clamp="gate") or the act's result after it (clamp="act"); SiLU's sigmoid reads alpha * gate; up + up_shift
GLU = {"limit": AttrSpec(K.FLOAT, 0.0), "clamp": AttrSpec(K.STR, "gate", ("gate", "act")),
        "alpha": AttrSpec(K.FLOAT, 1.0), "up_shift": AttrSpec(K.FLOAT, 0.0)}

_LLM_ROPE = {"heads": AttrSpec(K.INTS), "inv_freq": AttrSpec(K.FLOATS), "scaling": AttrSpec(K.FLOAT, 1.0),
             "layout": AttrSpec(K.STR, "half", ("half", "interleaved"))}
_CONV = {"act": AttrSpec(K.STR, "none", ("none", SILU))}
_DELTA = {"heads": AttrSpec(K.INT), "scale": AttrSpec(K.FLOAT), "l2norm": AttrSpec(K.BOOL, False),
          "eps": AttrSpec(K.FLOAT, 1e-6)}
_POS = ("positions", "seq_lens")
_MLA = {"heads": AttrSpec(K.INT), "nope": AttrSpec(K.INT)}
_MLA_ATTN = dict(_MLA, scale=AttrSpec(K.FLOAT))

OPDEFS: dict[Op, OpDef] = {d.op: d for d in [
    _d(Op.PARAM, (), None, "an entry of the weight table", {"name": AttrSpec(K.STR)}, traits=(T.LEAF, T.WEIGHT)),
    _d(Op.WEIGHT, (), None, "a weight expression over params and data, evaluated at load time",
       {"expr": AttrSpec(K.EXPR)}, traits=(T.LEAF, T.WEIGHT)),
    _d(Op.CONSTANT, (), r.constant, "a small constant: one value broadcast, or all values row-major",
       {"value": AttrSpec(K.NUMBERS), "dtype": AttrSpec(K.DTYPE), "shape": AttrSpec(K.INTS, ())},
       impl=_constant, traits=(T.LEAF, T.FOLDS)),
    _d(Op.ARANGE, (), r.arange, "start, start + step, … below end, as dtype",
       {"start": AttrSpec(K.DIM, 0), "end": AttrSpec(K.DIM), "step": AttrSpec(K.INT, 1), "dtype": AttrSpec(K.DTYPE)},
       impl=lambda start, end, step, dtype: torch.arange(start, end, step, dtype=dtype.to_torch()), traits=_CORE),
    _d(Op.ADD, _AB, r.binary, "a + b, broadcasting", impl=lambda a, b: a + b, traits=_EW2),
    _d(Op.SUB, _AB, r.binary, "a - b, broadcasting", impl=lambda a, b: a - b, traits=_EW2),
    _d(Op.MUL, _AB, r.binary, "a * b, broadcasting", impl=lambda a, b: a * b, traits=_EW2),
    _d(Op.DIV, _AB, r.binary, "a / b, broadcasting", impl=lambda a, b: a / b, traits=_EW2),
    _d(Op.MINIMUM, _AB, r.binary, "the smaller of a and b (NaN if either is), broadcasting",
       impl=lambda a, b: torch.minimum(a, b), traits=_EW2),
    _d(Op.MAXIMUM, _AB, r.binary, "the larger of a and b (NaN if either is), broadcasting",
       impl=lambda a, b: torch.maximum(a, b), traits=_EW2),
    _d(Op.NEG, _X, r.unary_float, "-x", impl=lambda x: -x, traits=_EW1),
    _d(Op.EXP, _X, r.unary_float, "e^x", impl=lambda x: torch.exp(x), traits=_EW1),
    _d(Op.RSQRT, _X, r.unary_float, "1 / sqrt(x)", impl=lambda x: torch.rsqrt(x), traits=_EW1),
    _d(Op.POW, _X, r.unary_float, "x ** exponent", {"exponent": AttrSpec(K.FLOAT)}, impl=_pow, traits=_EW1),
    _d(Op.SILU, _X, r.unary_float, "x * sigmoid(x)", impl=lambda x: F.silu(x), traits=_EW1),
    _d(Op.GELU, _X, r.unary_float, "GeLU, exact (erf) or the tanh approximation",
       {"approximate": AttrSpec(K.STR, "none", ("none", "tanh"))},
       impl=lambda x, approximate: F.gelu(x, approximate=approximate), traits=_EW1),
    _d(Op.SIGMOID, _X, r.unary_float, "1 / (1 + e^-x)", impl=lambda x: torch.sigmoid(x), traits=_EW1),
    _d(Op.TANH, _X, r.unary_float, "tanh(x)", impl=lambda x: torch.tanh(x), traits=_EW1),
    _d(Op.COS, _X, r.unary_float, "cos(x)", impl=lambda x: torch.cos(x), traits=_EW1),
    _d(Op.SIN, _X, r.unary_float, "sin(x)", impl=lambda x: torch.sin(x), traits=_EW1),
    _d(Op.RELU, _X, r.unary_float, "max(x, 0)", impl=lambda x: torch.relu(x), traits=_EW1),
    _d(Op.SOFTPLUS, _X, r.unary_float, "log(1 + e^(beta x)) / beta, or x where beta x > threshold",
       {"beta": AttrSpec(K.FLOAT, 1.0), "threshold": AttrSpec(K.FLOAT, 20.0)},
       impl=lambda x, beta, threshold: F.softplus(x, beta, threshold), traits=_EW1),
    _d(Op.EXPM1, _X, r.unary_float, "e^x - 1", impl=lambda x: torch.expm1(x), traits=_EW1),
    _d(Op.LOG, _X, r.unary_float, "natural logarithm", impl=lambda x: torch.log(x), traits=_EW1),
    _d(Op.FLOOR, _X, r.unary_float, "the largest integer <= x", impl=lambda x: torch.floor(x), traits=_EW1),
    _d(Op.ABS, _X, r.unary_float, "|x|", impl=lambda x: torch.abs(x), traits=_EW1),
    _d(Op.COMPARE, _AB, r.compare, "a pred b as a bool tensor, broadcasting",
       {"pred": AttrSpec(K.STR, choices=COMPARISONS)}, impl=lambda a, b, pred: getattr(torch, pred)(a, b),
       traits=_CORE),
    _d(Op.WHERE, ("cond", "a", "b"), r.where, "a where cond is true, else b, broadcasting",
       impl=lambda cond, a, b: torch.where(cond, a, b), traits=_CORE),
    _d(Op.CAST, _X, lambda ts, a: [ts[0].with_dtype(a["dtype"])], "conversion to dtype",
       {"dtype": AttrSpec(K.DTYPE)}, impl=lambda x, dtype: x.to(dtype.to_torch()), traits=_EW1),
    _d(Op.MEAN, _X, r.reduce, "mean over dims", {"dims": AttrSpec(K.INTS), "keepdim": AttrSpec(K.BOOL, False)},
       impl=lambda x, dims, keepdim: x.mean(dim=list(dims), keepdim=keepdim), traits=(T.REDUCE, T.FOLDS)),
    _d(Op.SUM, _X, r.reduce, "sum over dims", {"dims": AttrSpec(K.INTS), "keepdim": AttrSpec(K.BOOL, False)},
       impl=lambda x, dims, keepdim: x.sum(dim=list(dims), keepdim=keepdim), traits=(T.REDUCE, T.FOLDS)),
    _d(Op.SOFTMAX, _X, r.softmax, "softmax along dim", {"dim": AttrSpec(K.INT)},
       impl=lambda x, dim: torch.softmax(x, dim=dim), traits=(T.REDUCE, T.FOLDS)),
    _d(Op.ARGMAX, _X, r.argmax, "index of the largest value along dim (first on ties)",
       {"dim": AttrSpec(K.INT), "keepdim": AttrSpec(K.BOOL, False)},
       impl=lambda x, dim, keepdim: torch.argmax(x, dim=dim, keepdim=keepdim), traits=(T.REDUCE, T.FOLDS)),
    _d(Op.TOPK, _X, r.topk, "the k largest (or smallest) values along dim and their indices, sorted",
       {"k": AttrSpec(K.INT), "dim": AttrSpec(K.INT, -1), "largest": AttrSpec(K.BOOL, True)},
       impl=lambda x, k, dim, largest: tuple(torch.topk(x, k, dim=dim, largest=largest, sorted=True)),
       traits=(T.REDUCE, T.FOLDS)),
    _d(Op.SORT, _X, r.sort, "the values along dim in ascending (or descending) order and their indices; equal "
       "values keep their order", {"dim": AttrSpec(K.INT, -1), "descending": AttrSpec(K.BOOL, False)},
       impl=lambda x, dim, descending: tuple(torch.sort(x, dim=dim, descending=descending, stable=True)),
       traits=(T.REDUCE, T.FOLDS)),
    _d(Op.RESHAPE, _X, r.reshape, "the same elements, row-major, in another shape", {"shape": AttrSpec(K.DIMS)},
       impl=lambda x, shape: x.reshape(shape), traits=(T.VIEW, T.FOLDS)),
    _d(Op.TRANSPOSE, _X, r.transpose, "axes permuted: result axis i is input axis perm[i]",
       {"perm": AttrSpec(K.INTS)}, impl=lambda x, perm: x.permute(*perm), traits=(T.VIEW, T.FOLDS)),
    _d(Op.EXPAND, _X, r.expand, "x broadcast to shape (numpy rules: size-1 axes stretch, new axes in front)",
       {"shape": AttrSpec(K.DIMS)}, impl=lambda x, shape: x.expand(shape), traits=(T.VIEW, T.FOLDS)),
    _d(Op.CONCAT, (I("xs", variadic=True),), r.concat, "concatenation along dim", {"dim": AttrSpec(K.INT)},
       impl=lambda *xs, dim: torch.cat(xs, dim=dim), traits=_CORE),
    _d(Op.SPLIT, _X, r.split, "consecutive pieces of the given sizes along dim",
       {"dim": AttrSpec(K.INT), "sizes": AttrSpec(K.DIMS)},
       impl=lambda x, dim, sizes: tuple(torch.split(x, list(sizes), dim=dim)), traits=_CORE),
    _d(Op.SLICE, _X, r.slice, "x[start:end:step] along dim",
       {"dim": AttrSpec(K.INT), "start": AttrSpec(K.DIM, 0), "end": AttrSpec(K.DIM), "step": AttrSpec(K.INT, 1)},
       impl=_slice, traits=(T.VIEW, T.FOLDS)),
    _d(Op.GATHER, ("x", "index"), r.gather, "torch.gather along dim", {"dim": AttrSpec(K.INT)},
       impl=lambda x, index, dim: torch.gather(x, dim, index), traits=_CORE),
    _d(Op.SCATTER, ("x", "index", "src"), r.scatter,
       "torch.scatter along dim: x with x[..., index[i], ...] = src[i] (index and src of one shape)",
       {"dim": AttrSpec(K.INT)}, impl=lambda x, index, src, dim: torch.scatter(x, dim, index, src), traits=_CORE),
    _d(Op.EMBEDDING, ("weight", "ids"), r.embedding, "rows of the table: weight[ids]",
       impl=lambda weight, ids: F.embedding(ids, weight), traits=_CORE),
    _d(Op.LINEAR, ("x", "w", I("bias", optional=True), I("residual", optional=True)), r.linear,
       "x @ w.T (+ bias) (+ residual): the residual epilogue yields the new residual stream",
       impl=_linear, traits=(T.FOLDS, T.RESIDUAL_EPILOGUE)),
    _d(Op.MATMUL, _AB, r.matmul, "batched a @ b, broadcasting batch dims", impl=lambda a, b: torch.matmul(a, b),
       traits=_CORE),
    _d(Op.RMS_NORM, ("x", "weight"), r.rms_norm,
       "x * rsqrt(mean(x^2, -1) + eps) computed in f32, cast back, times weight", {"eps": AttrSpec(K.FLOAT)},
       impl=c.rms_norm),
    _d(Op.ROPE, ("q", "k", "positions"), r.rope,
       "rotary embedding of q [B,S,Hq*D] and k [B,S,Hk*D] at positions; cos/sin = trig(pos*inv_freq)*scaling",
       _LLM_ROPE, impl=c.rope),
    _d(Op.ATTENTION, ("q", "k", "v", "positions", "seq_lens", _SINKS), r.attention,
       "GQA softmax attention within one call: key j is seen by query i if j < seq_lens and, when causal, "
       "pos_j <= pos_i (and pos_i - pos_j < window); scores q.k * scale, softcap * tanh(score / softcap) when "
       "softcap > 0; sinks [Hq]: one more logit per head in each softmax that takes weight but adds no value; "
       "result [B,S,Hq*Dv] (zeros for a query that sees no key)", _ATTN, impl=c.attention,
       traits=(T.MIXES_TOKENS,), stateful=sf.attention),
    _d(Op.SHORT_CONV, ("x", "weight", I("bias", optional=True)), r.short_conv,
       "causal depthwise convolution of x [B,S,C] along the sequence (weight [C,W], zeros before the first token): "
       "y[s] = act(bias + sum_j weight[:, j] * x[s-W+1+j]), in x's dtype", _CONV, impl=c.short_conv,
       traits=(T.MIXES_TOKENS,), stateful=sf.short_conv),
    _d(Op.DELTA_RULE, ("q", "k", "v", "g", "beta"), r.delta_rule,
       "gated delta rule over heads of q, k [B,S,H*K], v [B,S,H*V] in f32 from a zero state S [H,K,V]: q and k "
       "L2-normalised per head when l2norm (x / sqrt(sum x^2 + eps)), q times scale; per token S <- exp(g) S (g "
       "[B,S,H*K]: per key channel, as KDA; [B,S,H]: per head, as gated DeltaNet), S <- S + k (beta (v - S^T k))^T "
       "(beta [B,S,H]), o = S^T q; result [B,S,H*V] in q's dtype", _DELTA, impl=c.delta_rule,
       traits=(T.MIXES_TOKENS,), stateful=sf.delta_rule),
    _d(Op.MLA_EXPAND, ("c", "k_pe", "w"), r.mla_expand,
       "MLA's keys and values from the latent c [B,S,L] and the shared rotary key k_pe [B,S,R]: per head h, "
       "[k_nope_h | v_h] = c @ w_h.T (w [H*(P+V), L]: head h's P key rows, then its V value rows) and key_h = "
       "[k_nope_h | k_pe]: (k [B,S,H*(P+R)], v [B,S,H*V])", _MLA, impl=c.mla_expand),
    _d(Op.MLA_ATTENTION, ("q", "c", "k_pe", "w") + _POS, r.mla_attention,
       "causal attention (as attention, H query and key heads) of q [B,S,H*(P+R)] over mla_expand(c, k_pe, w): "
       "result [B,S,H*V]", _MLA_ATTN, impl=c.mla_attention, traits=(T.MIXES_TOKENS,), stateful=sf.mla_attention),
    _d(Op.RMS_NORM_LINEAR, ("x", "norm_weight", "weight", I("bias", optional=True), I("residual", optional=True)),
       r.rms_norm_linear,
       "r = x (+ residual); split(rms_norm(r) @ weight.T (+ bias), splits) -- or act(gate) * up with a swiglu "
       "act; yields the pieces, then r when a residual is given",
       {"eps": AttrSpec(K.FLOAT), "splits": AttrSpec(K.DIMS), "act": AttrSpec(K.STR, "none", ("none",) + ACTS)},
       impl=c.rms_norm_linear),
    _d(Op.SWIGLU, ("gate", "up"), r.swiglu, "act(gate) * up", {"act": AttrSpec(K.STR, SILU, ACTS)},
       impl=c.swiglu),
    _d(Op.ARM_MLP, ("x", "norm_weight", "gate_m", "up", "down_scaled", "mu", "scale", I("residual", optional=True)),
       r.arm_mlp,
       "ARM gated MLP: h = rms_norm(x); [g; m] = h @ [W_g; M].T; a_hat = (act(g) - mu) / scale, zero where "
       "|a_hat| < tau; (a_hat * (h @ W_u.T)) @ (W_d diag(scale)).T + m (+ residual)",
       {"eps": AttrSpec(K.FLOAT), "tau": AttrSpec(K.FLOAT), "act": AttrSpec(K.STR, SILU, ACTS)},
       impl=c.arm_mlp, traits=(T.RESIDUAL_EPILOGUE,)),
    _d(Op.MOE, ("x", "router", I("bias", optional=True), "gate_up", "down", I("shared_gate", optional=True),
                I("shared_up", optional=True), I("shared_down", optional=True)), r.moe,
       "mixture of experts on x [..., H]: route (moe_route), each token through its top_k experts' "
       "act(x @ gate.T) * (x @ up.T) @ down.T (gate_up [E, 2I, H] = [gate; up], down [E, H, I]) times its routing "
       "weight, summed; plus the shared expert's SwiGLU MLP on every token", _MOE, impl=c.moe),
    _d(Op.EXPERTS, ("x", "ids", "weights", "gate_up", "down", I("gate_up_bias", optional=True),
                    I("down_bias", optional=True)), r.experts,
       "transformers' experts on tokens x [T, H] routed by ids [T, k] (any integer type) with weights [T, k]: "
       "each token's sum over its k experts of act(x @ gate.T) * (x @ up.T) @ down.T (gate_up [E, 2I, H] = "
       "[gate; up], down [E, H, I]; biases [E, 2I] and [E, H] added after each product) times its weight (in the "
       "weights' dtype, then cast), added in expert order; the gated unit as glu's attributes say",
       {"act": AttrSpec(K.STR, SILU, ACTS), **GLU}, impl=c.experts),
    _d(Op.MOE_ROUTE, ("x", "router", I("bias", optional=True)), r.moe_route,
       "expert ids [..., top_k] (i32) and routing weights: softmax(x @ router.T) in f32 then top_k; or top_k of "
       "the logits, then the softmax (in f32) of those k (topk_softmax); or sigmoid scores (in f32) chosen by "
       "score + bias within the topk_group best groups (group score: sum of its top 2); weights renormalised if "
       "asked (sigmoid: w / (sum + renorm_eps)), times scaling", _ROUTE, impl=c.moe_route),
    _d(Op.MOE_SORT, ("ids",), r.moe_sort,
       "order: the flattened (token, k) pair indices stably sorted by expert; offsets [E+1]: where each expert's "
       "rows start", {"experts": AttrSpec(K.INT)}, impl=c.moe_sort),
    _d(Op.GROUPED_GEMM, ("x", "w", "order", "offsets", I("scale", optional=True), I("bias", optional=True)),
       r.grouped_gemm,
       "rows r in offsets[e]..offsets[e+1] times expert e's w [E, N, K] (plus bias[e], [E, N]): row r is x[r], or "
       "with gather = top_k the token row x_flat[order[r] // top_k]; act: act(first half) * second half (the "
       "gated unit as glu's attributes say); scale: times scale_flat[order[r]] (in the scale's dtype, then cast)",
       {"gather": AttrSpec(K.INT, 0), "act": AttrSpec(K.STR, "none", ("none",) + ACTS), **GLU},
       impl=c.grouped_gemm),
    _d(Op.MOE_COMBINE, ("y", "order", "like"), r.moe_combine,
       "out_flat[order[r] // top_k] += y[r] in row order (per token: expert order), shaped like ``like``",
       {"top_k": AttrSpec(K.INT)}, impl=c.moe_combine),
    _d(Op.KV_CACHE_WRITE, (I("cache", state=True), "values", "positions"), r.kv_cache_write,
       "new cache version with values [B,S,Hkv*D] stored at cache[b, :, positions[b,s]] (positions >= T skipped)",
       writes={0: 0}, impl=c.kv_cache_write, state=KV),
    _d(Op.CACHED_ATTENTION, ("q", "k_cache", "v_cache", "positions", "seq_lens", _SINKS), r.cached_attention,
       "GQA attention of q [B,S,Hq*D] over cache slots t < seq_lens (causal: t <= pos_i), softcap and sinks as "
       "in attention; result [B,S,Hq*Dv]",
       _CACHED_ATTN, impl=c.cached_attention, traits=(T.MIXES_TOKENS,)),
    _d(Op.CACHED_SHORT_CONV, ("x", "weight", I("bias", optional=True), I("state", state=True)) + _POS,
       r.cached_short_conv,
       "short_conv continuing each sequence from state [B,W-1,C] (its last W-1 inputs): (result, new state = the "
       "W-1 inputs before the row's first token at or past seq_lens, so right padding never enters it)", _CONV,
       writes={3: 1}, impl=c.cached_short_conv, traits=(T.MIXES_TOKENS,), state=RECURRENT),
    _d(Op.CACHED_DELTA_RULE, ("q", "k", "v", "g", "beta", I("state", state=True)) + _POS, r.cached_delta_rule,
       "delta_rule continuing each sequence from state f32[B,H,K,V]; tokens at or past seq_lens leave it as it is "
       "(gate 0, beta 0): (result, new state)", _DELTA, writes={5: 1}, impl=c.cached_delta_rule,
       traits=(T.MIXES_TOKENS,), state=RECURRENT),
    _d(Op.CACHED_MLA_ATTENTION, ("q", "c_cache", "k_pe_cache", "w") + _POS, r.cached_mla_attention,
       "mla_attention of q [B,S,H*(P+R)] over the latent caches c [B,1,T,L] and k_pe [B,1,T,R] at slots t < seq_lens "
       "and t <= pos_i: naive (keys and values expanded from the cache) or absorbed (q_nope_h @ W_UK_h scored "
       "against c, the softmax in f32, the latent output times W_UV_h.T; W_UK_h, W_UV_h: head h's key and value "
       "rows of w), the same math; result [B,S,H*V]", _MLA_ATTN, impl=c.cached_mla_attention,
       traits=(T.MIXES_TOKENS,)),
    _d(Op.ALLREDUCE, ("x",), r.allreduce,
       "the sum of x over the world ranks of the tensor-parallel group (torch.distributed's default group: gloo on "
       "CPUs, NCCL on GPUs), the same on every rank", {"world": AttrSpec(K.INT)}, impl=c.allreduce,
       traits=(T.COLLECTIVE,)),
    _d(Op.ALLREDUCE_ADD_RMS_NORM, ("x", "residual", "weight"), r.allreduce_add_rms_norm,
       "r = allreduce(x) + residual; (rms_norm(r) * weight (as rms_norm), r): the reduction, the residual add and "
       "the next norm in one", {"world": AttrSpec(K.INT), "eps": AttrSpec(K.FLOAT)}, impl=c.allreduce_add_rms_norm,
       traits=(T.COLLECTIVE,)),
    _d(Op.ALLGATHER, ("x",), r.allgather,
       "every rank's x [..., N] side by side along the last axis, in rank order ([..., world*N]; a vocab-parallel "
       "lm_head's logits), the same on every rank", {"world": AttrSpec(K.INT)}, impl=c.allgather,
       traits=(T.COLLECTIVE,)),
    _d(Op.ROPE_CACHE_WRITE, ("q", "k", "v", "positions", I("k_cache", state=True), I("v_cache", state=True)),
       r.rope_cache_write,
       "rope(q, k) at positions, then rotated k and v written into the caches: (rotated q, new k cache, "
       "new v cache)", _LLM_ROPE, writes={4: 1, 5: 2}, impl=c.rope_cache_write, state=KV),
    _d(Op.ROPE_CACHED_ATTENTION, ("q", "k", "v", "positions", "seq_lens", I("k_cache", state=True),
                                  I("v_cache", state=True), I("q_norm", optional=True), I("k_norm", optional=True),
                                  _SINKS),
       r.rope_cached_attention,
       "per-head rms_norm of q and k when q_norm and k_norm [D] are given (eps), rope, k and v written into the "
       "caches, cached_attention over them: (result [B,S,Hq*Dv], new k cache, new v cache)",
       dict(_LLM_ROPE, **_CACHED_ATTN, eps=AttrSpec(K.FLOAT, 0.0)), writes={5: 1, 6: 2},
       impl=c.rope_cached_attention, traits=(T.MIXES_TOKENS,), state=KV),
    _d(Op.RMS_NORM_MOE_ROUTE, ("x", "norm_weight", "router", I("bias", optional=True)), r.rms_norm_moe_route,
       "rms_norm(x) and moe_route of it: (normed x, expert ids, routing weights)",
       dict(_ROUTE, eps=AttrSpec(K.FLOAT)), impl=c.rms_norm_moe_route),
    _d(Op.EW_CHAIN, (I("xs", variadic=True),), bd.rule,
       "an element-wise expression over the operands (body; %i is operand i), each step rounded to its type",
       {"body": AttrSpec(K.BODY)}, impl=bd.evaluate),
]}


def ops_with(trait: Trait) -> frozenset:
    """The ops whose row has ``trait``."""
    return frozenset(op for op, d in OPDEFS.items() if trait in d.traits)
