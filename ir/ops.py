"""The op enum, grouped by kind, and the op sets passes refer to (derived from the rows' traits). Everything that
defines an op -- inputs, attributes, result rule, reference implementation, traits -- is its row in
``ir/opdefs.py``."""

from __future__ import annotations

import enum


class Op(enum.Enum):
    # ---- leaves: parameters, weight expressions, constants
    PARAM = "param"
    WEIGHT = "weight"
    CONSTANT = "constant"
    ARANGE = "arange"
    # ---- element-wise, binary (numpy broadcasting, equal dtypes)
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    MINIMUM = "minimum"
    MAXIMUM = "maximum"
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
    RELU = "relu"
    SOFTPLUS = "softplus"
    EXPM1 = "expm1"
    LOG = "log"
    FLOOR = "floor"
    ABS = "abs"
    CAST = "cast"
    # ---- element-wise with a boolean operand or result
    COMPARE = "compare"
    WHERE = "where"
    # ---- reductions
    MEAN = "mean"
    SUM = "sum"
    SOFTMAX = "softmax"
    ARGMAX = "argmax"
    TOPK = "topk"
    SORT = "sort"
    # ---- views and data movement
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    EXPAND = "expand"
    CONCAT = "concat"
    SPLIT = "split"
    SLICE = "slice"
    GATHER = "gather"
    SCATTER = "scatter"
    EMBEDDING = "embedding"
    # ---- contractions
    LINEAR = "linear"
    MATMUL = "matmul"
    # ---- LLM ops raised by the frontend
    RMS_NORM = "rms_norm"
    ROPE = "rope"
    ATTENTION = "attention"
    # ---- linear attention (KDA, gated delta nets): the parts the frontend captures from transformers' functions
    SHORT_CONV = "short_conv"
    DELTA_RULE = "delta_rule"
    # ---- multi-head latent attention: the expansion the frontend captures, the attention raise_mla makes of it
    MLA_EXPAND = "mla_expand"
    MLA_ATTENTION = "mla_attention"
    # ---- blocks captured whole by the frontend
    MOE = "moe"
    EXPERTS = "experts"
    # ---- MoE dispatch: made by moe_dispatch
    MOE_ROUTE = "moe_route"
    MOE_SORT = "moe_sort"
    GROUPED_GEMM = "grouped_gemm"
    MOE_COMBINE = "moe_combine"
    # ---- fused ops: made by the fusion passes and arm
    RMS_NORM_LINEAR = "rms_norm_linear"
    SWIGLU = "swiglu"
    ARM_MLP = "arm_mlp"
    # ---- state: the stateful forms insert_state makes (each stateful op's row says its own)
    KV_CACHE_WRITE = "kv_cache_write"
    CACHED_ATTENTION = "cached_attention"
    CACHED_SHORT_CONV = "cached_short_conv"
    CACHED_DELTA_RULE = "cached_delta_rule"
    CACHED_MLA_ATTENTION = "cached_mla_attention"
    # ---- tensor parallelism: collectives (passes/tensor_parallel.py) and their fusion
    ALLREDUCE = "allreduce"
    ALLREDUCE_ADD_RMS_NORM = "allreduce_add_rms_norm"
    ALLGATHER = "allgather"
    # ---- backend fusions: made by a backend's tail passes (passes/backend.py)
    ROPE_CACHE_WRITE = "rope_cache_write"
    ROPE_CACHED_ATTENTION = "rope_cached_attention"
    RMS_NORM_MOE_ROUTE = "rms_norm_moe_route"
    EW_CHAIN = "ew_chain"

    def __str__(self) -> str:
        return self.value


# Op sets by trait, derived from the op table's rows (``ir/opdefs.py``), looked up on first use.
_BY_TRAIT = {"BINARY": ("BINARY",), "UNARY": ("UNARY",), "ELEMENTWISE": ("BINARY", "UNARY"), "REDUCE": ("REDUCE",),
             "VIEW": ("VIEW",), "LEAF": ("LEAF",), "RESIDUAL_EPILOGUE": ("RESIDUAL_EPILOGUE",),
             "WEIGHT_LEAF": ("WEIGHT",), "COLLECTIVES": ("COLLECTIVE",)}


def __getattr__(name: str) -> frozenset:
    if name not in _BY_TRAIT:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from lowerlm.ir.opdefs import Trait, ops_with

    value = frozenset().union(*(ops_with(Trait[t]) for t in _BY_TRAIT[name]))
    globals()[name] = value
    return value
