"""transformers' MoE experts, captured as one IR ``experts`` op (module capture: frontend/capture.py).

A MoE block is traced like any other module, except its experts: tracing them would unroll the per-expert loop for
the example's routing (or go through whichever experts implementation transformers picks). transformers 5 gives
experts one form -- 3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] behind ``use_experts_implementation``
(eager, grouped_mm, batched_mm), called with the tokens, the top-k ids and the top-k weights -- so every experts
module of that form is swapped for the ``lowerlm::experts`` custom op before export (``EXPERTS_CAPTURE``), whatever
its block's class. The router stays ordinary traced ops (softmax or sigmoid, correction bias, groups, top-k,
renormalisation, scaling), and so do shared experts and their gates; passes/raise_moe_route.py turns a router that
computes exactly one of ``moe_route``'s routers into that op.

A family's own gate function (``_apply_gate``) is matched numerically against the experts op's gated unit: clamped
at a limit before or after the act (DeepSeek-V4, HY-V4, Bailing), gpt-oss's GLU (SiLU with alpha, up + 1; MiniMax's
experts), checked in f32 and bit for bit in bf16. An experts module in another layout (transposed, interleaved
gate|up, biases, no gate, a post-expert norm), with a gate none of those forms computes or with an activation the
experts op lacks is refused, naming its class. Earlier lowerlm captured three block classes whole (Mixtral,
Qwen3-MoE, DeepSeek-V3) as one ``moe`` op; the traced router raised to ``moe_route`` reaches the same IR after
moe_dispatch, launch for launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowerlm.frontend.capture import Capture
from lowerlm.ir.abi import GELU, GELU_TANH, SILU
from lowerlm.ir.errors import UnsupportedOpError
from lowerlm.ir.ops import Op
from lowerlm.ir.weights import Deinterleave, Transpose

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


# transformers' experts layouts (the ``use_experts_implementation`` flags): the experts op takes concatenated
# [gate; up] [E, 2I, H] and down [E, H, I]; transposed ([E, H, 2I], [E, I, H]: gpt-oss, Aria), interleaved gate|up
# columns (gpt-oss) and biases ([E, 2I], [E, H]) are read through weight expressions and optional inputs
_LAYOUT = {"has_gate": True, "has_post_expert_norm": False}


def _is_experts(m: torch.nn.Module) -> bool:
    """transformers' common experts form: 3-D gate_up_proj and down_proj behind ``use_experts_implementation``."""
    gate_up = getattr(m, "gate_up_proj", None)
    if not (hasattr(m, "has_gate") and isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3):
        return False
    name = type(m).__name__
    odd = [f"{k}={getattr(m, k, None)}" for k, v in _LAYOUT.items() if getattr(m, k, v) != v]
    if odd:
        raise UnsupportedOpError(f"experts layout {', '.join(odd)}", name,
                                 "lowerlm's experts op computes act(gate) * up and no norm after the experts")
    if getattr(m, "has_bias", False) and not all(isinstance(getattr(m, b, None), torch.Tensor)
                                                 for b in ("gate_up_proj_bias", "down_proj_bias")):
        raise UnsupportedOpError("experts layout has_bias=True", name,
                                 "lowerlm reads the biases from gate_up_proj_bias and down_proj_bias")
    _unit(m)  # refused here, naming the gate or the activation, rather than at import
    return True


def _weights(m: torch.nn.Module) -> list:
    biased = getattr(m, "has_bias", False)
    return ["gate_up_proj", "down_proj"] + (["gate_up_proj_bias", "down_proj_bias"] if biased else [])


def _layout(m: torch.nn.Module) -> list:
    """Per weight (``_weights``), the expression making it the experts op's layout, or None."""
    transposed, interleaved = getattr(m, "is_transposed", False), not getattr(m, "is_concatenated", True)

    def gate_up(p):
        p = Transpose(p) if transposed else p  # [E, 2I, H]
        return Deinterleave(p, 1) if interleaved else p  # [gate; up] rows

    fns = [gate_up if transposed or interleaved else None, Transpose if transposed else None]
    if getattr(m, "has_bias", False):
        fns += [(lambda p: Deinterleave(p, 1)) if interleaved else None, None]
    return fns


def _probe(m: torch.nn.Module, dtype: torch.dtype, limit: float) -> tuple:
    """([gate | up] rows, the module's own gate of them) in ``dtype``: values spread past the limit, so clamps
    show; the module is handed them in its own layout (interleaved gate|up columns where it has those)."""
    inter = m.gate_up_proj.shape[2 if getattr(m, "is_transposed", False) else 1] // 2
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(64, 2 * inter, generator=g) * max(3.0, 2 * limit)).to(dtype)
    own = rows
    if not getattr(m, "is_concatenated", True):
        own = torch.stack(rows.chunk(2, dim=-1), dim=-1).flatten(-2)  # gate, up, gate, up, ...
    with torch.no_grad():
        return rows, m._apply_gate(own)


def _unit(m: torch.nn.Module) -> dict:
    """The experts op's gated-unit attributes (``act`` and ir/opdefs.py's GLU) for ``m``. transformers' default
    gate is act(gate) * up; a family's own ``_apply_gate`` is matched numerically against the clamped and shifted
    forms the op has -- limit and alpha read from the module (``limit``/``swiglu_limit``, ``alpha``/
    ``swiglu_alpha``) -- in f32 and exactly in bf16 (a gate computed in another precision is refused)."""
    gate = getattr(type(m), "_apply_gate", None)
    if gate is None or gate.__name__ == "_default_apply_gate":
        return {"act": _act(m)}
    limit = next((float(v) for k in ("limit", "swiglu_limit") if (v := getattr(m, k, None))), 0.0)
    alpha = next((float(v) for k in ("alpha", "swiglu_alpha") if (v := getattr(m, k, None)) is not None), 1.0)
    # the match depends on these alone: probed once per kind, not for every layer and every ask (the capture's
    # matcher, its attributes and the trace key each ask)
    key = (type(m), gate, limit, alpha, repr(getattr(m, "act_fn", None)), getattr(m, "is_concatenated", True))
    if key not in _UNITS:
        _UNITS[key] = _match_gate(m, gate, limit, alpha)
    return dict(_UNITS[key])


_UNITS: dict = {}  # (experts class, its gate, limit, alpha, act_fn, layout) -> the matched unit


def _match_gate(m: torch.nn.Module, gate, limit: float, alpha: float) -> dict:
    from lowerlm.ir.compute import glu

    acts = [_act(m)] if getattr(m, "act_fn", None) is not None else [SILU, GELU, GELU_TANH]
    probes = [_probe(m, dtype, limit) for dtype in (torch.float32, torch.bfloat16)]
    for act in acts:
        for unit in ({"limit": lim, "clamp": clamp, "alpha": a, "up_shift": shift}
                     for lim in {0.0, limit} for clamp in ("gate", "act") for a in {1.0, alpha} for shift in (0.0, 1.0)
                     if (lim or clamp == "gate") and (act == SILU or a == 1.0)):
            ok = True
            for (rows, want), exact in zip(probes, (False, True)):
                got = glu(*rows.chunk(2, dim=-1), act, **unit)
                ok = ok and got.shape == want.shape and got.dtype == want.dtype and (
                    torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-6, atol=1e-6))
            if ok:
                defaults = {"limit": 0.0, "clamp": "gate", "alpha": 1.0, "up_shift": 0.0}
                return {"act": act, **{k: v for k, v in unit.items() if v != defaults[k]}}
    raise UnsupportedOpError(f"experts gate {gate.__qualname__}", type(m).__name__,
                             "lowerlm's experts op computes act(gate) * up, clamped and shifted as DeepSeek-V4, "
                             "Bailing, MiniMax and gpt-oss do (in the model's dtype); this family's gate is none of "
                             "those")


EXPERTS_CAPTURE = Capture(name="experts", matches=_is_experts, weights=_weights, attrs=_unit, op=Op.EXPERTS, args=3,
                          layout=_layout)
