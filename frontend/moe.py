"""transformers' MoE experts, captured as one IR ``experts`` op (module capture: frontend/capture.py).

A MoE block is traced like any other module, except its experts: tracing them would unroll the per-expert loop for
the example's routing (or go through whichever experts implementation transformers picks). transformers 5 gives
experts one form -- 3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] behind ``use_experts_implementation``
(eager, grouped_mm, batched_mm), called with the tokens, the top-k ids and the top-k weights -- so every experts
module of that form is swapped for the ``lowerlm::experts`` custom op before export (``EXPERTS_CAPTURE``), whatever
its block's class. The router stays ordinary traced ops (softmax or sigmoid, correction bias, groups, top-k,
renormalisation, scaling), and so do shared experts and their gates; passes/raise_moe_route.py turns a router that
computes exactly one of ``moe_route``'s routers into that op.

An experts module in another layout (transposed, interleaved gate|up, biases, no gate, a post-expert norm), with
its own gate function (clamped or gpt-oss-style GLUs) or with an activation the experts op lacks is refused by class
name. Earlier lowerlm captured three block classes whole (Mixtral, Qwen3-MoE, DeepSeek-V3) as one ``moe`` op; the
traced router raised to ``moe_route`` reaches the same IR after moe_dispatch, launch for launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowerlm.frontend.capture import Capture
from lowerlm.ir.abi import GELU, GELU_TANH, SILU
from lowerlm.ir.errors import UnsupportedOpError
from lowerlm.ir.ops import Op

# Expert activations by class (transformers' ACT2CLS entries and torch's own modules), each exactly an IR activation;
# a name-word match took torch's Tanh for tanh-GeLU and the clipped GeLU (gelu_10) for GeLU.
_ACTS = {"SiLU": SILU, "SiLUActivation": SILU, "GELUActivation": GELU, "GELUTanh": GELU_TANH,
         "NewGELUActivation": GELU_TANH, "FastGELUActivation": GELU_TANH, "AccurateGELUActivation": GELU_TANH}


_FUNCTIONS = {F.silu: SILU, F.gelu: GELU}


def _act(experts: torch.nn.Module) -> str:
    fn = getattr(experts, "act_fn", None)
    name = type(fn).__name__
    for function, act in _FUNCTIONS.items():  # F.silu itself as act_fn (by identity: act_fn need not hash)
        if fn is function:
            return act
    if isinstance(fn, torch.nn.GELU):
        return GELU_TANH if fn.approximate == "tanh" else GELU
    if name in _ACTS:
        return _ACTS[name]
    raise UnsupportedOpError(f"MoE expert activation {name}", type(experts).__name__,
                             "lowerlm's experts run SiLU, GeLU or tanh-GeLU")


# transformers' experts layouts (the ``use_experts_implementation`` flags) lowerlm's experts op takes as they are
_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
           "has_post_expert_norm": False}


def _is_experts(m: torch.nn.Module) -> bool:
    """transformers' common experts form: 3-D gate_up_proj and down_proj behind ``use_experts_implementation``."""
    gate_up = getattr(m, "gate_up_proj", None)
    if not (hasattr(m, "has_gate") and isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3):
        return False
    name = type(m).__name__
    odd = [f"{k}={getattr(m, k, None)}" for k, v in _LAYOUT.items() if getattr(m, k, v) != v]
    if odd:
        raise UnsupportedOpError(f"experts layout {', '.join(odd)}", name,
                                 "lowerlm's experts op takes concatenated [gate; up] [E, 2I, H] and down [E, H, I] "
                                 "without biases")
    gate = getattr(type(m), "_apply_gate", None)
    if gate is not None and gate.__name__ != "_default_apply_gate":
        raise UnsupportedOpError(f"experts gate {gate.__qualname__}", name,
                                 "lowerlm's experts op computes act(gate) * up; this family's gate differs")
    _act(m)  # refused here, naming the activation, rather than at import
    return True


EXPERTS_CAPTURE = Capture(name="experts", matches=_is_experts, weights=lambda m: ["gate_up_proj", "down_proj"],
                          attrs=lambda m: {"act": _act(m)}, op=Op.EXPERTS, args=3)
