"""Linear attention that transformers computes in module-level functions, made IR ops: the short convolution and
the delta rule of Kimi Delta Attention (per-channel decay) and of gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo-Hybrid
and their copies: one decay per head).

transformers' ``KimiLinearDeltaAttention.forward`` is projections, a forget gate, a sigmoid and a gated RMSNorm --
ordinary ops the frontend traces and the fusions see (one ``rms_norm_linear`` feeds q|k|v|f_a|b|g_a) -- around two
calls it makes by name: ``causal_conv1d_forward`` (a depthwise causal conv1d over q|k|v with SiLU; transformers
5.17 calls ``causal_conv1d_fn``, swapped too) and
``chunk_kimi_delta_attention`` (the delta rule with per-channel decay; ``recurrent_kimi_delta_attention`` only with
a cache; gated DeltaNet's are ``torch_chunk_gated_delta_rule`` and ``torch_recurrent_gated_delta_rule``). Tracing
those would unroll their loops over chunks and tokens for the example's length, so during export
(``swapped``) the module's globals are replaced by functions that call two custom ops, ``lowerlm::short_conv`` and
``lowerlm::delta_rule``, which torch.export keeps whole and the importer turns into the IR ops of the same names
(``convert``). Their eager implementations are the reference's (ir/compute.py), so a check that runs the model
during export computes what transformers' torch path computes.

The swap replaces the functions themselves, so it does not matter which implementation transformers picked for them
(its torch path, or the ``fla`` / ``causal_conv1d`` kernels it routes to on a GPU when those packages are
installed): the export never calls any of them.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch

from lowerlm.ir import compute
from lowerlm.ir.abi import SILU
from lowerlm.ir.errors import UnsupportedOpError
from lowerlm.ir.ops import Op


@torch.library.custom_op("lowerlm::short_conv", mutates_args=())
def short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """Causal depthwise convolution of x [B, S, C] along the sequence (weight [C, W]), as IR ``short_conv``."""
    return compute.short_conv(x, weight, bias, act)


@short_conv.register_fake
def _(x, weight, bias, act):
    return torch.empty_like(x)


@torch.library.custom_op("lowerlm::delta_rule", mutates_args=())
def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, heads: int,
               scale: float, l2norm: bool, eps: float) -> torch.Tensor:
    """The gated delta rule over token-major heads, as IR ``delta_rule``: [B, S, H*V]."""
    return compute.delta_rule(q, k, v, g, beta, heads, scale, l2norm, eps)


@delta_rule.register_fake
def _(q, k, v, g, beta, heads, scale, l2norm, eps):
    return q.new_empty((*q.shape[:2], v.shape[2]))


_ACTS = {None: "none", "silu": SILU, "swish": SILU}


def _cached(what: str, where: str):
    raise UnsupportedOpError(f"{what} with a cache", where, "lowerlm exports the model without transformers' cache "
                             "(use_cache=False) and keeps the state itself")


def conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
    """transformers' ``causal_conv1d_fn`` (hidden_states [B, C, S], weight [C, W]; what transformers 5.17's KDA and
    gated DeltaNet layers call, and 5.25's ``causal_conv1d_forward`` without a cache) as ``lowerlm::short_conv``."""
    if kwargs.get("seq_idx") is not None:
        raise UnsupportedOpError("causal_conv1d_fn over packed sequences (seq_idx)", "linear attention",
                                 "pass a batch of sequences instead")
    if activation not in _ACTS:
        raise UnsupportedOpError(f"causal_conv1d_fn activation {activation!r}", "linear attention",
                                 "lowerlm's short_conv applies SiLU or nothing")
    x = hidden_states.transpose(1, 2).to(weight.dtype)
    y = torch.ops.lowerlm.short_conv(x, weight, bias, _ACTS[activation])
    return y.to(hidden_states.dtype).transpose(1, 2)


def kimi_conv1d_forward(conv1d, hidden_states, cache=None, layer_idx=None, activation=None, state_idx=0, **kwargs):
    """transformers' ``causal_conv1d_forward`` (5.25: the layer's conv module and its cache) as
    ``lowerlm::short_conv``."""
    where = type(conv1d).__name__
    if cache is not None:
        _cached("causal_conv1d_forward", where)
    channels, width = conv1d.weight.shape[0], conv1d.weight.shape[-1]
    if conv1d.groups != channels or conv1d.weight.shape[1] != 1:
        raise UnsupportedOpError("causal_conv1d_forward of a conv that is not depthwise", where,
                                 "lowerlm's short_conv filters each channel on its own")
    return conv1d_fn(hidden_states, conv1d.weight.reshape(channels, width), conv1d.bias, activation, **kwargs)


def kimi_chunk_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                          use_qk_l2norm_in_kernel=False, **kwargs):
    """transformers' ``chunk_kimi_delta_attention`` ([B, S, H, D] heads) as ``lowerlm::delta_rule``."""
    if initial_state is not None or output_final_state:
        _cached("chunk_kimi_delta_attention", "KimiLinearDeltaAttention")
    if kwargs.get("cu_seqlens") is not None:
        raise UnsupportedOpError("chunk_kimi_delta_attention over packed sequences (cu_seqlens)",
                                 "KimiLinearDeltaAttention", "pass a batch of sequences instead")
    b, s, h, dk = query.shape
    o = torch.ops.lowerlm.delta_rule(query.reshape(b, s, h * dk), key.reshape(b, s, h * dk),
                                     value.reshape(b, s, -1), g.reshape(b, s, -1), beta.reshape(b, s, h), h,
                                     dk ** -0.5, bool(use_qk_l2norm_in_kernel), 1e-6)
    return o.reshape(b, s, h, -1), None


def gated_delta_rule_chunk(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, **kwargs):
    """transformers' ``torch_chunk_gated_delta_rule`` (gated DeltaNet: Qwen3-Next, Qwen3.5, OLMo-Hybrid, ...; one
    decay per value head, value heads grouped over fewer query/key heads) as ``lowerlm::delta_rule``. Its L2 norm is
    ``x * rsqrt(sum x^2 + eps)`` in f32, not the op's ``x / sqrt(...)``: it is traced as ops before the op."""
    if initial_state is not None or output_final_state:
        _cached("torch_chunk_gated_delta_rule", "GatedDeltaNet")
    if kwargs.get("cu_seqlens") is not None:
        raise UnsupportedOpError("torch_chunk_gated_delta_rule over packed sequences (cu_seqlens)", "GatedDeltaNet",
                                 "pass a batch of sequences instead")
    dtype = query.dtype
    b, s, hk, dk = key.shape
    hv = value.shape[2]
    if hk != hv:
        query, key = (x.repeat_interleave(hv // hk, dim=2) for x in (query, key))
    query, key, value = (x.float() for x in (query, key, value))
    if use_qk_l2norm_in_kernel:
        query, key = (x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6) for x in (query, key))
    o = torch.ops.lowerlm.delta_rule(query.reshape(b, s, hv * dk), key.reshape(b, s, hv * dk),
                                     value.reshape(b, s, -1), g.reshape(b, s, hv), beta.reshape(b, s, hv), hv,
                                     dk ** -0.5, False, 1e-6)
    return o.reshape(b, s, hv, -1).to(dtype), None


def _refuse_recurrent(name: str):
    def refuse(*args, **kwargs):
        _cached(name, "linear attention")

    return refuse


# transformers' module-level functions, by name, and what each becomes during export; each is swapped in every
# transformers model module that has it with the parameters listed (copies of one function across families)
SWAPS = {
    "causal_conv1d_forward": (kimi_conv1d_forward, ("conv1d", "hidden_states", "cache", "layer_idx", "activation")),
    "causal_conv1d_fn": (conv1d_fn, ("hidden_states", "weight", "bias", "activation")),
    "chunk_kimi_delta_attention": (kimi_chunk_delta_rule, ("query", "key", "value", "g", "beta", "chunk_size",
                                                           "initial_state", "output_final_state",
                                                           "use_qk_l2norm_in_kernel")),
    "recurrent_kimi_delta_attention": (_refuse_recurrent("recurrent_kimi_delta_attention"), ()),
    "torch_chunk_gated_delta_rule": (gated_delta_rule_chunk, ("query", "key", "value", "g", "beta", "chunk_size",
                                                              "initial_state", "output_final_state",
                                                              "use_qk_l2norm_in_kernel")),
    "torch_recurrent_gated_delta_rule": (_refuse_recurrent("torch_recurrent_gated_delta_rule"), ()),
}


def _inner(fn):
    """The function behind transformers' wrappers: ``functools.wraps`` chains, and the ``kernels`` package's
    ``Func`` module (an ``nn.Module`` whose forward calls the function it closes over)."""
    for _ in range(4):
        if hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        elif isinstance(fn, torch.nn.Module):
            cells = getattr(type(fn).forward, "__closure__", None) or ()
            inner = [c.cell_contents for c in cells if inspect.isfunction(c.cell_contents)]
            if len(inner) != 1:
                return fn
            fn = inner[0]
        else:
            return fn
    return fn


def _takes(fn, params: tuple) -> bool:
    try:
        names = tuple(inspect.signature(_inner(fn)).parameters)
    except (TypeError, ValueError):
        return False
    return names[:len(params)] == params


@contextlib.contextmanager
def swapped():
    """Within the context, every function in ``SWAPS`` of every transformers model module already imported is its
    replacement (when it takes the parameters listed)."""
    saved = []
    try:
        for name, module in list(sys.modules.items()):
            if not name.startswith("transformers.models.") or ".modeling_" not in name or module is None:
                continue
            for fn, (replacement, params) in SWAPS.items():
                original = getattr(module, fn, None)
                if callable(original) and _takes(original, params):
                    saved.append((module, fn, original))
                    setattr(module, fn, replacement)
        yield
    finally:
        for module, fn, original in reversed(saved):
            setattr(module, fn, original)


def convert(imp, node):
    """The IR of a ``lowerlm::short_conv`` or ``lowerlm::delta_rule`` call, or None for any other node."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "lowerlm":
        return None
    name = target._opname
    if name == "short_conv":
        x, w, bias, act = node.args
        inputs = [imp.value(x), imp.value(w), imp.value(bias) if bias is not None else None]
        return imp.emit(node, Op.SHORT_CONV, inputs, {"act": act})
    if name == "delta_rule":
        q, k, v, g, beta, heads, scale, l2norm, eps = node.args
        return imp.emit(node, Op.DELTA_RULE, [imp.value(t) for t in (q, k, v, g, beta)],
                        {"heads": int(heads), "scale": float(scale), "l2norm": bool(l2norm), "eps": float(eps)})
    return None
