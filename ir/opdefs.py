"""The op table: for every ``Op`` its inputs, typed attributes, result rule and a one-line doc.

The verifier checks each node against its ``OpDef``; the parser uses the attribute kinds to read values; the
reference backend (``codegen/reference.py``) implements every op listed here. Layout conventions shared by the
LLM ops: activations are token-major ``[B, S, H*D]``; caches are head-major ``[B, Hkv, T, D]``; ``positions`` is
``i64[B, S]`` and ``seq_lens`` ``i32[B]`` (valid tokens per sequence, so padding never leaks into results).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

from lowerlm.ir import rules as r
from lowerlm.ir.ops import Op
from lowerlm.ir.rules import ACTS


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

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].variadic


# ---- the table ----------------------------------------------------------------------------------------------
K = AttrKind
I = InputSpec  # noqa: E741


def _d(op, inputs, rule, doc, attrs=None, writes=None) -> OpDef:
    return OpDef(op, tuple(I(n) if isinstance(n, str) else n for n in inputs), attrs or {}, rule, doc,
                 writes or {})


_X = ("x",)
_AB = ("a", "b")
_ATTN = {"heads": AttrSpec(K.INTS), "scale": AttrSpec(K.FLOAT), "causal": AttrSpec(K.BOOL, True),
         "window": AttrSpec(K.INT, 0)}
_CACHED_ATTN = {k: v for k, v in _ATTN.items() if k != "heads"}
_ROUTE = {"router": AttrSpec(K.STR, "softmax", ("softmax", "sigmoid")), "top_k": AttrSpec(K.INT),
          "n_group": AttrSpec(K.INT, 1), "topk_group": AttrSpec(K.INT, 1), "renormalize": AttrSpec(K.BOOL, True),
          "scaling": AttrSpec(K.FLOAT, 1.0), "router_f32": AttrSpec(K.BOOL, False),
          "weights_f32": AttrSpec(K.BOOL, True)}
_MOE = dict(_ROUTE, act=AttrSpec(K.STR, "silu", ACTS))

OPDEFS: dict[Op, OpDef] = {d.op: d for d in [
    _d(Op.PARAM, (), None, "an entry of the weight table", {"name": AttrSpec(K.STR)}),
    _d(Op.WEIGHT, (), None, "a weight expression over params and data, evaluated at load time",
       {"expr": AttrSpec(K.EXPR)}),
    _d(Op.CONSTANT, (), r.constant, "a small constant: one value broadcast, or all values row-major",
       {"value": AttrSpec(K.NUMBERS), "dtype": AttrSpec(K.DTYPE), "shape": AttrSpec(K.INTS, ())}),
    _d(Op.ADD, _AB, r.binary, "a + b, broadcasting"),
    _d(Op.SUB, _AB, r.binary, "a - b, broadcasting"),
    _d(Op.MUL, _AB, r.binary, "a * b, broadcasting"),
    _d(Op.DIV, _AB, r.binary, "a / b, broadcasting"),
    _d(Op.NEG, _X, r.unary_float, "-x"),
    _d(Op.EXP, _X, r.unary_float, "e^x"),
    _d(Op.RSQRT, _X, r.unary_float, "1 / sqrt(x)"),
    _d(Op.POW, _X, r.unary_float, "x ** exponent", {"exponent": AttrSpec(K.FLOAT)}),
    _d(Op.SILU, _X, r.unary_float, "x * sigmoid(x)"),
    _d(Op.GELU, _X, r.unary_float, "GeLU, exact (erf) or the tanh approximation",
       {"approximate": AttrSpec(K.STR, "none", ("none", "tanh"))}),
    _d(Op.SIGMOID, _X, r.unary_float, "1 / (1 + e^-x)"),
    _d(Op.TANH, _X, r.unary_float, "tanh(x)"),
    _d(Op.COS, _X, r.unary_float, "cos(x)"),
    _d(Op.SIN, _X, r.unary_float, "sin(x)"),
    _d(Op.CAST, _X, lambda ts, a: [ts[0].with_dtype(a["dtype"])], "conversion to dtype",
       {"dtype": AttrSpec(K.DTYPE)}),
    _d(Op.MEAN, _X, r.reduce, "mean over dims", {"dims": AttrSpec(K.INTS), "keepdim": AttrSpec(K.BOOL, False)}),
    _d(Op.SUM, _X, r.reduce, "sum over dims", {"dims": AttrSpec(K.INTS), "keepdim": AttrSpec(K.BOOL, False)}),
    _d(Op.SOFTMAX, _X, r.softmax, "softmax along dim", {"dim": AttrSpec(K.INT)}),
    _d(Op.ARGMAX, _X, r.argmax, "index of the largest value along dim (first on ties)",
       {"dim": AttrSpec(K.INT), "keepdim": AttrSpec(K.BOOL, False)}),
    _d(Op.TOPK, _X, r.topk, "the k largest (or smallest) values along dim and their indices, sorted",
       {"k": AttrSpec(K.INT), "dim": AttrSpec(K.INT, -1), "largest": AttrSpec(K.BOOL, True)}),
    _d(Op.RESHAPE, _X, r.reshape, "the same elements, row-major, in another shape", {"shape": AttrSpec(K.DIMS)}),
    _d(Op.TRANSPOSE, _X, r.transpose, "axes permuted: result axis i is input axis perm[i]",
       {"perm": AttrSpec(K.INTS)}),
    _d(Op.EXPAND, _X, r.expand, "x broadcast to shape (numpy rules: size-1 axes stretch, new axes in front)",
       {"shape": AttrSpec(K.DIMS)}),
    _d(Op.CONCAT, (I("xs", variadic=True),), r.concat, "concatenation along dim", {"dim": AttrSpec(K.INT)}),
    _d(Op.SPLIT, _X, r.split, "consecutive pieces of the given sizes along dim",
       {"dim": AttrSpec(K.INT), "sizes": AttrSpec(K.DIMS)}),
    _d(Op.SLICE, _X, r.slice, "x[start:end:step] along dim",
       {"dim": AttrSpec(K.INT), "start": AttrSpec(K.DIM, 0), "end": AttrSpec(K.DIM), "step": AttrSpec(K.INT, 1)}),
    _d(Op.GATHER, ("x", "index"), r.gather, "torch.gather along dim", {"dim": AttrSpec(K.INT)}),
    _d(Op.EMBEDDING, ("weight", "ids"), r.embedding, "rows of the table: weight[ids]"),
    _d(Op.LINEAR, ("x", "w", I("bias", optional=True), I("residual", optional=True)), r.linear,
       "x @ w.T (+ bias) (+ residual): the residual epilogue yields the new residual stream"),
    _d(Op.MATMUL, _AB, r.matmul, "batched a @ b, broadcasting batch dims"),
    _d(Op.RMS_NORM, ("x", "weight"), r.rms_norm,
       "x * rsqrt(mean(x^2, -1) + eps) computed in f32, cast back, times weight", {"eps": AttrSpec(K.FLOAT)}),
    _d(Op.ROPE, ("q", "k", "positions"), r.rope,
       "rotary embedding of q [B,S,Hq*D] and k [B,S,Hk*D] at positions; cos/sin = trig(pos*inv_freq)*scaling",
       {"heads": AttrSpec(K.INTS), "inv_freq": AttrSpec(K.FLOATS), "scaling": AttrSpec(K.FLOAT, 1.0),
        "layout": AttrSpec(K.STR, "half", ("half", "interleaved"))}),
    _d(Op.ATTENTION, ("q", "k", "v", "positions", "seq_lens"), r.attention,
       "GQA softmax attention within one call: key j is seen by query i if j < seq_lens and, when causal, "
       "pos_j <= pos_i (and pos_i - pos_j < window); result [B,S,Hq*Dv]", _ATTN),
    _d(Op.RMS_NORM_LINEAR, ("x", "norm_weight", "weight", I("bias", optional=True), I("residual", optional=True)),
       r.rms_norm_linear,
       "r = x (+ residual); split(rms_norm(r) @ weight.T (+ bias), splits) -- or act(gate) * up with a swiglu "
       "act; yields the pieces, then r when a residual is given",
       {"eps": AttrSpec(K.FLOAT), "splits": AttrSpec(K.DIMS), "act": AttrSpec(K.STR, "none", ("none",) + ACTS)}),
    _d(Op.SWIGLU, ("gate", "up"), r.swiglu, "act(gate) * up", {"act": AttrSpec(K.STR, "silu", ACTS)}),
    _d(Op.ARM_MLP, ("x", "norm_weight", "gate_m", "up", "down_scaled", "mu", "scale", I("residual", optional=True)),
       r.arm_mlp,
       "ARM gated MLP: h = rms_norm(x); [g; m] = h @ [W_g; M].T; a_hat = (act(g) - mu) / scale, zero where "
       "|a_hat| < tau; (a_hat * (h @ W_u.T)) @ (W_d diag(scale)).T + m (+ residual)",
       {"eps": AttrSpec(K.FLOAT), "tau": AttrSpec(K.FLOAT), "act": AttrSpec(K.STR, "silu", ACTS)}),
    _d(Op.MOE, ("x", "router", I("bias", optional=True), "gate_up", "down", I("shared_gate", optional=True),
                I("shared_up", optional=True), I("shared_down", optional=True)), r.moe,
       "mixture of experts on x [..., H]: route (moe_route), each token through its top_k experts' "
       "act(x @ gate.T) * (x @ up.T) @ down.T (gate_up [E, 2I, H] = [gate; up], down [E, H, I]) times its routing "
       "weight, summed; plus the shared expert's SwiGLU MLP on every token", _MOE),
    _d(Op.MOE_ROUTE, ("x", "router", I("bias", optional=True)), r.moe_route,
       "expert ids [..., top_k] (i32) and routing weights: softmax(x @ router.T) in f32 then top_k, or sigmoid "
       "scores chosen by score + bias within the topk_group best groups (group score: sum of its top 2); "
       "weights renormalised if asked, times scaling", _ROUTE),
    _d(Op.MOE_SORT, ("ids",), r.moe_sort,
       "order: the flattened (token, k) pair indices stably sorted by expert; offsets [E+1]: where each expert's "
       "rows start", {"experts": AttrSpec(K.INT)}),
    _d(Op.GROUPED_GEMM, ("x", "w", "order", "offsets", I("scale", optional=True)), r.grouped_gemm,
       "rows r in offsets[e]..offsets[e+1] times expert e's w [E, N, K]: row r is x[r], or with gather = top_k "
       "the token row x_flat[order[r] // top_k]; act: act(first half) * second half; scale: times "
       "scale_flat[order[r]] (in the scale's dtype, then cast)",
       {"gather": AttrSpec(K.INT, 0), "act": AttrSpec(K.STR, "none", ("none",) + ACTS)}),
    _d(Op.MOE_COMBINE, ("y", "order", "like"), r.moe_combine,
       "out_flat[order[r] // top_k] += y[r] in row order (per token: expert order), shaped like ``like``",
       {"top_k": AttrSpec(K.INT)}),
    _d(Op.KV_CACHE_WRITE, (I("cache", state=True), "values", "positions"), r.kv_cache_write,
       "new cache version with values [B,S,Hkv*D] stored at cache[b, :, positions[b,s]] (positions >= T skipped)",
       writes={0: 0}),
    _d(Op.CACHED_ATTENTION, ("q", "k_cache", "v_cache", "positions", "seq_lens"), r.cached_attention,
       "GQA attention of q [B,S,Hq*D] over cache slots t < seq_lens (causal: t <= pos_i); result [B,S,Hq*Dv]",
       _CACHED_ATTN),
]}
