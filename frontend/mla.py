"""Multi-head latent attention (DeepSeek-V2/V3, Kimi Linear, GLM-4-MoE-Lite, MiniCPM3, ... in transformers) made
traceable.

transformers' MLA modules expand the cached latent into per-head keys and values in one method, ``expand_kv(kv_nope
[B, 1, S, L], k_rot [B, 1, S, R])``: ``kv_b_proj`` of the latent, split per head into the key's non-rotary part and
the value, and the key's shared rotary part broadcast over the heads. It writes the key into ``new_empty`` storage
with two ``copy_``s, which torch.export turns into ``new_empty`` + ``slice_scatter`` + ``copy`` -- ops with no IR
form. During export (``traceable``) each such module's ``expand_kv`` is replaced by the same computation with a
``torch.cat``, after checking on random latents that it gives exactly what the module's own method gives (a family
whose method computes something else keeps it, and is refused at import as before). The attention after it is
ordinary attention, raised like any other; the cache then holds expanded keys and values.
"""

from __future__ import annotations

import contextlib
import types

import torch

_SIZES = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")


def _is_mla(m: torch.nn.Module) -> bool:
    return callable(getattr(m, "expand_kv", None)) and isinstance(getattr(m, "kv_b_proj", None), torch.nn.Module) \
        and all(isinstance(getattr(m, a, None), int) for a in _SIZES)


def _expand_kv(self, kv_nope: torch.Tensor, k_rot: torch.Tensor) -> tuple:
    """transformers' ``expand_kv`` with a concatenation for its ``new_empty`` + ``copy_``."""
    b, _, s, _ = kv_nope.shape
    kv = self.kv_b_proj(kv_nope).view(b, s, -1, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
    k_nope, value = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
    return torch.cat([k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)], dim=-1), value


def _same(m: torch.nn.Module, original) -> bool:
    """``_expand_kv`` computes exactly what the module's own method does, on random latents of two lengths."""
    p = next(m.kv_b_proj.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in (1, 3):
            c = torch.randn(2, 1, s, m.kv_lora_rank, generator=g).to(p.device, p.dtype)
            r = torch.randn(2, 1, s, m.qk_rope_head_dim, generator=g).to(p.device, p.dtype)
            want, got = original(c, r), _expand_kv(m, c, r)
            if not (isinstance(want, tuple) and len(want) == 2 and
                    all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(want, got))):
                return False
    return True


@contextlib.contextmanager
def traceable(model: torch.nn.Module):
    """Within the context, every MLA module of ``model`` whose ``expand_kv`` ``_expand_kv`` reproduces runs that."""
    swapped = []
    try:
        for m in model.modules():
            if _is_mla(m) and "expand_kv" not in vars(m) and _same(m, m.expand_kv):
                m.expand_kv = types.MethodType(_expand_kv, m)
                swapped.append(m)
        yield
    finally:
        for m in swapped:
            del m.expand_kv
