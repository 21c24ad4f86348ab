"""IR graph → ONNX model (opset 24), op by op, with the weights as initializers.

Symbolic dimensions are computed at run time from the inputs' shapes (``B`` and ``S`` from ``input_ids``, ``T``
from a cache), so one model serves every batch and length. The fused ops expand into standard ops with the
reference backend's rounding points: RMSNorm in f32 then cast, RoPE from positions × inv_freq, cache writes
with TensorScatter (opset 24: contiguous writes from each sequence's first position), attention as masked
softmax over the visible keys (a query that sees none gets zeros) of the cache's first max(seq_lens) slots, so a
decode step costs by the valid length. Values every layer would compute alike (cos/sin, masks) are built once.
Without ``contrib`` (standalone exports) attention is one opset-24 ``Attention``; with it, attention over the cache
is com.microsoft GroupQueryAttention where ONNX Runtime's kernel takes the head size: in decode (one token at
``seq_lens - 1``) and in a prefill, which runs positions p0..p0+S-1 (a first prompt, or a chunk continuing the
cache with every row full; ``OnnxProgram`` checks).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowerlm.ir.dtypes import DType
from lowerlm.ir.errors import CompileError
from lowerlm.ir.graph import Graph, Node
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import Sym

OPSET = 24
_ONNX_DTYPE = {DType.F32: TensorProto.FLOAT, DType.F16: TensorProto.FLOAT16, DType.BF16: TensorProto.BFLOAT16,
               DType.F64: TensorProto.DOUBLE, DType.I64: TensorProto.INT64, DType.I32: TensorProto.INT32,
               DType.I16: TensorProto.INT16, DType.I8: TensorProto.INT8, DType.U8: TensorProto.UINT8,
               DType.BOOL: TensorProto.BOOL}


def _vi(name: str, t) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, int) else str(d) for d in t.shape]
    return helper.make_tensor_value_info(name, _ONNX_DTYPE[t.dtype], dims)


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
        fused = self._plan_gqa() if self.contrib else {}
        for node in g.nodes:
            if node.name in fused:
                if fused[node.name] is not None:
                    self._gqa(*fused[node.name])
                continue
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

    def _plan_gqa(self) -> dict:
        """rope → two cache writes → cached_attention becomes one com.microsoft GroupQueryAttention: it rotates q
        and k, appends k and v into the caches (the state buffers, bound in and out) and attends over the valid
        length. ONNX Runtime derives the positions from the lengths: in decode the token sits at ``seq_lens - 1``
        (the runtime's contract); a prefill (S free) runs positions p0..p0+S-1 in every row: a first prompt
        (p0 = 0, rows of any length) or a chunk continuing the cache (every row's length p0 + S), which
        ``OnnxProgram`` checks before it runs one. A sliding window or a head size ORT's kernel does not take (a
        multiple of 16) keeps the plain lowering. Keyed by node name: the attention maps to the pieces, the nodes it
        absorbs to None."""
        g = self.g
        plan: dict = {}
        for att in (n for n in g.nodes if n.op is Op.CACHED_ATTENTION):
            cache_type = g.type_of(att.inputs[1])
            if att.attr("window") or not att.attr("causal") or cache_type.shape[3] % 16:
                continue
            kw, vw = g.producer(att.inputs[1]), g.producer(att.inputs[2])
            rope = g.producer(att.inputs[0])
            if not (kw and vw and rope and kw.op is vw.op is Op.KV_CACHE_WRITE and rope.op is Op.ROPE):
                continue
            if kw.inputs[1] != rope.results[1].name or rope.attr("layout") != "half" or \
                    any(g.use_count(v) != 1 for v in (rope.results[0].name, rope.results[1].name)) or \
                    g.use_count(kw.name) != 2 or g.use_count(vw.name) != 2:
                continue  # the new cache versions: read by the attention and returned, nothing else
            plan[att.name] = (att, rope, kw, vw)
            plan[rope.name] = plan[kw.name] = plan[vw.name] = None
        return plan

    def _gqa(self, att: Node, rope: Node, kw: Node, vw: Node) -> None:
        q, k, positions = (self.names[v] for v in rope.inputs)
        v = self.names[vw.inputs[1]]
        kc, vc = self.names[kw.inputs[0]], self.names[vw.inputs[0]]
        seq_lens = self.names[att.inputs[4]]
        hq, hk = rope.attr("heads")
        key = ("gqa-rope", tuple(rope.attr("inv_freq")), rope.attr("scaling"))  # T read off the first layer's cache
        if key not in self._memo:  # cos/sin tables [T, R/2] for every cache slot, shared by the layers
            inv = self.const(np.array(rope.attr("inv_freq"), dtype=np.float32), dtype=np.float32)
            slots = self.op("Range", [self.const(0), self.op("Squeeze", [self.op("Shape", [kc], start=2, end=3)]),
                                      self.const(1)])
            angle = self.op("Mul", [self.op("Unsqueeze", [self.cast(slots, DType.F32), self.const([1])]), inv])
            scale = self.scalar(rope.attr("scaling"), DType.F32)
            dtype = self.type(rope, 0).dtype
            self._memo[key] = tuple(self.cast(self.op("Mul", [self.op(f, [angle]), scale]), dtype)
                                    for f in ("Cos", "Sin"))
            # the total length: the longest sequence in decode; in a prefill (S free) the last position + 1: S for
            # a first prompt (ORT recognises one by total == S, however short the sequences are), p0 + S for a
            # chunk that continues the cache from position p0 (every row then full to p0 + S: OnnxProgram checks)
            one_token = self.type(rope, 0).shape[1] == 1
            if one_token:
                total = self.op("ReduceMax", [seq_lens], keepdims=1)
            else:
                last = self.op("Slice", [positions, self.const([-1]), self.const([2**62]), self.const([1])])
                total = self.cast(self.op("Add", [self.op("ReduceMax", [self.op("Reshape", [last, self.const([-1])])],
                                                          keepdims=1), self.const([1])]), DType.I32)
            self._memo[("gqa-lens", seq_lens)] = (
                self.op("Sub", [seq_lens, self.const(np.array([1], np.int32), dtype=np.int32)]), total)
        cos, sin = self._memo[key]
        past_lens, total = self._memo[("gqa-lens", seq_lens)]
        out, k_new, v_new = self.op("GroupQueryAttention", [q, k, v, kc, vc, past_lens, total, cos, sin], 3,
                                    domain="com.microsoft", num_heads=hq, kv_num_heads=hk,
                                    scale=float(att.attr("scale")), do_rotary=1, rotary_interleaved=0)
        self.names[att.name], self.names[kw.name], self.names[vw.name] = out, k_new, v_new

    def type(self, node: Node, slot: int):
        """The IR type of a node's input (lowerings hold ONNX names, types live with the IR names)."""
        return self.g.type_of(node.inputs[slot])

    def _rename(self, old: str, new: str) -> None:
        for n in self.nodes:
            for i, v in enumerate(n.output):
                if v == old:
                    n.output[i] = new
            for i, v in enumerate(n.input):
                if v == old:
                    n.input[i] = new

    def lower(self, node: Node):
        op, a = node.op, node.all_attrs()
        x = [self.names[v] if v is not None else None for v in node.inputs]
        t = node.results[0].type
        if op in (Op.PARAM, Op.WEIGHT):
            tensor = self.constants(node)
            name = self.fresh("w")
            array = _to_numpy(tensor)
            self.inits.append(numpy_helper.from_array(array, name))
            if self.packer is not None or self.weight_bits:
                self._arrays[name] = array
            return name
        if op is Op.CONSTANT:
            value = a["value"]
            arr = np.full([int(d) for d in t.shape], value) if not isinstance(value, tuple) else \
                np.array(value).reshape([int(d) for d in t.shape])
            return self.const(arr, dtype=_np_dtype(t.dtype))
        simple = {Op.ADD: "Add", Op.SUB: "Sub", Op.MUL: "Mul", Op.DIV: "Div", Op.NEG: "Neg", Op.EXP: "Exp",
                  Op.SIGMOID: "Sigmoid", Op.TANH: "Tanh", Op.COS: "Cos", Op.SIN: "Sin", Op.MATMUL: "MatMul"}
        if op in simple:
            return self.op(simple[op], [v for v in x if v is not None])
        if op is Op.RSQRT:
            return self.op("Reciprocal", [self.op("Sqrt", x)])
        if op is Op.POW:
            return self.op("Pow", [x[0], self.scalar(a["exponent"], t.dtype)])
        if op is Op.SILU:
            return self.op("Mul", [x[0], self.op("Sigmoid", x)])
        if op is Op.GELU:
            return self.op("Gelu", x, approximate=a["approximate"])
        if op is Op.CAST:
            return self.cast(x[0], a["dtype"])
        if op in (Op.MEAN, Op.SUM):
            return self.op("ReduceMean" if op is Op.MEAN else "ReduceSum", [x[0], self.const(list(a["dims"]))],
                           keepdims=int(a["keepdim"]))
        if op is Op.SOFTMAX:
            return self.op("Softmax", x, axis=a["dim"])
        if op is Op.ARGMAX:
            return self.op("ArgMax", x, axis=a["dim"], keepdims=int(a["keepdim"]))
        if op is Op.TOPK:
            return self.op("TopK", [x[0], self.const([a["k"]])], 2, axis=a["dim"], largest=int(a["largest"]))
        if op is Op.RESHAPE:
            return self.op("Reshape", [x[0], self.shape(a["shape"])])
        if op is Op.TRANSPOSE:
            return self.op("Transpose", x, perm=list(a["perm"]))
        if op is Op.EXPAND:
            return self.op("Expand", [x[0], self.shape(a["shape"])])
        if op is Op.CONCAT:
            return self.op("Concat", x, axis=a["dim"])
        if op is Op.SPLIT:
            return self.op("Split", [x[0], self.shape(a["sizes"])], len(a["sizes"]), axis=a["dim"])
        if op is Op.SLICE:
            return self.op("Slice", [x[0], self.dim(a["start"]), self.dim(a["end"]), self.const([a["dim"]]),
                                     self.const([a["step"]])])
        if op is Op.GATHER:
            return self.op("GatherElements", x, axis=a["dim"])
        if op is Op.EMBEDDING:
            return self.op("Gather", x, axis=0)
        if op is Op.LINEAR:
            return self.linear(x[0], x[1], x[2], x[3])
        if op is Op.RMS_NORM:
            return self.rms_norm(x[0], x[1], a["eps"], t.dtype)
        if op is Op.RMS_NORM_LINEAR:
            r = x[0] if x[4] is None else self.op("Add", [x[0], x[4]])
            y = self.linear(self.rms_norm(r, x[1], a["eps"], t.dtype), x[2], x[3])
            splits = list(a["splits"])
            pieces = self.op("Split", [y, self.const(splits)], len(splits), axis=-1)
            pieces = [pieces] if isinstance(pieces, str) else list(pieces)
            if a["act"] != "none":
                pieces = [self.op("Mul", [self.activation(pieces[0], a["act"]), pieces[1]])]
            return pieces + ([r] if x[4] is not None else [])
        if op is Op.SWIGLU:
            return self.op("Mul", [self.activation(x[0], a["act"]), x[1]])
        if op is Op.MOE_ROUTE:
            return self.moe_route(node, x, a)
        if op is Op.MOE_SORT:
            return self.moe_sort(x[0], a["experts"])
        if op is Op.GROUPED_GEMM:
            return self.grouped_gemm(node, x, a)
        if op is Op.MOE_COMBINE:
            return self.moe_combine(node, x, a)
        if op is Op.ARM_MLP:
            return self.arm_mlp(node, x, a, t.dtype)
        if op is Op.ROPE:
            return self.rope(node, x, a)
        if op is Op.KV_CACHE_WRITE:
            return self.cache_write(node, x)
        if op in (Op.ATTENTION, Op.CACHED_ATTENTION):
            return self.attention(node, x, a)
        raise CompileError(f"the ONNX backend has no lowering for {op}")

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
        if act == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x])])
        return self.op("Gelu", [x], approximate="tanh" if act == "gelu_tanh" else "none")

    def arm_mlp(self, node, x, a, dtype):
        inp, nw, gate_m, up, down, mu, scale, residual = x
        inter = self.type(node, 3).shape[0]
        hidden = self.type(node, 0).shape[-1]
        h = self.rms_norm(inp, nw, a["eps"], dtype)
        g, m = self.op("Split", [self.linear(h, gate_m), self.const([inter, hidden])], 2, axis=-1)
        a_hat = self.op("Div", [self.op("Sub", [self.activation(g, a["act"]), mu]), scale])
        keep = self.op("GreaterOrEqual", [self.op("Abs", [a_hat]), self.scalar(a["tau"], dtype)])
        a_hat = self.op("Where", [keep, a_hat, self.scalar(0.0, dtype)])
        y = self.op("Add", [self.linear(self.op("Mul", [a_hat, self.linear(h, up)]), down), m])
        return self.op("Add", [y, residual]) if residual is not None else y

    # ---- MoE dispatch (the reference backend's formulas, codegen/reference.py) --------------------------------
    def moe_route(self, node, x, a):
        inp, router, bias = x
        xt = self.type(node, 0)
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
        else:
            scores = self.op("Sigmoid", [logits])
            choice = scores if bias is None else self.op("Add", [scores, bias])
            groups = a["n_group"]
            if groups > 1:
                e = self.type(node, 1).shape[0]
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
                weights = self.op("Div", [weights, self.op("Add", [total, self.scalar(1e-20, DType.F32)])])
        if a["scaling"] != 1.0:
            weights = self.op("Mul", [weights, self.scalar(a["scaling"], DType.F32)])
        if not a["weights_f32"]:
            weights = self.cast(weights, xt.dtype)
        lead = self.op("Shape", [inp], start=0, end=-1)
        shape = self.op("Concat", [lead, k], axis=0)
        return [self.op("Reshape", [self.cast(ids, DType.I32), shape]), self.op("Reshape", [weights, shape])]

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

    def grouped_gemm(self, node, x, a):
        """Two forms, chosen by the graph: with one token per sequence (decode) each row's expert weights are
        gathered and applied as a batched matrix-vector product, so a step reads exactly the selected experts;
        with S tokens (prefill) each expert's contiguous segment of the sorted rows is sliced out and multiplied
        by that expert's weights (constant-folded per expert), and the segments are concatenated back in order."""
        inp, w, order, offsets, scale = x
        xt, wt = self.type(node, 0), self.type(node, 1)
        order64 = self.cast(order, DType.I64)
        rows = inp
        if a["gather"]:
            flat = self.op("Reshape", [inp, self.const([-1, xt.shape[-1]])])
            rows = self.op("Gather", [flat, self.op("Div", [order64, self.const(a["gather"])])], axis=0)
        if "S" in self.type(node, 2).symbols:
            offsets64 = self.cast(offsets, DType.I64)
            pieces = []
            for e in range(wt.shape[0]):
                bounds = [self.op("Slice", [offsets64, self.const([i]), self.const([i + 1])]) for i in (e, e + 1)]
                segment = self.op("Slice", [rows, bounds[0], bounds[1], self.const([0])])  # [R_e, K]
                w_e = self.op("Gather", [w, self.const(e)], axis=0)  # [N, K]
                pieces.append(self.op("MatMul", [segment, self.op("Transpose", [w_e], perm=[1, 0])]))
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
        if a["act"] != "none":
            gate, up = self.op("Split", [y], 2, axis=-1, num_outputs=2)
            y = self.op("Mul", [self.activation(gate, a["act"]), up])
        if scale is not None:
            st = self.type(node, 4)
            picked = self.op("Gather", [self.op("Reshape", [scale, self.const([-1])]), order64], axis=0)
            y = self.op("Mul", [self.cast(y, st.dtype), self.op("Unsqueeze", [picked, self.const([1])])])
            y = self.cast(y, xt.dtype)
        return y

    def moe_combine(self, node, x, a):
        y, order, like = x
        lt = self.type(node, 2)
        hidden = lt.shape[-1]
        tokens = self.op("Div", [self.cast(order, DType.I64), self.const(a["top_k"])])
        flat_shape = self.op("Shape", [self.op("Reshape", [like, self.const([-1, hidden])])])
        zeros = self.op("ConstantOfShape", [flat_shape],
                        value=numpy_helper.from_array(np.zeros([1], _np_dtype(self.type(node, 0).dtype))))
        out = self.op("ScatterND", [zeros, self.op("Unsqueeze", [tokens, self.const([1])]), y], reduction="add")
        return self.op("Reshape", [out, self.op("Shape", [like])])

    def rope(self, node, x, a):
        q, k, positions = x
        if a["layout"] != "half":
            raise CompileError("the ONNX backend lowers the half-split RoPE layout only")
        dtype = self.type(node, 0).dtype
        cos, sin = self._cos_sin(positions, tuple(a["inv_freq"]), a["scaling"], dtype)
        rdim = 2 * len(a["inv_freq"])
        outs = []
        for slot, value, heads in ((0, q, a["heads"][0]), (1, k, a["heads"][1])):
            t = self.type(node, slot)
            b, s, width = t.shape
            d = width // heads
            xh = self.op("Reshape", [value, self.shape([b, s, heads, d])])
            rot, rest = (xh, None) if rdim == d else self.op("Split", [xh, self.const([rdim, d - rdim])], 2, axis=-1)
            x1, x2 = self.op("Split", [rot, self.const([rdim // 2, rdim // 2])], 2, axis=-1)
            rotated = self.op("Concat", [self.op("Neg", [x2]), x1], axis=-1)
            y = self.op("Add", [self.op("Mul", [rot, cos]), self.op("Mul", [rotated, sin])])
            if rest is not None:
                y = self.op("Concat", [y, rest], axis=-1)
            outs.append(self.op("Reshape", [y, self.shape([b, s, width])]))
        return outs

    def _cos_sin(self, positions, inv_freq, scaling, dtype):
        """cos/sin [B, S, 1, R] for the positions: computed once per graph, shared by every layer."""
        key = ("rope", positions, inv_freq, scaling, dtype)
        if key not in self._memo:
            inv = self.const(np.array(inv_freq, dtype=np.float32), dtype=np.float32)
            angle = self.op("Mul", [self.op("Unsqueeze", [self.cast(positions, DType.F32), self.const([-1])]), inv])
            emb = self.op("Concat", [angle, angle], axis=-1)  # [B, S, R]
            scale = self.scalar(scaling, DType.F32)
            self._memo[key] = tuple(
                self.op("Unsqueeze", [self.cast(self.op("Mul", [self.op(f, [emb]), scale]), dtype), self.const([2])])
                for f in ("Cos", "Sin"))
        return self._memo[key]

    def cache_write(self, node, x):
        cache, values, positions = x
        ct = self.type(node, 0)
        b, hk, _, d = ct.shape
        s = self.type(node, 1).shape[1]
        update = self.op("Transpose", [self.op("Reshape", [values, self.shape([b, s, hk, d])])], perm=[0, 2, 1, 3])
        first = self.op("Squeeze", [self.op("Slice", [positions, self.const([0]), self.const([1]), self.const([1])]),
                                    self.const([1])])
        return self.op("TensorScatter", [cache, update, first], axis=-2)

    def attention(self, node, x, a):
        if not self.contrib:  # standalone exports: one opset-24 Attention
            return self.standard_attention(node, x, a)
        q = x[0]
        qt = self.type(node, 0)
        b, s, width = qt.shape
        if node.op is Op.CACHED_ATTENTION:
            _, kc, vc, positions, seq_lens = x
            kt = self.type(node, 1)
            hk, length, d = kt.shape[1], kt.shape[2], kt.shape[3]
            dv = self.type(node, 2).shape[3]
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
            _, k, v, positions, seq_lens = x
            hq, hk = a["heads"]
            d = width // hq
            dv = self.type(node, 2).shape[2] // hk
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
        vis = self._visible(node, positions, seq_lens, kpos, length, a)
        hidden = max(-1e30, float(np.finfo(_np_dtype(dtype)).min))  # finite in f16 too (-1e30 would cast to -inf)
        masked = self.op("Where", [vis, scores, self.scalar(hidden, dtype)])
        probs = self.op("Mul", [self.op("Softmax", [masked], axis=-1), self.cast(vis, dtype)])
        out = self.op("MatMul", [probs, v5])  # [B, Hk, G, S, Dv]
        out = self.op("Transpose", [out], perm=[0, 3, 1, 2, 4])
        return self.op("Reshape", [out, self.shape([b, s, hq * dv])])

    def standard_attention(self, node, x, a):
        """opset-24 ``Attention`` over 4-D [B, H, L, D] keys and values: for a cache, the whole buffer with
        ``nonpad_kv_seqlen`` = seq_lens (the cache is written by TensorScatter outside the op); the causal and
        window mask is a boolean ``attn_mask`` [B, 1, S, T] built from the positions (ONNX allows a shorter one,
        ONNX Runtime 1.30 does not), so is_causal's alignment rules never come into play."""
        q, k, v, positions, seq_lens = x
        qt = self.type(node, 0)
        b, s, width = qt.shape
        if node.op is Op.CACHED_ATTENTION:
            kt, vt = self.type(node, 1), self.type(node, 2)
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
            dv = self.type(node, 2).shape[2] // hk
            length, kpos = s, positions
            k4 = self.op("Transpose", [self.op("Reshape", [k, self.shape([b, s, hk, d])])], perm=[0, 2, 1, 3])
            v4 = self.op("Transpose", [self.op("Reshape", [v, self.shape([b, s, hk, dv])])], perm=[0, 2, 1, 3])
        q4 = self.op("Transpose", [self.op("Reshape", [q, self.shape([b, s, hq, d])])], perm=[0, 2, 1, 3])
        mask = self.op("Squeeze", [self._visible(node, positions, seq_lens, kpos, length, a), self.const([1])])
        out = self.op("Attention", [q4, k4, v4, mask, "", "", self.cast(seq_lens, DType.I64)],
                      scale=float(a["scale"]))  # [B, Hq, S, Dv]
        return self.op("Reshape", [self.op("Transpose", [out], perm=[0, 2, 1, 3]), self.shape([b, s, hq * dv])])

    def _visible(self, node, positions, seq_lens, kpos, length, a):
        """The [B, 1, 1, S, L] visibility mask; layers with the same inputs and flags share one."""
        key = ("mask", node.op, positions, seq_lens, kpos, str(length), a["causal"], a["window"])
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


def _np_dtype(dtype: DType):
    return {DType.F32: np.float32, DType.F16: np.float16, DType.F64: np.float64, DType.I64: np.int64,
            DType.I32: np.int32, DType.I16: np.int16, DType.I8: np.int8, DType.U8: np.uint8,
            DType.BOOL: np.bool_}[dtype]


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
    """``reason(node)``: why the ONNX backend cannot lower ``node`` of ``g``, or None when it can. A graph with bf16
    values runs nowhere on ONNX Runtime (bf16 has no numpy type, ORT's CPU kernels no bf16): every node gets that
    reason, so auto does not hand ONNX the index arithmetic between them. Otherwise each node is lowered alone by
    one probe lowering (a Lowering per node took 0.42 s over SmolLM2's two graphs, one probe 0.07 s, one-off), made
    afresh after a node fails (it may have left half its work behind)."""
    bf16 = any(t.dtype == DType.BF16 for t in g.types.values())
    probe = None

    def reason(node: Node) -> str | None:
        nonlocal probe
        if node.op in (Op.PARAM, Op.WEIGHT):
            return None
        if bf16:
            return BF16_REFUSED
        if probe is None:
            probe = Lowering(g, constants=None)
            probe.names = {name: name for name in g.types}
        try:
            probe.lower(node)
        except CompileError as e:
            probe = None
            return str(e)
        return None

    return reason
