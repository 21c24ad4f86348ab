"""RoPE's math, with the op: the cos/sin tables and the rotation of both layouts.

The reference backend's ``rope`` computes with them, and the frontend uses them to recognise a model's rotary
embedding numerically (frontend/raise_attention.py), so what is recognised is what every backend computes.
Layouts: ``half`` rotates the first half of a head's rotary dims against the second (Llama), ``interleaved``
rotates even dims against odd ones (GPT-J). docs/models.md gives the formulas. torch is imported when this module
is, which ``import lowerlm.ir`` never does.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions, inv_freq, scaling: float, layout: str, dtype):
    """cos, sin: [B, S, 1, R] (R = 2 * len(inv_freq)) for positions: [B, S], each times ``scaling``."""
    freqs = positions.float()[..., None] * torch.tensor(inv_freq, dtype=torch.float32)
    emb = torch.cat([freqs, freqs], -1) if layout == "half" else freqs.repeat_interleave(2, -1)
    return (emb.cos() * scaling).to(dtype)[:, :, None, :], (emb.sin() * scaling).to(dtype)[:, :, None, :]


def rotate(x, layout: str):
    """The rotated partner of x's last axis: ``x * cos + rotate(x) * sin`` is the rotary embedding."""
    if layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([-x2, x1], dim=-1).flatten(-2)
