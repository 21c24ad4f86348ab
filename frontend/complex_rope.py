"""Rotary embeddings computed with complex numbers (DeepSeek-V2), made real.

DeepSeek-V2's rotary module returns ``freqs_cis = scaling * polar(1, positions * inv_freq)`` and its
``apply_rotary_emb(xq, xk, freqs_cis)`` multiplies neighbouring pairs of q and k, viewed as complex numbers, by it.
The IR has no complex dtype, so during export (``real``) the module-level ``apply_rotary_emb`` is replaced by the
same product written out on pairs, ``(a c - b s, a s + b c)`` in f32, and each rotary module of that file by one
returning ``scaling * [cos, sin]`` as a trailing axis of 2 instead of a complex tensor: the interleaved RoPE the
frontend already lowers. Both replacements are checked on random inputs against the originals first (f32, within
1e-6); a file where they differ keeps its own functions and is refused at ``aten.polar`` by name.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types

import torch


def real_rotary_forward(self, x, position_ids):
    """The rotary module's ``freqs_cis`` as real pairs: [..., D/2, 2] = scaling * (cos, sin)."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([torch.cos(freqs), torch.sin(freqs)], dim=-1) * self.attention_scaling


def real_apply_rotary_emb(xq, xk, freqs_cis):
    """``apply_rotary_emb`` with ``freqs_cis`` as real pairs [B, S, D/2, 2]: each neighbouring pair (a, b) of q and k
    times (c, s) as complex numbers, in f32, cast back."""
    f = freqs_cis.unsqueeze(1).to(xq.device)
    c, s = f[..., 0], f[..., 1]

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


def _rotaries(model: torch.nn.Module, module) -> list:
    """The rotary modules of ``model`` defined in ``module`` whose forward builds a complex polar tensor."""
    out = []
    for m in model.modules():
        cls = type(m)
        if cls.__module__ != module.__name__ or not hasattr(m, "inv_freq") or not hasattr(m, "attention_scaling"):
            continue
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if "torch.polar" in source:
            out.append(m)
    return out


def _agrees(module, rotary: torch.nn.Module) -> bool:
    g = torch.Generator().manual_seed(0)
    heads, dim = 2, 2 * rotary.inv_freq.shape[0]
    xq, xk = torch.randn(2, heads, 5, dim, generator=g), torch.randn(2, 1, 5, dim, generator=g)
    pos = torch.arange(5).repeat(2, 1) * 7
    try:
        with torch.no_grad():
            want = module.apply_rotary_emb(xq, xk, rotary(xq, pos))
            got = real_apply_rotary_emb(xq, xk, real_rotary_forward(rotary, xq, pos))
    except Exception:  # noqa: BLE001 -- shapes this form does not take (Llama 4's): not this form
        return False
    return all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(want, got))


@contextlib.contextmanager
def real(model: torch.nn.Module):
    """Within the context, the complex rotary embeddings of ``model`` (checked equal) compute with real pairs."""
    saved_fns, saved_fwd = [], []
    try:
        for name, module in list(sys.modules.items()):
            if not name.startswith("transformers.models.") or ".modeling_" not in name or module is None:
                continue
            apply = getattr(module, "apply_rotary_emb", None)
            if not callable(apply):
                continue
            try:
                params = tuple(inspect.signature(apply).parameters)[:3]
            except (TypeError, ValueError):
                continue
            rotaries = _rotaries(model, module) if params == ("xq", "xk", "freqs_cis") else []
            if not rotaries or not all(_agrees(module, r) for r in rotaries):
                continue
            saved_fns.append((module, apply))
            module.apply_rotary_emb = real_apply_rotary_emb
            for r in rotaries:
                r.forward = types.MethodType(real_rotary_forward, r)
                saved_fwd.append(r)
        yield
    finally:
        for module, apply in saved_fns:
            module.apply_rotary_emb = apply
        for r in saved_fwd:
            del r.forward
