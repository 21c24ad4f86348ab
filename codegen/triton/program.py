"""``TritonProgram``: runs a module's graphs with the Triton kernels.

Each fused op goes to its kernel's launcher; ``rope`` whose k result only feeds a cache write, together with the
matching v write, becomes one launch (``rope_cache_write``). Weights are evaluated once (weight expressions
included) and kept on the program's device; state is updated in place (the runtime owns the buffers). Views,
constants and the remaining core ops run as torch ops on the same device.
"""

from __future__ import annotations

import os

import torch

from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.ir.errors import CompileError
from lowerlm.ir.graph import Graph, Node
from lowerlm.ir.ops import Op


def available(device) -> bool:
    """Whether Triton kernels can run on ``device`` here."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_available(device) -> None:
    """Refuse a device Triton kernels cannot run on here (compile_model asks before tracing, the program again)."""
    if not available(device):
        raise CompileError("the Triton backend needs a CUDA GPU; on a CPU use backend='onnx' or 'auto', or set "
                           "TRITON_INTERPRET=1 (before lowerlm is imported) to run its kernels in Triton's slow "
                           "interpreter")


_MOE_OPS = frozenset({Op.MOE_ROUTE, Op.MOE_SORT, Op.GROUPED_GEMM, Op.MOE_COMBINE})


class TritonProgram(ReferenceProgram):
    """A module ready to run with Triton kernels: ``run(graph, inputs, state, inplace=True)``. ``cache``: keep
    generated kernels' sources in the compile cache (else they live in memory only)."""

    device_sampling = True  # the runtime samples with codegen/triton/sampling.py on the device

    def __init__(self, module, weights, device=None, cache: bool = True):
        device = self.resolve_device(device)
        check_available(device)
        self.device = device  # before the weights are evaluated: they land here
        self.cache = cache
        super().__init__(module, {n: w.to(device) for n, w in weights.items()})
        self._plans: dict = {}

    @staticmethod
    def resolve_device(device=None) -> torch.device:
        """The device kernels run on: the GPU when there is one; "cuda" means the current GPU's index, because
        tensors report "cuda:0" and torch.device("cuda") != torch.device("cuda:0")."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def plan(self, g: Graph) -> dict:
        """Launch fusions by node name: a ``rope`` whose k result only feeds a cache write, with the matching v
        write, is one ``rope_cache_write`` launch; in decode, when its q result only feeds the cached attention
        over those two caches, the attention takes all of it (``attend``). Element-wise chains are generated
        kernels. Fused entries apply to in-place runs (the writes land in the state buffers)."""
        if g.name in self._plans:
            return self._plans[g.name]
        plan: dict = {}
        index = {n.name: i for i, n in enumerate(g.nodes)}
        writes = [n for n in g.nodes if n.op is Op.KV_CACHE_WRITE]
        owners = {s.name: s.owner for s in g.state}
        for rope in (n for n in g.nodes if n.op is Op.ROPE):
            k_out = rope.results[1].name
            users = g.users.get(k_out, [])
            if len(users) != 1 or users[0].op is not Op.KV_CACHE_WRITE or users[0].inputs[1] != k_out \
                    or g.use_count(k_out) != 1:
                continue
            kwrite = users[0]
            owner = owners.get(kwrite.inputs[0])
            vwrites = [w for w in writes if w is not kwrite and owners.get(w.inputs[0]) == owner and owner
                       and w.inputs[2] == kwrite.inputs[2] and index.get(w.inputs[1], -1) < index[rope.name]]
            if len(vwrites) != 1:
                continue
            vwrite = vwrites[0]
            plan[kwrite.name] = plan[vwrite.name] = "fused"
            attn = self._attends(g, rope, kwrite, vwrite)
            if attn is not None:
                plan[rope.name] = ("rope_attend",)
                head_dim = g.type_of(kwrite.inputs[0]).shape[-1]
                q_src, q_norm = self._head_norm(g, rope.inputs[0], head_dim)
                k_src, k_norm = self._head_norm(g, rope.inputs[1], head_dim)
                norms = None
                if q_norm and k_norm and q_norm[1] == k_norm[1]:  # both heads normed alike: into the kernel
                    norms = (q_norm[0], k_norm[0], q_norm[1])
                    plan.update({name: "in-attend" for name in q_norm[2] + k_norm[2]})
                else:
                    q_src, k_src = rope.inputs[0], rope.inputs[1]
                plan[attn.name] = ("attend", rope, q_src, k_src, vwrite, norms)
            else:
                plan[rope.name] = ("rope_cache_write", kwrite, vwrite)
        plan.update(self._plan_route_norms(g))
        plan.update(self._plan_chains(g))
        self._plans[g.name] = plan
        return plan

    @staticmethod
    def _head_norm(g: Graph, name: str, head_dim):
        """For ``name`` = reshape(rms_norm(reshape(x) to heads of head_dim, w)) back to rows, each step used once,
        w in the activations' dtype (Qwen3's q/k norms): (x, (w, eps, [the three nodes])); else (name, None)."""
        back = g.producer(name)
        norm = g.producer(back.inputs[0]) if back is not None and back.op is Op.RESHAPE else None
        split = g.producer(norm.inputs[0]) if norm is not None and norm.op is Op.RMS_NORM else None
        if split is None or split.op is not Op.RESHAPE or len(norm.inputs) != 2 \
                or any(g.use_count(n.results[0].name) != 1 for n in (split, norm, back)):
            return name, None
        heads = norm.results[0].type
        if heads.rank != 4 or heads.shape[-1] != head_dim or g.type_of(norm.inputs[1]).dtype != heads.dtype:
            return name, None
        return split.inputs[0], (norm.inputs[1], norm.attr("eps"), [split.name, norm.name, back.name])

    @staticmethod
    def _attends(g: Graph, rope: Node, kwrite: Node, vwrite: Node):
        """The decode cached attention that alone reads rope's q and the two written caches, else None."""
        q_out = rope.results[0].name
        users = g.users.get(q_out, [])
        if len(users) != 1 or g.use_count(q_out) != 1 or rope.results[0].type.shape[1] != 1:
            return None
        attn = users[0]
        new_caches = [kwrite.results[0].name, vwrite.results[0].name]
        if attn.op is not Op.CACHED_ATTENTION or list(attn.inputs[:3]) != [q_out, *new_caches] \
                or not attn.inputs[3] == rope.inputs[2] == kwrite.inputs[2]:
            return None
        if any(u is not attn for c in new_caches for u in g.users.get(c, [])):
            return None
        return attn

    @staticmethod
    def _plan_route_norms(g: Graph) -> dict:
        """An ``rms_norm`` whose first user is a ``moe_route`` routing its result (an MoE layer's
        post-attention norm) is computed by the route launch, which stores it for the later users (the experts'
        GEMM reads it): one launch fewer per MoE layer."""
        plan: dict = {}
        for norm in (n for n in g.nodes if n.op is Op.RMS_NORM and len(n.inputs) == 2):
            out = norm.results[0].name
            users = g.users.get(out, [])
            first = min(users, key=g.nodes.index) if users else None
            if first is None or first.op is not Op.MOE_ROUTE or first.inputs[0] != out \
                    or out in g.outputs or out in g.state_outputs \
                    or g.type_of(norm.inputs[1]).dtype != norm.results[0].type.dtype:
                continue
            plan[norm.name] = "in-route"
            plan[first.name] = ("route_norm", norm.inputs[0], norm.inputs[1], norm.attr("eps"), out)
        return plan

    def _plan_chains(self, g: Graph) -> dict:
        """Single-use chains of element-wise nodes, each one generated kernel, keyed by the chain's last node."""
        from lowerlm.codegen.triton.elementwise import SUPPORTED, chain_source, load_kernel

        ew = {n.name: n for n in g.nodes if n.op in SUPPORTED and n.results[0].type.dtype.is_float}
        returned = set(g.outputs) | set(g.state_outputs)
        inner = {name for name, n in ew.items() if name not in returned and g.use_count(name) == 1
                 and g.users[name][0].name in ew}
        plan: dict = {}
        for root in (n for name, n in ew.items() if name not in inner):
            members, stack = [], [root]
            while stack:
                n = stack.pop()
                members.append(n)
                stack += [ew[v] for v in n.args if v in inner]
            members.sort(key=lambda n: g.nodes.index(n))
            names = {m.name for m in members}
            inputs = list(dict.fromkeys(v for m in members for v in m.args if v not in names))
            source = chain_source(members, inputs, root.results[0].type.rank)
            plan[root.name] = ("chain", inputs, load_kernel(source, cache=self.cache))
            plan.update({m.name: "in-chain" for m in members if m is not root})
        return plan

    def execute(self, node: Node, args: list, env: dict, inplace: bool, values: dict, plan: dict):
        from lowerlm.codegen.triton import arm_mlp, attention, decode_attention, embedding, gemv, rms_norm, rope, swiglu
        from lowerlm.codegen.triton.elementwise import run_chain
        from lowerlm.ir.shapes import evaluate

        op, a = node.op, node.all_attrs()
        step = plan.get(node.name)
        if isinstance(step, tuple) and step[0] == "chain":
            _, inputs, kernel = step
            t = node.results[0].type
            return run_chain(kernel, [values[v] for v in inputs], [evaluate(d, env) for d in t.shape],
                             t.dtype.to_torch(), self.device)
        if step == "in-chain":
            return None  # computed inside the generated kernel of the chain it belongs to
        if step == "in-attend" and inplace:
            return None  # a per-head norm the attention launch applies itself
        if step == "in-route":
            return None  # the route launch computes the norm (and stores it before any other user runs)
        if isinstance(step, tuple) and step[0] == "route_norm":
            from lowerlm.codegen.reference import route_attrs
            from lowerlm.codegen.triton import moe

            _, x, weight, eps, normed = step
            values[normed], ids, weights = moe.moe_route(values[x], *self._slots(node, args)[1:], **route_attrs(a),
                                                         norm=(values[weight], eps))
            return ids, weights
        if step is not None and inplace:
            return self._run_fused(step, a, node, args, values)
        if op is Op.EMBEDDING:
            return embedding.embedding(*args)
        if op is Op.RMS_NORM:
            return rms_norm.rms_norm(*args, a["eps"])
        if op is Op.LINEAR:
            x, w, bias, residual = self._slots(node, args)
            return gemv.linear(x, w, bias, residual)
        if op is Op.RMS_NORM_LINEAR:
            x, nw, w, bias, residual = self._slots(node, args)
            return gemv.rms_norm_linear(x, nw, w, bias, residual, a["eps"], a["splits"], a["act"])
        if op is Op.SWIGLU:
            return swiglu.swiglu(*args, a["act"])
        if op is Op.ARM_MLP:
            return arm_mlp.arm_mlp(*self._slots(node, args), a["eps"], a["tau"], a["act"])
        if op is Op.ROPE:
            return rope.rope(*args, a["heads"], self._inv_freq(a["inv_freq"]), a["scaling"], a["layout"])
        if op is Op.KV_CACHE_WRITE:
            cache = args[0] if inplace else args[0].clone()
            return rope.kv_cache_write(cache, args[1], args[2])
        if op is Op.ATTENTION:
            return attention.attention(*args, a["heads"], a["scale"], a["causal"], a["window"])
        if op in _MOE_OPS:
            from lowerlm.codegen.reference import route_attrs
            from lowerlm.codegen.triton import moe

            if op is Op.MOE_ROUTE:
                return moe.moe_route(*self._slots(node, args), **route_attrs(a))
            if op is Op.MOE_SORT:  # each pair's row rides along in the run's values, for the combine
                order, offsets, values[f"{node.results[0].name}#inverse"] = moe.moe_sort(args[0], a["experts"])
                return order, offsets
            if op is Op.GROUPED_GEMM:
                return moe.grouped_gemm(*self._slots(node, args), a["gather"], a["act"])
            return moe.moe_combine(*args, a["top_k"], inverse=values.get(f"{node.inputs[1]}#inverse"))
        if op is Op.CACHED_ATTENTION:
            if args[0].shape[1] == 1:  # decode: split-K over the cache, GQA groups together
                return decode_attention.decode_attention(*args, a["scale"], a["causal"], a["window"])
            return attention.cached_attention(*args, a["scale"], a["causal"], a["window"])
        return super().execute(node, args, env, inplace, values, plan)

    def _run_fused(self, step, a: dict, node: Node, args: list, values: dict):
        """A node of a planned fusion (in-place runs): the launch happens at ``rope_cache_write`` or ``attend``."""
        from lowerlm.codegen.triton import decode_attention, rope

        if step == "fused":
            return values[node.inputs[0]]  # the cache buffer, written in place by the fused launch
        kind = step[0]
        if kind == "rope_attend":
            return None, None  # the attention launch rotates q and k itself
        if kind == "rope_cache_write":
            kwrite, vwrite = step[1:]
            q, k, positions = args
            q_out = rope.rope_cache_write(q, k, values[vwrite.inputs[1]], positions, a["heads"],
                                          self._inv_freq(a["inv_freq"]), values[kwrite.inputs[0]],
                                          values[vwrite.inputs[0]], a["scaling"], a["layout"])
            return q_out, None
        rope_node, q_src, k_src, vwrite, norms = step[1:]  # attend
        r = rope_node.all_attrs()
        qk_norm = (values[norms[0]], values[norms[1]], norms[2]) if norms else None
        return decode_attention.decode_attention(
            values[q_src], args[1], args[2], args[3], args[4], a["scale"], a["causal"], a["window"],
            new_k=values[k_src], new_v=values[vwrite.inputs[1]], inv_freq=self._inv_freq(r["inv_freq"]),
            scaling=r["scaling"], layout=r["layout"], qk_norm=qk_norm)

    @staticmethod
    def _slots(node: Node, args: list) -> list:
        from lowerlm.ir.fold import by_slot

        return by_slot(node, args)

    def _inv_freq(self, values) -> torch.Tensor:
        key = ("inv_freq", values)
        if key not in self._constants:
            self._constants[key] = torch.tensor(values, dtype=torch.float32, device=self.device)
        return self._constants[key]
