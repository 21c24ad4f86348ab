"""IR graph → ONNX model (opset 24), op by op, with the weights as initializers.

``LOWERINGS`` holds each op's lowering, ``lowering(lw, call)`` with ``call`` a ``Call`` (the op's ONNX input names,
attributes, IR types); ``ONNX_OPS`` the ops that are one ONNX op of the same inputs (a new element-wise op is one line
there); ``NOT_LOWERED`` the ops without a lowering; ``REFUSALS`` the attribute values a lowering refuses.
``refusal(op, attrs)`` reads those declarations, and both ``unsupported(g)`` (what ``auto`` asks) and
``Lowering.emit`` go by it.

Symbolic dimensions are computed at run time from the inputs' shapes (``B`` and ``S`` from ``input_ids``, ``T``
from a cache), so one model serves every batch and length. The fused ops expand into standard ops with the
reference backend's rounding points: RMSNorm in f32 then cast, RoPE from positions × inv_freq, cache writes
with TensorScatter (opset 24: contiguous writes from each sequence's first position), attention as masked
softmax over the visible keys (a query that sees none gets zeros) of the cache's first max(seq_lens) slots, so a
decode step costs by the valid length; logit soft-capping (``softcap``) and attention sinks (``sinks``) as the
reference computes them (``Lowering._attention_probs``). The backend fusions (``rope_cache_write``,
``rms_norm_moe_route``, ``ew_chain``) lower as the compositions they replace, each part through its own lowering.
Values every layer would compute alike (cos/sin, masks) are built once. Without ``contrib`` (standalone exports)
attention is one opset-24 ``Attention`` (its ``softcap`` attribute; with sinks, which it lacks, the masked softmax);
with it, a ``rope_cached_attention`` without q/k norms (passes/backend.py, ``fuse_gqa_attention``) is com.microsoft
GroupQueryAttention where ONNX Runtime's kernel takes it (causal, no window, half layout, head size a multiple of
16, sinks in q's dtype: its ``softcap`` attribute and ``head_sink`` input compute both): in decode (one token at
``seq_lens - 1``) and in a prefill, which runs positions p0..p0+S-1 (a first prompt, or a chunk continuing the
cache with every row full; ``OnnxProgram._check_chunk`` checks). Otherwise ``rope_cached_attention`` lowers as its
composition too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowerlm.codegen.onnx import linear_attention as la
from lowerlm.codegen.onnx import mla
from lowerlm.ir.abi import GELU_TANH, SEQ, SILU
from lowerlm.ir.body import steps, types
from lowerlm.ir.dtypes import DType
from lowerlm.ir.errors import CompileError
from lowerlm.ir.graph import Graph, Node
from lowerlm.ir.opdefs import OPDEFS
from lowerlm.ir.ops import COLLECTIVES, Op
from lowerlm.ir.shapes import Sym

OPSET = 24
_ONNX_DTYPE = {DType.F32: TensorProto.FLOAT, DType.F16: TensorProto.FLOAT16, DType.BF16: TensorProto.BFLOAT16,
               DType.F64: TensorProto.DOUBLE, DType.I64: TensorProto.INT64, DType.I32: TensorProto.INT32,
               DType.I16: TensorProto.INT16, DType.I8: TensorProto.INT8, DType.U8: TensorProto.UINT8,
               DType.BOOL: TensorProto.BOOL}


def _vi(name: str, t) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, int) else str(d) for d in t.shape]
    return helper.make_tensor_value_info(name, _ONNX_DTYPE[t.dtype], dims)


@dataclass
class Call:
    """One op to lower: the ONNX names of its inputs by slot (None for an absent optional one), its attributes with
    defaults filled in, the IR types of its inputs (None where absent) and results, and the IR node it comes from
    (params and weights read their tensor by it; None for the parts of a composition, which are calls of their own)."""

    op: Op
    x: list
    a: dict
    ins: list
    outs: list
    node: Node | None = None


class Lowering:
    def __init__(self, g: Graph, constants, contrib: bool = True, weight_bits: int | None = None, packer=None):
        self.g, self.constants = g, constants  # constants: node -> tensor (params and weight expressions)
        self.contrib = contrib  # com.microsoft ops (GroupQueryAttention) allowed: not in standalone exports
        # weights on a 4-bit grid as exact 4-bit MatMulNBits; with weight_bits=4 every weight rounded onto one;
        # weight_bits=8: ONNX Runtime's quantizer (codegen/onnx/quantize.py)
        if weight_bits == 4 and (packer is None or packer.exact):
            from lowerlm.codegen.onnx.quantize import Packer

            packer = Packer(exact=False)
        self.packer = packer
        self.weight_bits = weight_bits if weight_bits == 8 else None
        self._arrays: dict = {}  # initializer name -> its array (weights of packed or quantized MatMuls)
        self.nodes: list = []
        self.inits: list = []
        self._n = 0
        self._dims: dict = {}
        self._memo: dict = {}  # per-graph values every layer shares (cos/sin tables, attention masks)
        self.sources: dict = {}  # symbol -> (value name, axis)
        # state inputs come last: a Shape read of a cache would keep ONNX Runtime from updating it in place
        for v in list(g.inputs) + list(g.state):
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, Sym) and len(d.symbols) == 1 and str(d) in d.symbols:
                    self.sources.setdefault(str(d), (v.name, axis))

    # ---- helpers ----------------------------------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        self._n += 1
        return f"_{hint}_{self._n}"

    def op(self, op_type: str, inputs: list, n_out: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        name = self.fresh("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def scalar(self, value, dtype: DType) -> str:
        return self.const(np.array(value), dtype=_np_dtype(dtype))

    def dim(self, d) -> str:
        """An int64 [1] tensor holding dimension ``d``."""
        if isinstance(d, int):
            return self.const([d])
        key = str(d)
        if key in self._dims:
            return self._dims[key]
        total = None
        for mono, coef in d.terms:
            term = self.const([coef])
            for atom, power in mono:
                base = self._symbol(atom) if isinstance(atom, str) else self.op(
                    "Div", [self.dim(atom.num), self.const([atom.den])])
                for _ in range(power):
                    term = self.op("Mul", [term, base])
            total = term if total is None else self.op("Add", [total, term])
        self._dims[key] = total
        return total

    def _symbol(self, name: str) -> str:
        if name not in self.sources:
            raise CompileError(f"shape symbol {name} cannot be read off graph {self.g.name}'s inputs")
        value, axis = self.sources[name]
        return self.op("Shape", [value], start=axis, end=axis + 1)

    def shape(self, dims) -> str:
        if all(isinstance(d, int) for d in dims):
            return self.const(list(dims))
        return self.op("Concat", [self.dim(d) for d in dims], axis=0)

    def cast(self, x: str, dtype: DType) -> str:
        return self.op("Cast", [x], to=_ONNX_DTYPE[dtype])

    # ---- the graph --------------------------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        g = self.g
        self.names = {v.name: v.name for v in list(g.inputs) + list(g.state)}  # IR value -> ONNX value
        for node in g.nodes:
            outs = self.lower(node)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for r, o in zip(node.results, outs):
                if o is not None:
                    self.names[r.name] = o
        outputs = []
        for o in g.outputs:
            self.nodes.append(helper.make_node("Identity", [self.names[o]], [o]))
            outputs.append(_vi(o, g.type_of(o)))
        state_out = []
        for s, o in zip(g.state, g.state_outputs):
            # the cache write's own output is the state output, so the runtime can bind it to the input's buffer
            self._rename(self.names[o], s.name + ".out")
            state_out.append(_vi(s.name + ".out", s.type))
        used = {i for n in self.nodes for i in n.input}
        inits = [t for t in self.inits if t.name in used]  # weights only read transposed are left out
        graph = helper.make_graph(self.nodes, g.name, [_vi(v.name, v.type) for v in g.inputs] +
                                  [_vi(s.name, s.type) for s in g.state], outputs + state_out, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)], ir_version=11)
        if self.weight_bits:
            from lowerlm.codegen.onnx.quantize import quantize_weights

            return quantize_weights(model, self.weight_bits)
        return model

    def _rename(self, old: str, new: str) -> None:
        for n in self.nodes:
            for i, v in enumerate(n.output):
                if v == old:
                    n.output[i] = new
            for i, v in enumerate(n.input):
                if v == old:
                    n.input[i] = new

    def lower(self, node: Node):
        """The ONNX names of the node's results (a name, or a list; None for a result not made)."""
        x = [self.names[v] if v is not None else None for v in node.inputs]
        ins = [self.g.type_of(v) if v is not None else None for v in node.inputs]
        return self.emit(Call(node.op, x, node.all_attrs(), ins, [r.type for r in node.results], node))

    def emit(self, c: Call):
        """``c`` lowered by its ``LOWERINGS`` entry, or the ``CompileError`` that ``refusal`` gives."""
        reason = refusal(c.op, c.a)
        if reason is not None:
            raise CompileError(reason)
        return LOWERINGS[c.op](self, c)

    # ---- leaves and core ops ------------------------------------------------------------------------------
    def weight(self, c: Call) -> str:
        array = _to_numpy(self.constants(c.node))
        name = self.fresh("w")
        self.inits.append(numpy_helper.from_array(array, name))
        if self.packer is not None or self.weight_bits:
            self._arrays[name] = array
        return name

    def constant(self, c: Call) -> str:
        value, t = c.a["value"], c.outs[0]
        arr = np.full([int(d) for d in t.shape], value) if not isinstance(value, tuple) else \
            np.array(value).reshape([int(d) for d in t.shape])
        return self.const(arr, dtype=_np_dtype(t.dtype))

    def reduce(self, op_type: str, c: Call) -> str:
        return self.op(op_type, [c.x[0], self.const(list(c.a["dims"]))], keepdims=int(c.a["keepdim"]))

    def slice(self, c: Call) -> str:
        a = c.a
        return self.op("Slice", [c.x[0], self.dim(a["start"]), self.dim(a["end"]), self.const([a["dim"]]),
                                 self.const([a["step"]])])

    # ---- fused ops ----------------------------------------------------------------------------------------
    def linear(self, x, w, bias=None, residual=None):
        found = self.packer(self._arrays[w]) if self.packer is not None and w in self._arrays and \
            not self.weight_bits else None
        if found is not None:
            y = self._nbits(x, w, found)
        elif w in self._arrays and self._arrays[w].ndim == 2:
            # a constant [K, N] right operand is what ONNX Runtime's MatMulNBits quantizer rewrites
            if ("transposed", w) not in self._memo:
                name = self.fresh("wt")
                self.inits.append(numpy_helper.from_array(np.ascontiguousarray(self._arrays[w].T), name))
                self._memo[("transposed", w)] = name
            y = self.op("MatMul", [x, self._memo[("transposed", w)]])
        else:
            y = self.op("MatMul", [x, self.op("Transpose", [w], perm=[1, 0])])
        if bias is not None:
            y = self.op("Add", [y, bias])
        return self.op("Add", [y, residual]) if residual is not None else y

    def _nbits(self, x, w, found):
        """x @ W.T for a weight exactly on 4-bit grids: one MatMulNBits per term + the per-block offsets
        (quantize.py)."""
        if ("nbits", w) not in self._memo:
            terms, offsets = found
            names = []
            for codes, scales in terms:
                names.append((self.fresh("q4"), self.fresh("q4s")))
                self.inits += [numpy_helper.from_array(codes, names[-1][0]),
                               numpy_helper.from_array(scales, names[-1][1])]
            k, n = offsets.shape[0] * 32, offsets.shape[1]
            if ("blocksum", k) not in self._memo:
                indicator = (np.arange(k)[:, None] // 32 == np.arange(k // 32)[None, :]).astype(np.float32)
                self._memo[("blocksum", k)] = self.const(indicator, dtype=np.float32)
            self._memo[("nbits", w)] = (names, self.const(offsets, dtype=np.float32), k, n)
        names, offsets, k, n = self._memo[("nbits", w)]
        y = self.op("MatMul", [self.op("MatMul", [x, self._memo[("blocksum", k)]]), offsets])
        for codes, scales in names:
            y = self.op("Add", [self.op("MatMulNBits", [x, codes, scales], domain="com.microsoft", K=k, N=n, bits=4,
                                        block_size=32, accuracy_level=1), y])
        return y

    def rms_norm(self, x, w, eps, dtype):
        if dtype == DType.F32:  # one opset-23 op; in f32 it is transformers' formula (no rounding in between)
            return self.op("RMSNormalization", [x, w], axis=-1, epsilon=float(eps))
        x32 = self.cast(x, DType.F32)
        ms = self.op("ReduceMean", [self.op("Mul", [x32, x32]), self.const([-1])], keepdims=1)
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, self.scalar(eps, DType.F32)])])])
        return self.op("Mul", [w, self.cast(self.op("Mul", [x32, inv]), dtype)])

    def activation(self, x, act):
        if act == SILU:
            return self.op("Mul", [x, self.op("Sigmoid", [x])])
        return self.op("Gelu", [x], approximate="tanh" if act == GELU_TANH else "none")

    def glu(self, gate, up, a: dict, dtype: DType) -> str:
        """The experts' gated unit (ir/compute.py's ``glu``) with its clamps, alpha and up shift."""
        limit = a["limit"]
        if limit:
            lo, hi = self.scalar(-limit, dtype), self.scalar(limit, dtype)
            up = self.op("Clip", [up, lo, hi])
            if a["clamp"] == "gate":
                gate = self.op("Min", [gate, hi])
        if a["act"] == SILU and a["alpha"] != 1.0:
            g = self.op("Mul", [gate, self.op("Sigmoid", [self.op("Mul", [gate, self.scalar(a["alpha"], dtype)])])])
        else:
            g = self.activation(gate, a["act"])
        if limit and a["clamp"] == "act":
            g = self.op("Min", [g, self.scalar(limit, dtype)])
        if a["up_shift"]:
            up = self.op("Add", [up, self.scalar(a["up_shift"], dtype)])
        return self.op("Mul", [g, up])


    def arange(self, c: Call) -> str:
        scalar = [self.op("Squeeze", [self.dim(c.a[k])]) for k in ("start", "end")]
        return self.cast(self.op("Range", scalar + [self.const(c.a["step"])]), c.outs[0].dtype)

    def softplus(self, c: Call) -> str:
        """torch's softplus: x where beta x > threshold (ONNX's Softplus has neither attribute)."""
        x, dtype, beta = c.x[0], c.outs[0].dtype, c.a["beta"]
        bx = x if beta == 1.0 else self.op("Mul", [x, self.scalar(beta, dtype)])
        soft = self.op("Softplus", [bx])
        soft = soft if beta == 1.0 else self.op("Div", [soft, self.scalar(beta, dtype)])
        return self.op("Where", [self.op("Greater", [bx, self.scalar(c.a["threshold"], dtype)]), x, soft])

    def expm1(self, c: Call) -> str:
        """e^x - 1 without exp's cancellation near 0: its Taylor series to x^4 there (ONNX has no Expm1)."""
        x, dtype = c.x[0], c.outs[0].dtype
        series = self.scalar(1.0 / 24, dtype)
        for k in (6, 2, 1):
            series = self.op("Add", [self.scalar(1.0 / k, dtype), self.op("Mul", [x, series])])
        small = self.op("Less", [self.op("Abs", [x]), self.scalar(0.01, dtype)])
        exp = self.op("Sub", [self.op("Exp", [x]), self.scalar(1.0, dtype)])
        return self.op("Where", [small, self.op("Mul", [x, series]), exp])

    def where(self, c: Call) -> str:
        """Where, or for bool values (ONNX Runtime's Where has no bool kernel) (cond and a) or (not cond and b)."""
        cond, a, b = c.x
        if c.outs[0].dtype is not DType.BOOL:
            return self.op("Where", c.x)
        return self.op("Or", [self.op("And", [cond, a]), self.op("And", [self.op("Not", [cond]), b])])

    def compare(self, c: Call) -> str:
        pred = c.a["pred"]
        if pred == "ne":
            return self.op("Not", [self.op("Equal", c.x)])
        return self.op(_COMPARISONS[pred], c.x)

    def rms_norm_linear(self, c: Call) -> list:
        x, nw, w, bias, residual = c.x
        r = x if residual is None else self.op("Add", [x, residual])
        y = self.linear(self.rms_norm(r, nw, c.a["eps"], c.outs[0].dtype), w, bias)
        splits = list(c.a["splits"])
        pieces = self.op("Split", [y, self.const(splits)], len(splits), axis=-1)
        pieces = [pieces] if isinstance(pieces, str) else list(pieces)
        if c.a["act"] != "none":
            pieces = [self.op("Mul", [self.activation(pieces[0], c.a["act"]), pieces[1]])]
        return pieces + ([r] if residual is not None else [])

    def arm_mlp(self, c: Call) -> str:
        inp, nw, gate_m, up, down, mu, scale, residual = c.x
        a, dtype = c.a, c.outs[0].dtype
        inter = c.ins[3].shape[0]
        hidden = c.ins[0].shape[-1]
        h = self.rms_norm(inp, nw, a["eps"], dtype)
        g, m = self.op("Split", [self.linear(h, gate_m), self.const([inter, hidden])], 2, axis=-1)
        a_hat = self.op("Div", [self.op("Sub", [self.activation(g, a["act"]), mu]), scale])
        keep = self.op("GreaterOrEqual", [self.op("Abs", [a_hat]), self.scalar(a["tau"], dtype)])
        a_hat = self.op("Where", [keep, a_hat, self.scalar(0.0, dtype)])
        y = self.op("Add", [self.linear(self.op("Mul", [a_hat, self.linear(h, up)]), down), m])
        return self.op("Add", [y, residual]) if residual is not None else y

    # ---- MoE dispatch (the reference implementations' formulas, ir/compute.py) --------------------------------
    def moe_route(self, c: Call) -> list:
        inp, router, bias = c.x
        a, xt = c.a, c.ins[0]
        h = self.op("Reshape", [inp, self.const([-1, xt.shape[-1]])])
        w = self.op("Transpose", [router], perm=[1, 0])
        if a["router_f32"]:
            h, w = self.cast(h, DType.F32), self.cast(w, DType.F32)
        logits = self.op("MatMul", [h, w])  # [N, E]
        k = self.const([a["top_k"]])
        if a["router"] == "softmax":
            weights, ids = self.op("TopK", [self.op("Softmax", [self.cast(logits, DType.F32)], axis=-1), k], 2,
                                   axis=-1)
            if a["renormalize"]:
                weights = self.op("Div", [weights, self.op("ReduceSum", [weights, self.const([-1])], keepdims=1)])
        elif a["router"] == "topk_softmax":
            weights, ids = self.op("TopK", [self.cast(logits, DType.F32), k], 2, axis=-1)
            weights = self.op("Softmax", [weights], axis=-1)
            if a["renormalize"]:
                weights = self.op("Div", [weights, self.op("ReduceSum", [weights, self.const([-1])], keepdims=1)])
        else:
            weights, ids = self._sigmoid_route(c, logits, bias, k)
        if a["scaling"] != 1.0:
            weights = self.op("Mul", [weights, self.scalar(a["scaling"], DType.F32)])
        if not a["weights_f32"]:
            weights = self.cast(weights, xt.dtype)
        lead = self.op("Shape", [inp], start=0, end=-1)
        shape = self.op("Concat", [lead, k], axis=0)
        return [self.op("Reshape", [self.cast(ids, DType.I32), shape]), self.op("Reshape", [weights, shape])]

    def _sigmoid_route(self, c: Call, logits: str, bias, k: str) -> tuple:
        """(weights, ids): sigmoid scores, chosen by score + bias within the topk_group best groups."""
        a = c.a
        scores = self.op("Sigmoid", [self.cast(logits, DType.F32)])
        choice = scores if bias is None else self.op("Add", [scores, self.cast(bias, DType.F32)])
        groups = a["n_group"]
        if groups > 1:
            e = c.ins[1].shape[0]
            grouped = self.op("Reshape", [choice, self.const([-1, groups, e // groups])])
            best2 = self.op("TopK", [grouped, self.const([2])], 2, axis=-1)[0]
            group_score = self.op("ReduceSum", [best2, self.const([-1])], keepdims=0)  # [N, G]
            keep = self.op("TopK", [group_score, self.const([a["topk_group"]])], 2, axis=-1)[1]
            zeros = self.op("Mul", [group_score, self.scalar(0.0, DType.F32)])
            ones = self.op("Add", [self.op("Mul", [self.cast(keep, DType.F32), self.scalar(0.0, DType.F32)]),
                                   self.scalar(1.0, DType.F32)])
            allowed = self.op("ScatterElements", [zeros, keep, ones], axis=1)  # [N, G] of 0/1
            allowed = self.op("Expand", [self.op("Unsqueeze", [allowed, self.const([2])]),
                                         self.const([1, groups, e // groups])])
            allowed = self.cast(self.op("Reshape", [allowed, self.const([-1, e])]), DType.BOOL)
            choice = self.op("Where", [allowed, choice, self.scalar(float("-inf"), DType.F32)])
        ids = self.op("TopK", [choice, k], 2, axis=-1)[1]
        weights = self.op("GatherElements", [scores, ids], axis=1)
        if a["renormalize"]:
            total = self.op("ReduceSum", [weights, self.const([-1])], keepdims=1)
            if a["renorm_eps"]:
                total = self.op("Add", [total, self.scalar(a["renorm_eps"], DType.F32)])
            weights = self.op("Div", [weights, total])
        return weights, ids

    def moe_sort(self, ids, experts: int):
        flat = self.cast(self.op("Reshape", [ids, self.const([-1])]), DType.I64)
        rows = self.op("Reshape", [self.op("Size", [flat]), self.const([1])])  # [1]
        index = self.op("Range", [self.const(0), self.op("Squeeze", [rows]), self.const(1)])
        # a stable sort by expert: TopK (smallest first) over expert * R + pair index, which are all distinct
        key = self.op("Add", [self.op("Mul", [flat, rows]), index])
        order = self.op("TopK", [key, rows], 2, axis=0, largest=0, sorted=1)[1]
        hits = self.op("Equal", [self.op("Unsqueeze", [flat, self.const([1])]),
                                 self.op("Unsqueeze", [self.op("Range", [self.const(0), self.const(experts),
                                                                         self.const(1)]), self.const([0])])])
        counts = self.op("ReduceSum", [self.cast(hits, DType.I64), self.const([0])], keepdims=0)  # [E]
        offsets = self.op("Concat", [self.const([0]), self.op("CumSum", [counts, self.const(0)])], axis=0)
        return [self.cast(order, DType.I32), self.cast(offsets, DType.I32)]

    def grouped_gemm(self, c: Call) -> str:
        """Two forms, chosen by the graph: with one token per sequence (decode) each row's expert weights are
        gathered and applied as a batched matrix-vector product, so a step reads exactly the selected experts;
        with S tokens (prefill) each expert's contiguous segment of the sorted rows is sliced out and multiplied
        by that expert's weights (constant-folded per expert), and the segments are concatenated back in order."""
        inp, w, order, offsets, scale, bias = c.x
        a, (xt, wt) = c.a, c.ins[:2]
        order64 = self.cast(order, DType.I64)
        rows = inp
        if a["gather"]:
            flat = self.op("Reshape", [inp, self.const([-1, xt.shape[-1]])])
            rows = self.op("Gather", [flat, self.op("Div", [order64, self.const(a["gather"])])], axis=0)
        if SEQ in c.ins[2].symbols:  # prefill: segments per expert
            offsets64 = self.cast(offsets, DType.I64)
            pieces = []
            for e in range(wt.shape[0]):
                bounds = [self.op("Slice", [offsets64, self.const([i]), self.const([i + 1])]) for i in (e, e + 1)]
                segment = self.op("Slice", [rows, bounds[0], bounds[1], self.const([0])])  # [R_e, K]
                w_e = self.op("Gather", [w, self.const(e)], axis=0)  # [N, K]
                piece = self.op("MatMul", [segment, self.op("Transpose", [w_e], perm=[1, 0])])
                if bias is not None:  # expert e's bias row, added to the product in the model's dtype
                    piece = self.op("Add", [piece, self.op("Gather", [bias, self.const(e)], axis=0)])
                pieces.append(piece)
            y = self.op("Concat", pieces, axis=0)  # [R, N]
        else:
            n_rows = self.op("Shape", [order64])  # [1]
            index = self.op("Range", [self.const(0), self.op("Squeeze", [n_rows]), self.const(1)])
            ends = self.op("Slice", [self.cast(offsets, DType.I64), self.const([1]), self.const([2 ** 62]),
                                     self.const([0])])
            # rows are sorted by expert: row r belongs to the number of segments that end at or before it
            expert = self.op("ReduceSum", [self.cast(self.op("GreaterOrEqual", [
                self.op("Unsqueeze", [index, self.const([1])]), self.op("Unsqueeze", [ends, self.const([0])])]),
                DType.I64), self.const([1])], keepdims=0)  # [R]
            weights = self.op("Gather", [w, expert], axis=0)  # [R, N, K]
            y = self.op("MatMul", [self.op("Unsqueeze", [rows, self.const([1])]),
                                   self.op("Transpose", [weights], perm=[0, 2, 1])])
            y = self.op("Squeeze", [y, self.const([1])])  # [R, N]
            if bias is not None:
                y = self.op("Add", [y, self.op("Gather", [bias, expert], axis=0)])
        if a["act"] != "none":
            gate, up = self.op("Split", [y], 2, axis=-1, num_outputs=2)
            y = self.glu(gate, up, a, xt.dtype)
        if scale is not None:
            st = c.ins[4]
            picked = self.op("Gather", [self.op("Reshape", [scale, self.const([-1])]), order64], axis=0)
            y = self.op("Mul", [self.cast(y, st.dtype), self.op("Unsqueeze", [picked, self.const([1])])])
            y = self.cast(y, xt.dtype)
        return y

    def moe_combine(self, c: Call) -> str:
        """Each token's k rows summed: the rows put back in (token, k) order through the inverse of ``order``
        (a scatter of distinct indices) and reduced over k. A ScatterND with reduction=add over the token of each
        row would be shorter, but ONNX Runtime's CPU kernel adds duplicate indices from parallel threads without
        synchronising once the rows are wide (hidden 1024): updates were lost, nondeterministically."""
        y, order, like = c.x
        lt, k = c.ins[2], c.a["top_k"]
        hidden = lt.shape[-1]
        order64 = self.cast(order, DType.I64)
        rows = self.op("Shape", [order64])  # [1]: the T*k rows
        index = self.op("Range", [self.const(0), self.op("Squeeze", [rows]), self.const(1)])
        inverse = self.op("ScatterElements", [index, order64, index], axis=0)  # inverse[order[r]] = r
        pairs = self.op("Gather", [y, inverse], axis=0)  # [T*k, H] in (token, k) order
        out = self.op("ReduceSum", [self.op("Reshape", [pairs, self.const([-1, k, hidden])]), self.const([1])],
                      keepdims=0)
        return self.op("Reshape", [out, self.op("Shape", [like])])

    def rope(self, c: Call) -> list:
        """Both layouts: ``half`` rotates the first half of the rotary dims against the second, ``interleaved``
        even dims against odd ones (pairs viewed as a trailing axis of 2)."""
        (q, k, positions), a = c.x, c.a
        dtype, layout = c.ins[0].dtype, a["layout"]
        cos, sin = self._cos_sin(positions, tuple(a["inv_freq"]), a["scaling"], dtype, layout)
        rdim = 2 * len(a["inv_freq"])
        outs = []
        for slot, value, heads in ((0, q, a["heads"][0]), (1, k, a["heads"][1])):
            t = c.ins[slot]
            b, s, width = t.shape
            d = width // heads
            xh = self.op("Reshape", [value, self.shape([b, s, heads, d])])
            rot, rest = (xh, None) if rdim == d else self.op("Split", [xh, self.const([rdim, d - rdim])], 2, axis=-1)
            y = self.op("Add", [self.op("Mul", [rot, cos]), self.op("Mul", [self._rotated(rot, rdim, layout), sin])])
            if rest is not None:
                y = self.op("Concat", [y, rest], axis=-1)
            outs.append(self.op("Reshape", [y, self.shape([b, s, width])]))
        return outs

    def _rotated(self, rot: str, rdim: int, layout: str) -> str:
        """rot's rotated partner (``ir/rope.py``'s ``rotate``) over its last axis of ``rdim``."""
        if layout == "half":
            x1, x2 = self.op("Split", [rot, self.const([rdim // 2, rdim // 2])], 2, axis=-1)
            return self.op("Concat", [self.op("Neg", [x2]), x1], axis=-1)
        pairs = self.op("Reshape", [rot, self.const([0, 0, 0, rdim // 2, 2])])  # [B, S, H, R/2, (even, odd)]
        x1, x2 = self.op("Split", [pairs, self.const([1, 1])], 2, axis=-1)
        return self.op("Reshape", [self.op("Concat", [self.op("Neg", [x2]), x1], axis=-1),
                                   self.const([0, 0, 0, rdim])])

    def _cos_sin(self, positions, inv_freq, scaling, dtype, layout: str = "half"):
        """cos/sin [B, S, 1, R] for the positions: computed once per graph, shared by every layer. Each angle is
        repeated as the layout pairs dims: the halves (half) or neighbours (interleaved)."""
        key = ("rope", positions, inv_freq, scaling, dtype, layout)
        if key not in self._memo:
            inv = self.const(np.array(inv_freq, dtype=np.float32), dtype=np.float32)
            angle = self.op("Mul", [self.op("Unsqueeze", [self.cast(positions, DType.F32), self.const([-1])]), inv])
            if layout == "half":
                emb = self.op("Concat", [angle, angle], axis=-1)  # [B, S, R]
            else:
                pair = self.op("Unsqueeze", [angle, self.const([-1])])  # [B, S, R/2, 1]
                emb = self.op("Reshape", [self.op("Concat", [pair, pair], axis=-1), self.const([0, 0, -1])])
            scale = self.scalar(scaling, DType.F32)
            self._memo[key] = tuple(
                self.op("Unsqueeze", [self.cast(self.op("Mul", [self.op(f, [emb]), scale]), dtype), self.const([2])])
                for f in ("Cos", "Sin"))
        return self._memo[key]

    def cache_write(self, c: Call) -> str:
        cache, values, positions = c.x
        b, hk, _, d = c.ins[0].shape
        s = c.ins[1].shape[1]
        update = self.op("Transpose", [self.op("Reshape", [values, self.shape([b, s, hk, d])])], perm=[0, 2, 1, 3])
        first = self.op("Squeeze", [self.op("Slice", [positions, self.const([0]), self.const([1]), self.const([1])]),
                                    self.const([1])])
        return self.op("TensorScatter", [cache, update, first], axis=-2)

    def attention(self, c: Call) -> str:
        """``attention`` and ``cached_attention`` as a masked softmax (``_attention_probs``); standalone (no
        com.microsoft ops) one opset-24 ``Attention`` instead, unless there are sinks (that op has none)."""
        if not self.contrib and c.x[5] is None:
            return self.standard_attention(c)
        x, a = c.x, c.a
        q, sinks = x[0], x[5]
        qt = c.ins[0]
        b, s, width = qt.shape
        if c.op is Op.CACHED_ATTENTION:
            _, kc, vc, positions, seq_lens = x[:5]
            kt = c.ins[1]
            hk, length, d = kt.shape[1], kt.shape[2], kt.shape[3]
            dv = c.ins[2].shape[3]
            hq = width // d
            # only slots below the longest valid length can be visible: attend over [:L], so a decode step
            # costs by the valid length, not by the cache's capacity T
            if ("len", seq_lens) not in self._memo:
                self._memo[("len", seq_lens)] = self.op("ReduceMax", [self.cast(seq_lens, DType.I64)], keepdims=1)
            length = self._memo[("len", seq_lens)]  # [1]
            axes, zero = self.const([2]), self.const([0])
            k4 = self.op("Slice", [kc, zero, length, axes])  # [B, Hk, L, D]
            v4 = self.op("Slice", [vc, zero, length, axes])
            kpos = self.op("Unsqueeze", [self.op("Range", [self.const(0), self.op("Squeeze", [length]),
                                                          self.const(1)]), self.const([0])])  # [1, L]
        else:
            _, k, v, positions, seq_lens = x[:5]
            hq, hk = a["heads"]
            d = width // hq
            dv = c.ins[2].shape[2] // hk
            length = s
            k4 = self.op("Transpose", [self.op("Reshape", [k, self.shape([b, s, hk, d])])], perm=[0, 2, 1, 3])
            v4 = self.op("Transpose", [self.op("Reshape", [v, self.shape([b, s, hk, dv])])], perm=[0, 2, 1, 3])
            kpos = positions  # [B, L]
        group = hq // hk
        # q: [B, Hk, G, S, D] against k: [B, Hk, 1, L, D]
        q5 = self.op("Transpose", [self.op("Reshape", [q, self.shape([b, s, hk, group, d])])], perm=[0, 2, 3, 1, 4])
        k5 = self.op("Unsqueeze", [k4, self.const([2])])
        v5 = self.op("Unsqueeze", [v4, self.const([2])])
        dtype = qt.dtype
        scores = self.op("Mul", [self.op("MatMul", [q5, self.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])]),
                                 self.scalar(a["scale"], dtype)])  # [B, Hk, G, S, L]
        vis = self._visible(c, positions, seq_lens, kpos, length)
        if sinks is not None:  # query head h = kv head h // G, member h % G of its group
            sinks = self.op("Reshape", [sinks, self.const([1, hk, group, 1, 1])])
        probs = self._attention_probs(scores, vis, dtype, a["softcap"], sinks)
        out = self.op("MatMul", [probs, v5])  # [B, Hk, G, S, Dv]
        out = self.op("Transpose", [out], perm=[0, 3, 1, 2, 4])
        return self.op("Reshape", [out, self.shape([b, s, hq * dv])])

    def _attention_probs(self, scores: str, vis: str, dtype: DType, softcap: float, sinks) -> str:
        """The attention weights (in ``dtype``) of ``scores`` over the keys ``vis`` shows, as ``ir/compute.py``'s
        ``_attend``: scores softcapped (``softcap * tanh(scores / softcap)``) when ``softcap`` > 0, then masked and
        normalised; with ``sinks`` (one logit per head, shaped to broadcast against the scores' row reductions) each
        softmax has one more term, exp(sink - m), that takes weight but weighs no value. A query that sees no key
        gets zero weights. Softcap or sinks: the softmax in f32 as the reference's (transformers' eager attention)."""
        if softcap:
            cap = self.scalar(softcap, dtype)
            scores = self.op("Mul", [self.op("Tanh", [self.op("Div", [scores, cap])]), cap])
        work = DType.F32 if softcap or sinks is not None else dtype
        if work != dtype:
            scores = self.cast(scores, work)
        hidden = max(-1e30, float(np.finfo(_np_dtype(work)).min))  # finite in f16 too (-1e30 would cast to -inf)
        masked = self.op("Where", [vis, scores, self.scalar(hidden, work)])
        if sinks is None:
            probs = self.op("Softmax", [masked], axis=-1)
        else:  # softmax over [scores, sink]: the max over both, the sink's exp added to the denominator only
            sinks = self.cast(sinks, work)
            top = self.op("Max", [self.op("ReduceMax", [masked, self.const([-1])], keepdims=1), sinks])
            exps = self.op("Exp", [self.op("Sub", [masked, top])])
            total = self.op("Add", [self.op("ReduceSum", [exps, self.const([-1])], keepdims=1),
                                    self.op("Exp", [self.op("Sub", [sinks, top])])])
            probs = self.op("Div", [exps, total])
        # the mask zeroes the weights of a query that sees no key (its softmax is uniform over hidden scores)
        probs = self.op("Mul", [probs, self.cast(vis, work)])
        return probs if work == dtype else self.cast(probs, dtype)

    def standard_attention(self, c: Call) -> str:
        """opset-24 ``Attention`` over 4-D [B, H, L, D] keys and values: for a cache, the whole buffer with
        ``nonpad_kv_seqlen`` = seq_lens (the cache is written by TensorScatter outside the op); the causal and
        window mask is a boolean ``attn_mask`` [B, 1, S, T] built from the positions (ONNX allows a shorter one,
        ONNX Runtime 1.30 does not), so is_causal's alignment rules never come into play; ``softcap`` is the op's own
        attribute (applied before the mask, as the reference's). No sinks: ``attention`` lowers those."""
        (q, k, v, positions, seq_lens), a = c.x[:5], c.a
        qt = c.ins[0]
        b, s, width = qt.shape
        if c.op is Op.CACHED_ATTENTION:
            kt, vt = c.ins[1], c.ins[2]
            d, dv = kt.shape[3], vt.shape[3]
            hq = width // d
            k4, v4 = k, v
            # ONNX Runtime wants the mask as long as the cache: T read off the written cache (a Shape read of the
            # cache *input* would keep TensorScatter from writing in place)
            length = self.op("Shape", [k4], start=2, end=3)
            kpos = self.op("Unsqueeze", [self.op("Range", [self.const(0), self.op("Squeeze", [length]),
                                                          self.const(1)]), self.const([0])])  # [1, T]
        else:
            hq, hk = a["heads"]
            d = width // hq
            dv = c.ins[2].shape[2] // hk
            length, kpos = s, positions
            k4 = self.op("Transpose", [self.op("Reshape", [k, self.shape([b, s, hk, d])])], perm=[0, 2, 1, 3])
            v4 = self.op("Transpose", [self.op("Reshape", [v, self.shape([b, s, hk, dv])])], perm=[0, 2, 1, 3])
        q4 = self.op("Transpose", [self.op("Reshape", [q, self.shape([b, s, hq, d])])], perm=[0, 2, 1, 3])
        mask = self.op("Squeeze", [self._visible(c, positions, seq_lens, kpos, length), self.const([1])])
        if not a["causal"]:  # [B, 1, 1, L]: ONNX Runtime wants the query axis spelled out
            mask = self.op("Expand", [mask, self.shape([1, 1, s, 1])])
        out = self.op("Attention", [q4, k4, v4, mask, "", "", self.cast(seq_lens, DType.I64)],
                      scale=float(a["scale"]), softcap=float(a["softcap"]))  # [B, Hq, S, Dv]
        return self.op("Reshape", [self.op("Transpose", [out], perm=[0, 2, 1, 3]), self.shape([b, s, hq * dv])])

    def _visible(self, c: Call, positions, seq_lens, kpos, length):
        """The [B, 1, 1, S, L] visibility mask; layers with the same inputs and flags share one."""
        a = c.a
        key = ("mask", c.op, positions, seq_lens, kpos, str(length), a["causal"], a["window"])
        if key in self._memo:
            return self._memo[key]
        n_keys = length if isinstance(length, str) else self.dim(length)
        idx = self.op("Unsqueeze", [self.op("Range", [self.const(0), self.op("Squeeze", [n_keys]),
                                                      self.const(1)]), self.const([0])])  # [1, L]
        lens = self.op("Unsqueeze", [self.cast(seq_lens, DType.I64), self.const([1])])  # [B, 1]
        vis = self.op("Unsqueeze", [self.op("Less", [idx, lens]), self.const([1])])  # [B, 1, L]
        if a["causal"]:
            diff = self.op("Sub", [self.op("Unsqueeze", [positions, self.const([2])]),
                                   self.op("Unsqueeze", [kpos, self.const([1])])])  # [B, S, L]
            vis = self.op("And", [vis, self.op("GreaterOrEqual", [diff, self.const(0)])])
            if a["window"]:
                vis = self.op("And", [vis, self.op("Less", [diff, self.const(a["window"])])])
        self._memo[key] = self.op("Unsqueeze", [vis, self.const([1, 2])])
        return self._memo[key]


    # ---- backend fusions (passes/backend.py): GroupQueryAttention, else the compositions they replace ------------
    def rope_cache_write(self, c: Call) -> list:
        q, k, v, positions, kc, vc = c.x
        qt, kt, vt, pt, kct, vct = c.ins
        q, k = self.emit(Call(Op.ROPE, [q, k, positions], _pick(c.a, Op.ROPE), [qt, kt, pt], [qt, kt]))
        kc = self.emit(Call(Op.KV_CACHE_WRITE, [kc, k, positions], {}, [kct, kt, pt], [kct]))
        vc = self.emit(Call(Op.KV_CACHE_WRITE, [vc, v, positions], {}, [vct, vt, pt], [vct]))
        return [q, kc, vc]

    def rope_cached_attention(self, c: Call) -> list:
        """com.microsoft GroupQueryAttention where ``gqa_applies``; otherwise the head norms (when given), rope,
        the two cache writes and ``cached_attention``."""
        if gqa_applies(c, self.contrib):
            return self.gqa(c)
        q, k, v, positions, seq_lens, kc, vc, q_norm, k_norm, sinks = c.x
        qt, kt, vt, pt, lt, kct, vct = c.ins[:7]
        if q_norm is not None:
            q = self.head_rms_norm(q, q_norm, c.a["eps"], c.ins[7].shape[0], qt.dtype)
            k = self.head_rms_norm(k, k_norm, c.a["eps"], c.ins[8].shape[0], kt.dtype)
        q, kc, vc = self.rope_cache_write(Call(Op.ROPE_CACHE_WRITE, [q, k, v, positions, kc, vc],
                                               _pick(c.a, Op.ROPE_CACHE_WRITE), [qt, kt, vt, pt, kct, vct],
                                               [qt, kct, vct]))
        out = self.emit(Call(Op.CACHED_ATTENTION, [q, kc, vc, positions, seq_lens, sinks],
                             _pick(c.a, Op.CACHED_ATTENTION), [qt, kct, vct, pt, lt, c.ins[9]], c.outs[:1]))
        return [out, kc, vc]

    def head_rms_norm(self, x: str, w: str, eps: float, d: int, dtype: DType) -> str:
        """RMSNorm of each head of x [B, S, H*D] with weight [D] (Qwen3's q/k norms)."""
        heads = self.op("Reshape", [x, self.const([0, 0, -1, d])])
        return self.op("Reshape", [self.rms_norm(heads, w, eps, dtype), self.const([0, 0, -1])])

    def gqa(self, c: Call) -> list:
        """One com.microsoft GroupQueryAttention: it rotates q and k, appends k and v into the caches (the state
        buffers, bound in and out) and attends over the valid length. ONNX Runtime derives the positions from the
        lengths: in decode the token sits at ``seq_lens - 1`` (the runtime's contract); a prefill (S free) runs
        positions p0..p0+S-1 in every row: a first prompt (p0 = 0, rows of any length) or a chunk continuing the
        cache (every row's length p0 + S), which ``OnnxProgram._check_chunk`` checks before it runs one."""
        q, k, v, positions, seq_lens, kc, vc = c.x[:7]
        sinks = c.x[9]
        hq, hk = c.a["heads"]
        cos, sin, past_lens, total = self._gqa_tables(c)
        # softcap: the kernel's attribute, applied before the causal mask; sinks: its head_sink input (the
        # denominator's extra exp(sink - max)), after the unused position_ids and attention_bias
        sink_inputs = [] if sinks is None else ["", "", sinks]
        out, k_new, v_new = self.op("GroupQueryAttention", [q, k, v, kc, vc, past_lens, total, cos, sin,
                                                            *sink_inputs], 3,
                                    domain="com.microsoft", num_heads=hq, kv_num_heads=hk,
                                    scale=float(c.a["scale"]), softcap=float(c.a["softcap"]), do_rotary=1,
                                    rotary_interleaved=0)
        return [out, k_new, v_new]

    def _gqa_tables(self, c: Call) -> tuple:
        """(cos, sin, past lengths, total length) for GroupQueryAttention, made once per graph: cos/sin [T, R/2]
        for every cache slot (T read off the first layer's cache)."""
        q, _, _, positions, seq_lens, kc = c.x[:6]
        a, qt = c.a, c.ins[0]
        key = ("gqa-rope", tuple(a["inv_freq"]), a["scaling"])
        if key not in self._memo:
            inv = self.const(np.array(a["inv_freq"], dtype=np.float32), dtype=np.float32)
            slots = self.op("Range", [self.const(0), self.op("Squeeze", [self.op("Shape", [kc], start=2, end=3)]),
                                      self.const(1)])
            angle = self.op("Mul", [self.op("Unsqueeze", [self.cast(slots, DType.F32), self.const([1])]), inv])
            scale = self.scalar(a["scaling"], DType.F32)
            self._memo[key] = tuple(self.cast(self.op("Mul", [self.op(f, [angle]), scale]), qt.dtype)
                                    for f in ("Cos", "Sin"))
            # the total length: the longest sequence in decode; in a prefill (S free) the last position + 1: S for
            # a first prompt (ORT recognises one by total == S, however short the sequences are), p0 + S for a
            # chunk that continues the cache from position p0 (every row then full to p0 + S: OnnxProgram checks)
            if qt.shape[1] == 1:
                total = self.op("ReduceMax", [seq_lens], keepdims=1)
            else:
                last = self.op("Slice", [positions, self.const([-1]), self.const([2**62]), self.const([1])])
                total = self.cast(self.op("Add", [self.op("ReduceMax", [self.op("Reshape", [last, self.const([-1])])],
                                                          keepdims=1), self.const([1])]), DType.I32)
            self._memo[("gqa-lens", seq_lens)] = (
                self.op("Sub", [seq_lens, self.const(np.array([1], np.int32), dtype=np.int32)]), total)
        return (*self._memo[key], *self._memo[("gqa-lens", seq_lens)])

    def rms_norm_moe_route(self, c: Call) -> list:
        x, nw, router, bias = c.x
        nt = c.outs[0]
        normed = self.rms_norm(x, nw, c.a["eps"], nt.dtype)
        ids, weights = self.moe_route(Call(Op.MOE_ROUTE, [normed, router, bias], _pick(c.a, Op.MOE_ROUTE),
                                           [nt, *c.ins[2:]], c.outs[1:]))
        return [normed, ids, weights]

    def ew_chain(self, c: Call) -> str:
        """Each step of the body through its op's lowering, typed as the IR types it (rounded to its dtype)."""
        body = c.a["body"]
        typed = types(body, c.ins)
        values: dict = {}
        for s in steps(body):
            x = [c.x[i] if isinstance(i, int) else values[id(i)] for i in s.args]
            ins = [c.ins[i] if isinstance(i, int) else typed[id(i)] for i in s.args]
            values[id(s)] = self.emit(Call(s.op, x, s.all_attrs(), ins, [typed[id(s)]]))
        return values[id(body)]



def _np_dtype(dtype: DType):
    return {DType.F32: np.float32, DType.F16: np.float16, DType.F64: np.float64, DType.I64: np.int64,
            DType.I32: np.int32, DType.I16: np.int16, DType.I8: np.int8, DType.U8: np.uint8,
            DType.BOOL: np.bool_}[dtype]


_COMPARISONS = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}


def _pick(attrs: dict, op: Op) -> dict:
    """The attributes of ``op`` among ``attrs`` (a fused op's, for one of the ops it is made of)."""
    return {k: attrs[k] for k in OPDEFS[op].attrs if k in attrs}


# ---- the table ------------------------------------------------------------------------------------------------
ONNX_OPS = {
    Op.ADD: "Add",
    Op.SUB: "Sub",
    Op.MUL: "Mul",
    Op.DIV: "Div",
    Op.NEG: "Neg",
    Op.EXP: "Exp",
    Op.SIGMOID: "Sigmoid",
    Op.TANH: "Tanh",
    Op.COS: "Cos",
    Op.SIN: "Sin",
    Op.RELU: "Relu",
    Op.LOG: "Log",
    Op.FLOOR: "Floor",
    Op.ABS: "Abs",
    Op.MINIMUM: "Min",
    Op.MAXIMUM: "Max",
    Op.MATMUL: "MatMul",
}
"""Ops that are one ONNX op over the same inputs, without attributes."""


def _one(op_type: str) -> Callable:
    return lambda lw, c: lw.op(op_type, [v for v in c.x if v is not None])


L = Lowering
LOWERINGS: dict[Op, Callable] = {
    **{op: _one(op_type) for op, op_type in ONNX_OPS.items()},
    Op.PARAM: L.weight,
    Op.WEIGHT: L.weight,
    Op.CONSTANT: L.constant,
    Op.ARANGE: L.arange,
    Op.RSQRT: lambda lw, c: lw.op("Reciprocal", [lw.op("Sqrt", c.x)]),
    Op.POW: lambda lw, c: lw.op("Pow", [c.x[0], lw.scalar(c.a["exponent"], c.outs[0].dtype)]),
    Op.SILU: lambda lw, c: lw.activation(c.x[0], SILU),
    Op.SOFTPLUS: L.softplus,
    Op.EXPM1: L.expm1,
    Op.COMPARE: L.compare,
    Op.WHERE: L.where,
    Op.GELU: lambda lw, c: lw.op("Gelu", c.x, approximate=c.a["approximate"]),
    Op.CAST: lambda lw, c: lw.cast(c.x[0], c.a["dtype"]),
    Op.MEAN: lambda lw, c: lw.reduce("ReduceMean", c),
    Op.SUM: lambda lw, c: lw.reduce("ReduceSum", c),
    Op.SOFTMAX: lambda lw, c: lw.op("Softmax", c.x, axis=c.a["dim"]),
    Op.ARGMAX: lambda lw, c: lw.op("ArgMax", c.x, axis=c.a["dim"], keepdims=int(c.a["keepdim"])),
    Op.TOPK: lambda lw, c: lw.op("TopK", [c.x[0], lw.const([c.a["k"]])], 2, axis=c.a["dim"],
                                 largest=int(c.a["largest"])),
    Op.SORT: lambda lw, c: lw.op("TopK", [c.x[0], lw.op("Shape", [c.x[0]], start=c.a["dim"] % c.ins[0].rank,
                                                            end=c.a["dim"] % c.ins[0].rank + 1)], 2,
                                 axis=c.a["dim"], largest=int(c.a["descending"])),  # ties: the lower index first
    Op.RESHAPE: lambda lw, c: lw.op("Reshape", [c.x[0], lw.shape(c.a["shape"])]),
    Op.TRANSPOSE: lambda lw, c: lw.op("Transpose", c.x, perm=list(c.a["perm"])),
    Op.EXPAND: lambda lw, c: lw.op("Expand", [c.x[0], lw.shape(c.a["shape"])]),
    Op.CONCAT: lambda lw, c: lw.op("Concat", c.x, axis=c.a["dim"]),
    Op.SPLIT: lambda lw, c: lw.op("Split", [c.x[0], lw.shape(c.a["sizes"])], len(c.a["sizes"]), axis=c.a["dim"]),
    Op.SLICE: L.slice,
    Op.GATHER: lambda lw, c: lw.op("GatherElements", c.x, axis=c.a["dim"]),
    Op.SCATTER: lambda lw, c: lw.op("ScatterElements", c.x, axis=c.a["dim"]),
    Op.EMBEDDING: lambda lw, c: lw.op("Gather", c.x, axis=0),
    Op.LINEAR: lambda lw, c: lw.linear(*c.x),
    Op.RMS_NORM: lambda lw, c: lw.rms_norm(c.x[0], c.x[1], c.a["eps"], c.outs[0].dtype),
    Op.RMS_NORM_LINEAR: L.rms_norm_linear,
    Op.SWIGLU: lambda lw, c: lw.op("Mul", [lw.activation(c.x[0], c.a["act"]), c.x[1]]),
    Op.ARM_MLP: L.arm_mlp,
    Op.MOE_ROUTE: L.moe_route,
    Op.MOE_SORT: lambda lw, c: lw.moe_sort(c.x[0], c.a["experts"]),
    Op.GROUPED_GEMM: L.grouped_gemm,
    Op.MOE_COMBINE: L.moe_combine,
    Op.ROPE: L.rope,
    Op.KV_CACHE_WRITE: L.cache_write,
    Op.ATTENTION: L.attention,
    Op.CACHED_ATTENTION: L.attention,
    Op.ROPE_CACHE_WRITE: L.rope_cache_write,
    Op.SHORT_CONV: la.short_conv,
    Op.CACHED_SHORT_CONV: la.cached_short_conv,
    Op.DELTA_RULE: la.delta_rule,
    Op.CACHED_DELTA_RULE: la.cached_delta_rule,
    Op.MLA_EXPAND: mla.mla_expand,
    Op.MLA_ATTENTION: mla.mla_attention,
    Op.CACHED_MLA_ATTENTION: mla.cached_mla_attention,
    Op.ROPE_CACHED_ATTENTION: L.rope_cached_attention,
    Op.RMS_NORM_MOE_ROUTE: L.rms_norm_moe_route,
    Op.EW_CHAIN: L.ew_chain,
}
"""Op -> ``lowering(lw, call)``: the ONNX name of the result, or a list of them."""

# whole MoE blocks and captured experts: moe_dispatch splits them into ops with lowerings
# the collectives run between ONNX Runtime sessions (auto puts them on the reference backend, which calls
# torch.distributed), never inside one
NOT_LOWERED = frozenset({Op.MOE, Op.EXPERTS}) | COLLECTIVES


def _chain(a: dict) -> str | None:
    return next((r for s in steps(a["body"]) if (r := refusal(s.op, s.all_attrs())) is not None), None)


REFUSALS: dict[Op, Callable] = {Op.EW_CHAIN: _chain}
"""Op -> ``check(attrs)``: why its lowering refuses these attribute values, or None."""


def refusal(op: Op, attrs: dict) -> str | None:
    """Why the ONNX backend does not lower ``op`` with ``attrs`` (defaults filled in), or None when it does."""
    if op not in LOWERINGS:
        return f"the ONNX backend has no lowering for {op}"
    check = REFUSALS.get(op)
    return check(attrs) if check is not None else None


def gqa_applies(c: Call, contrib: bool) -> bool:
    """A ``rope_cached_attention`` that lowers to GroupQueryAttention: com.microsoft ops allowed, no q/k norms,
    half layout, causal, no window, a head size ONNX Runtime's kernel takes (a multiple of 16), sinks (if any) in
    the activations' dtype (its head_sink input shares q's type; softcap it takes at any value)."""
    a, sinks = c.a, c.ins[9]
    return contrib and c.x[7] is None and a["layout"] == "half" and a["causal"] and not a["window"] and \
        c.ins[5].shape[3] % 16 == 0 and (sinks is None or sinks.dtype == c.ins[0].dtype)


BF16_REFUSED = ("the ONNX backend runs f32 or f16 models (ONNX Runtime has no bf16 kernels on a CPU); "
        "compile_model(model, dtype=torch.float32) computes a bf16 model in f32")


def _to_numpy(tensor):
    if str(tensor.dtype) == "torch.bfloat16":
        raise CompileError(BF16_REFUSED)
    return tensor.detach().cpu().contiguous().numpy()


def lower_graph(g: Graph, constants, contrib: bool = True, weight_bits: int | None = None,
                packer=None) -> onnx.ModelProto:
    """The ONNX model for one graph; ``constants(node)`` gives the tensor of a param or weight node; without
    ``contrib`` only standard ONNX ops are used; ``weight_bits`` quantizes the projections' weights (lossy);
    ``packer`` (quantize.Packer) stores weights already on a 4-bit grid as exact 4-bit MatMulNBits."""
    return Lowering(g, constants, contrib, weight_bits, packer).run()


def unsupported(g: Graph):
    """``reason(node)``: why the ONNX backend cannot lower ``node`` of ``g``, or None when it can (``refusal``). A
    graph with bf16 values runs nowhere on ONNX Runtime (bf16 has no numpy type, ORT's CPU kernels no bf16): every
    node but params and weights gets that reason, so auto does not hand ONNX the index arithmetic between them."""
    bf16 = any(t.dtype == DType.BF16 for t in g.types.values())

    def reason(node: Node) -> str | None:
        if node.op in (Op.PARAM, Op.WEIGHT):
            return None
        if bf16:
            return BF16_REFUSED
        return refusal(node.op, node.all_attrs())

    return reason
