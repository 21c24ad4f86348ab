"""transformers' MoE blocks, captured whole as one IR ``moe`` op (module capture: frontend/capture.py).

Tracing a MoE block would unroll its per-expert loop for the example's routing (or go through whichever experts
implementation transformers picks), so each known block class is swapped for the ``lowerlm::moe`` custom op
before export. The op's inputs are the block's router weight, correction bias, stacked expert weights and shared
expert; its attributes carry the routing rules and the rounding points of that family (docs/models.md):

- Mixtral: router logits in the model's dtype, softmax in f32, top-k, always renormalised, weights kept in f32;
- Qwen3-MoE: the same, renormalised only with ``norm_topk_prob``, weights cast back to the model's dtype;
- DeepSeek-V3: logits in f32, sigmoid scores, choice by score + ``e_score_correction_bias`` within the
  ``topk_group`` best of ``n_group`` groups, unbiased weights renormalised (with ``norm_topk_prob``) times
  ``routed_scaling_factor``, plus the shared experts' SwiGLU MLP on every token.

A block that looks like a MoE (a router ``gate`` and ``experts`` holding ``gate_up_proj``) but is none of these
is refused with its class name rather than traced into a wrong graph.
"""

from __future__ import annotations

import torch

from lowerlm.frontend.capture import Capture
from lowerlm.ir.abi import GELU, GELU_TANH, SILU
from lowerlm.ir.errors import UnsupportedOpError
from lowerlm.ir.ops import Op

# Expert activations by class (transformers' ACT2CLS entries and torch's own modules), each exactly an IR activation;
# a name-word match took torch's Tanh for tanh-GeLU and the clipped GeLU (gelu_10) for GeLU.
_ACTS = {"SiLU": SILU, "SiLUActivation": SILU, "GELUActivation": GELU, "GELUTanh": GELU_TANH,
         "NewGELUActivation": GELU_TANH, "FastGELUActivation": GELU_TANH, "AccurateGELUActivation": GELU_TANH}


def _act(experts: torch.nn.Module) -> str:
    fn = getattr(experts, "act_fn", None)
    name = type(fn).__name__
    if isinstance(fn, torch.nn.GELU):
        return GELU_TANH if fn.approximate == "tanh" else GELU
    if name in _ACTS:
        return _ACTS[name]
    raise UnsupportedOpError(f"MoE expert activation {name}", type(experts).__name__,
                             "lowerlm's experts run SiLU, GeLU or tanh-GeLU")


def _softmax(renormalize, weights_f32: bool):
    def attrs(m):
        return {"router": "softmax", "top_k": int(m.gate.top_k),
                "renormalize": bool(renormalize(m)), "weights_f32": weights_f32, "act": _act(m.experts)}
    return attrs


def _deepseek(m) -> dict:
    g = m.gate
    return {"router": "sigmoid", "top_k": int(g.top_k), "n_group": int(g.num_group),
            "topk_group": int(g.topk_group), "renormalize": bool(g.norm_topk_prob),
            "scaling": float(g.routed_scaling_factor), "router_f32": True, "weights_f32": True,
            "act": _act(m.experts)}


_EXPERTS = ["gate.weight", None, "experts.gate_up_proj", "experts.down_proj", None, None, None]
_SHARED = ["gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj",
           "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight"]

# block class name -> (weight names in the moe op's slots after x, attributes)
FAMILIES = {
    "MixtralSparseMoeBlock": (_EXPERTS, _softmax(lambda m: True, weights_f32=True)),
    "Qwen3MoeSparseMoeBlock": (_EXPERTS, _softmax(lambda m: m.gate.norm_topk_prob, weights_f32=False)),
    "DeepseekV3MoE": (_SHARED, _deepseek),
}


def _looks_like_moe(m: torch.nn.Module) -> bool:
    return hasattr(m, "gate") and hasattr(getattr(m, "experts", None), "gate_up_proj")


def _matches(m: torch.nn.Module) -> bool:
    name = type(m).__name__
    if name in FAMILIES:
        return True
    if _looks_like_moe(m):
        raise UnsupportedOpError(f"MoE block {name}", name, f"lowerlm captures {', '.join(FAMILIES)}; add the "
                                 "family's routing rules to frontend/moe.py")
    return False


MOE_CAPTURE = Capture(name="moe", matches=_matches, weights=lambda m: FAMILIES[type(m).__name__][0],
                      attrs=lambda m: FAMILIES[type(m).__name__][1](m), op=Op.MOE)
