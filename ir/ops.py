"""The op enum, grouped by kind, and the op sets passes refer to. What each op takes and yields is in
``ir/opdefs.py``; how it computes is in ``codegen/reference.py``."""

from __future__ import annotations

import enum


class Op(enum.Enum):
    # ---- leaves: parameters, weight expressions, constants
    PARAM = "param"
    WEIGHT = "weight"
    CONSTANT = "constant"
    # ---- element-wise, binary (numpy broadcasting, equal dtypes)
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    # ---- element-wise, unary
    NEG = "neg"
    EXP = "exp"
    RSQRT = "rsqrt"
    POW = "pow"
    SILU = "silu"
    GELU = "gelu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    COS = "cos"
    SIN = "sin"
    CAST = "cast"
    # ---- reductions
    MEAN = "mean"
    SUM = "sum"
    SOFTMAX = "softmax"
    ARGMAX = "argmax"
    TOPK = "topk"
    # ---- views and data movement
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    EXPAND = "expand"
    CONCAT = "concat"
    SPLIT = "split"
    SLICE = "slice"
    GATHER = "gather"
    EMBEDDING = "embedding"
    # ---- contractions
    LINEAR = "linear"
    MATMUL = "matmul"
    # ---- LLM ops raised by the frontend
    RMS_NORM = "rms_norm"
    ROPE = "rope"
    ATTENTION = "attention"
    # ---- blocks captured whole by the frontend
    MOE = "moe"
    # ---- MoE dispatch: made by moe_dispatch
    MOE_ROUTE = "moe_route"
    MOE_SORT = "moe_sort"
    GROUPED_GEMM = "grouped_gemm"
    MOE_COMBINE = "moe_combine"
    # ---- fused ops: made by the fusion passes and arm
    RMS_NORM_LINEAR = "rms_norm_linear"
    SWIGLU = "swiglu"
    ARM_MLP = "arm_mlp"
    # ---- state: made by insert_kv_cache
    KV_CACHE_WRITE = "kv_cache_write"
    CACHED_ATTENTION = "cached_attention"

    def __str__(self) -> str:
        return self.value


BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV})
UNARY = frozenset({Op.NEG, Op.EXP, Op.RSQRT, Op.POW, Op.SILU, Op.GELU, Op.SIGMOID, Op.TANH, Op.COS, Op.SIN,
                   Op.CAST})
ELEMENTWISE = BINARY | UNARY
REDUCE = frozenset({Op.MEAN, Op.SUM, Op.SOFTMAX, Op.ARGMAX, Op.TOPK})
VIEW = frozenset({Op.RESHAPE, Op.TRANSPOSE, Op.EXPAND, Op.SLICE})
LEAF = frozenset({Op.PARAM, Op.WEIGHT, Op.CONSTANT})
# ops with a residual epilogue: an optional ``residual`` input added to the result
RESIDUAL_EPILOGUE = frozenset({Op.LINEAR, Op.ARM_MLP})
# ops whose result is computed from the weight table alone, once at load time
WEIGHT_LEAF = frozenset({Op.PARAM, Op.WEIGHT})
