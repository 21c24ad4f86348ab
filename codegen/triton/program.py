"""``TritonProgram``: runs a module's graphs with the Triton kernels.

``LAUNCHERS`` maps each op that has a kernel to its launcher, one entry per op; every other op (views, constants,
core ops without a kernel, the unfused ``moe``) runs with its row's reference implementation on the program's
device (``lowerlm.ir.fold.run_op``). The fusions the kernels take are IR ops the Triton tail makes
(passes/backend.py: ``rope_cache_write``, ``rope_cached_attention``, ``rms_norm_moe_route``, ``ew_chain``), so
what runs is what ``lowerlm dump-ir`` shows. Linear attention (Kimi's KDA, gated DeltaNet) has kernels too
(delta_rule.py): ``short_conv``, ``delta_rule`` and their cached forms, the delta rule recurrent for decode and
chunked for prefill. So has multi-head latent attention over its latent cache (mla.py: ``cached_mla_attention``,
the absorbed form split-K for decode, the flash kernel over keys and values expanded from the cache for prefill).
Weights are evaluated once (weight expressions included) and kept on the program's device. With ``inplace`` state
writes land in the given buffers (the runtime owns them); without it a launcher writes copies, as the reference
backend does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.codegen.triton import (
    arm_mlp,
    attention,
    decode_attention,
    delta_rule,
    embedding,
    gemv,
    mla,
    moe,
    rms_norm,
    rope,
    swiglu,
)
from lowerlm.codegen.triton.elementwise import chain_source, load_kernel, run_chain
from lowerlm.ir.compute import allreduce, route_attrs
from lowerlm.ir.errors import CompileError
from lowerlm.ir.fold import by_slot
from lowerlm.ir.graph import Node
from lowerlm.ir.opdefs import GLU
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import evaluate


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


@dataclass(slots=True)
class Call:
    """What a launcher reads: one node and its inputs' values."""

    program: TritonProgram
    node: Node
    x: list  # the inputs by slot, None for an absent optional one
    a: dict  # the attributes, defaults filled in
    env: dict  # shape symbol bindings
    inplace: bool  # state inputs are the runtime's buffers, to be written in place
    # this run's side results by the name of the value they go with: a launcher leaves one for a later launcher
    # (moe_sort each pair's row, under its order's name, for moe_combine); a fresh dict per run
    scratch: dict

    def state(self, slot: int) -> torch.Tensor:
        """The state input in ``slot`` to write: the buffer itself in place, else a copy (functional state)."""
        t = self.x[slot]
        return t if self.inplace else t.clone()

    def inv_freq(self) -> torch.Tensor:
        return self.program.inv_freq(self.a["inv_freq"])


# ---- launchers: Call -> the node's result(s) -------------------------------------------------------------------
def _attention(c: Call):
    q, k, v, pos, lens, sinks = c.x
    a = c.a
    return attention.attention(q, k, v, pos, lens, a["heads"], a["scale"], a["causal"], a["window"], a["softcap"],
                               sinks)


def _cached_attention(c: Call):
    q, kc, vc, pos, lens, sinks = c.x
    a = c.a
    if q.shape[1] == 1:  # decode: split-K over the cache, GQA groups together
        return decode_attention.decode_attention(q, kc, vc, pos, lens, a["scale"], a["causal"], a["window"],
                                                 softcap=a["softcap"], sinks=sinks)
    return attention.cached_attention(q, kc, vc, pos, lens, a["scale"], a["causal"], a["window"], a["softcap"], sinks)


def _rope_cache_write(c: Call):
    """One launch: q rotated (returned), k rotated into its cache, v copied into its own."""
    q, k, v, pos, _, _ = c.x
    kc, vc = c.state(4), c.state(5)
    a = c.a
    return rope.rope_cache_write(q, k, v, pos, a["heads"], c.inv_freq(), kc, vc, a["scaling"], a["layout"]), kc, vc


def _head_norm(x, weight, eps):
    """[B, S, H*D] normalised per head of D = len(weight) (Qwen3's q/k norms): one rms_norm launch."""
    b, s, width = x.shape
    return rms_norm.rms_norm(x.reshape(b, s, width // weight.shape[0], weight.shape[0]), weight, eps).reshape(x.shape)


def _rope_cached_attention(c: Call):
    """Decode (S = 1): one launch (the attention rotates q, normalises q and k first when the norms are given,
    writes k and v and attends to the step's own key from registers). More queries: the head norms, one
    ``rope_cache_write`` launch, the cached attention."""
    q, k, v, pos, lens, _, _, q_norm, k_norm, sinks = c.x
    kc, vc = c.state(5), c.state(6)
    a = c.a
    if q.shape[1] == 1:
        norms = (q_norm, k_norm, a["eps"]) if q_norm is not None else None
        out = decode_attention.decode_attention(q, kc, vc, pos, lens, a["scale"], a["causal"], a["window"],
                                                new_k=k, new_v=v, inv_freq=c.inv_freq(), scaling=a["scaling"],
                                                layout=a["layout"], qk_norm=norms, softcap=a["softcap"], sinks=sinks)
        return out, kc, vc
    if q_norm is not None:
        q, k = _head_norm(q, q_norm, a["eps"]), _head_norm(k, k_norm, a["eps"])
    q = rope.rope_cache_write(q, k, v, pos, a["heads"], c.inv_freq(), kc, vc, a["scaling"], a["layout"])
    out = attention.cached_attention(q, kc, vc, pos, lens, a["scale"], a["causal"], a["window"], a["softcap"], sinks)
    return out, kc, vc


def _cached_short_conv(c: Call):
    x, w, bias, _, pos, lens = c.x
    return delta_rule.cached_short_conv(x, w, bias, c.state(3), pos, lens, c.a["act"])


def _cached_delta_rule(c: Call):
    q, k, v, g, beta, _, pos, lens = c.x
    a = c.a
    return delta_rule.cached_delta_rule(q, k, v, g, beta, c.state(5), pos, lens, a["heads"], a["scale"], a["l2norm"],
                                        a["eps"])


def _moe_sort(c: Call):
    order, offsets, inverse = moe.moe_sort(c.x[0], c.a["experts"])
    c.scratch[c.node.results[0].name] = inverse  # each pair's row: the combine reading this order needs it
    return order, offsets


def _moe_combine(c: Call):
    y, order, like = c.x  # the sort's inverse when it ran in this run, else recomputed from the order
    return moe.moe_combine(y, order, like, c.a["top_k"], inverse=c.scratch.get(c.node.inputs[1]))


def _ew_chain(c: Call):
    t = c.node.results[0].type
    shape = [evaluate(d, c.env) for d in t.shape]
    kernel = c.program.chain_kernel(c.a["body"], tuple(x.dtype for x in c.x), len(shape))
    return run_chain(kernel, c.x, shape, t.dtype.to_torch(), c.program.device)


LAUNCHERS: dict[Op, Callable[[Call], object]] = {
    Op.EMBEDDING: lambda c: embedding.embedding(*c.x),
    Op.RMS_NORM: lambda c: rms_norm.rms_norm(*c.x, c.a["eps"]),
    Op.LINEAR: lambda c: gemv.linear(*c.x),
    Op.RMS_NORM_LINEAR: lambda c: gemv.rms_norm_linear(*c.x, c.a["eps"], c.a["splits"], c.a["act"]),
    Op.SWIGLU: lambda c: swiglu.swiglu(*c.x, c.a["act"]),
    Op.ARM_MLP: lambda c: arm_mlp.arm_mlp(*c.x, c.a["eps"], c.a["tau"], c.a["act"]),
    Op.ROPE: lambda c: rope.rope(*c.x, c.a["heads"], c.inv_freq(), c.a["scaling"], c.a["layout"]),
    Op.KV_CACHE_WRITE: lambda c: rope.kv_cache_write(c.state(0), *c.x[1:]),
    Op.ATTENTION: _attention,
    Op.CACHED_ATTENTION: _cached_attention,
    Op.ROPE_CACHE_WRITE: _rope_cache_write,
    Op.ROPE_CACHED_ATTENTION: _rope_cached_attention,
    Op.SHORT_CONV: lambda c: delta_rule.short_conv(*c.x, c.a["act"]),
    Op.CACHED_SHORT_CONV: _cached_short_conv,
    Op.DELTA_RULE: lambda c: delta_rule.delta_rule(*c.x, c.a["heads"], c.a["scale"], c.a["l2norm"], c.a["eps"]),
    Op.CACHED_DELTA_RULE: _cached_delta_rule,
    Op.CACHED_MLA_ATTENTION: lambda c: mla.cached_mla_attention(*c.x, c.a["heads"], c.a["nope"], c.a["scale"]),
    Op.MOE_ROUTE: lambda c: moe.moe_route(*c.x, **route_attrs(c.a)),
    Op.RMS_NORM_MOE_ROUTE: lambda c: moe.moe_route(c.x[0], *c.x[2:], **route_attrs(c.a), norm=(c.x[1], c.a["eps"])),
    Op.MOE_SORT: _moe_sort,
    Op.GROUPED_GEMM: lambda c: moe.grouped_gemm(*c.x, c.a["gather"], c.a["act"], *(c.a[n] for n in GLU)),
    Op.MOE_COMBINE: _moe_combine,
    Op.EW_CHAIN: _ew_chain,
    # tensor parallelism: the reduction through torch.distributed (NCCL on a GPU), the residual add and the norm in
    # one launch of the norm kernel (allreduce and allgather alone run as the row's torch implementation)
    Op.ALLREDUCE_ADD_RMS_NORM: lambda c: rms_norm.rms_norm(allreduce(c.x[0], c.a["world"]), c.x[2], c.a["eps"],
                                                          residual=c.x[1]),
}


class TritonProgram(ReferenceProgram):
    """A module ready to run with Triton kernels: ``run(graph, inputs, state, inplace=True)``. ``cache``: keep
    generated kernels' sources in the compile cache (else they live in memory only)."""

    device_sampling = True  # the runtime samples with codegen/triton/sampling.py on the device

    def __init__(self, module, weights, device=None, cache: bool = True):
        device = self.resolve_device(device)
        check_available(device)
        self.device = device  # before the weights are evaluated: they land here
        self.cache = cache
        self._chains: dict = {}  # (body, operand dtypes, rank) -> loaded chain kernel
        self._scratch: dict = {}  # the running graph's Call.scratch
        self._inv_freqs: dict = {}  # RoPE frequencies by attribute value, on the device
        super().__init__(module, {n: w.to(device) for n, w in weights.items()})

    @staticmethod
    def resolve_device(device=None) -> torch.device:
        """The device kernels run on: the GPU when there is one; "cuda" means the current GPU's index, because
        tensors report "cuda:0" and torch.device("cuda") != torch.device("cuda:0")."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def run(self, graph, inputs, state=None, symbols=None, inplace=False, observe=None):
        """``ReferenceProgram.run`` with a fresh scratch for this run's launchers (``Call.scratch``): a program
        runs one graph at a time."""
        self._scratch = {}
        try:
            return super().run(graph, inputs, state, symbols, inplace, observe)
        finally:
            self._scratch = {}

    def prepare(self) -> None:
        """Generate (or load from the compile cache) the kernel of every ``ew_chain`` now, not at its first run."""
        for g in self.module.graphs:
            for n in (n for n in g.nodes if n.op is Op.EW_CHAIN):
                self.chain_kernel(n.attr("body"), tuple(g.type_of(v).dtype.to_torch() for v in n.inputs),
                                  n.results[0].type.rank)

    def execute(self, node: Node, args: list, env: dict, inplace: bool, values: dict):
        launcher = LAUNCHERS.get(node.op)
        if launcher is None:  # no kernel: the row's implementation, on this device
            return super().execute(node, args, env, inplace, values)
        return launcher(Call(self, node, by_slot(node, args), node.all_attrs(), env, inplace, self._scratch))

    def chain_kernel(self, body, dtypes: tuple, rank: int):
        """The generated kernel of an ``ew_chain`` body over operands of torch ``dtypes``, for ``rank`` axes."""
        from lowerlm.ir.dtypes import DType

        key = (body, dtypes, rank)
        if key not in self._chains:
            source = chain_source(body, [DType.from_torch(d) for d in dtypes], rank)
            self._chains[key] = load_kernel(source, cache=self.cache)
        return self._chains[key]

    def inv_freq(self, values) -> torch.Tensor:
        """RoPE's frequencies as a tensor on the device, made once per attribute value."""
        if values not in self._inv_freqs:
            self._inv_freqs[values] = torch.tensor(values, dtype=torch.float32, device=self.device)
        return self._inv_freqs[values]
