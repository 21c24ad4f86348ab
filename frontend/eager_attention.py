"""Attention that transformers runs only eagerly, made traceable: soft-capped logits (Gemma-2, VaultGemma) and
attention sinks (gpt-oss and its kin).

transformers refuses sdpa for these models, because sdpa has neither soft-capping nor sinks. lowerlm registers an
attention implementation of its own with transformers (``AttentionInterface``, name ``lowerlm``) and switches
such a model to it for the export: it computes what the model's ``eager_attention_forward`` computes, as one
custom op, ``lowerlm::attention(query, key, value, attn_mask, scale, softcap, sinks)``, that torch.export keeps
whole and ``raise_attention`` raises like an sdpa call (its mask checked the same way) into an ``attention`` op
with ``softcap`` and ``sinks``. Its mask comes from transformers' sdpa mask builder with the causal skip off, so
the mask is always explicit. Anything else the model passes to its attention function (a position bias, …) is
refused by name.
"""

from __future__ import annotations

import functools

import torch

from lowerlm.frontend.sparse_attention import ALL_KEYS
from lowerlm.ir.errors import UnsupportedOpError

NAME = "lowerlm"  # the attention implementation's name in transformers' registries


@torch.library.custom_op("lowerlm::attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
              scale: float, softcap: float, sinks: torch.Tensor | None) -> torch.Tensor:
    """transformers' eager attention over [B, H, S, D] heads (k and v with fewer heads: grouped), as its
    ``eager_attention_forward`` computes it: scores in the inputs' dtype, soft-capped when ``softcap`` > 0, the
    boolean mask (True: visible), a softmax in f32 -- over the scores and the head's sink logit when ``sinks``
    is given -- and the weighted values. Result [B, Hq, S, Dv]."""
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    if sinks is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    else:  # gpt-oss: the sink is one more logit per head, dropped after the softmax
        sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
        both = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(both - both.max(dim=-1, keepdim=True).values, dim=-1, dtype=both.dtype)[..., :-1]
    return torch.matmul(probs.to(value.dtype), value)


@attention.register_fake
def _(query, key, value, attn_mask, scale, softcap, sinks):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
            softcap: float | None = None, s_aux=None, sinks=None, position_bias=None, **kwargs):
    """The attention function transformers calls in place of its eager one (``AttentionInterface``): returns
    (output [B, S, H, Dv], no weights) as every transformers attention function does."""
    if position_bias is not None:
        raise UnsupportedOpError("position_bias", type(module).__name__, "an additive position bias on the attention "
                                 "scores has no IR form yet")
    selected = kwargs.get("indices")  # a selection of keys (frontend/sparse_attention.py), or every key
    if selected is not None and selected is not ALL_KEYS:
        raise UnsupportedOpError("sparse attention indices", type(module).__name__, "attention over a selection of "
                                 "keys has no IR form; lowerlm runs DeepSeek sparse attention up to index_topk keys")
    if dropout and module.training:
        raise UnsupportedOpError("attention dropout", type(module).__name__, "compile the model in eval mode")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    sink = s_aux if s_aux is not None else sinks
    out = torch.ops.lowerlm.attention(query, key, value, attention_mask, float(scale), float(softcap or 0.0), sink)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def register() -> str:
    """Register the attention function and its mask builder with transformers (once); returns their name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, forward)
    AttentionMaskInterface.register(NAME, functools.partial(sdpa_mask, allow_is_causal_skip=False))
    return NAME
