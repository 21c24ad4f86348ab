"""Multi-head latent attention (DeepSeek-V2/V3, Kimi Linear, GLM-4-MoE-Lite, MiniCPM3, ... in transformers) captured
at its expansion.

transformers' MLA modules expand the latent into per-head keys and values in one method, ``expand_kv(kv_nope
[B, 1, S, L], k_rot [B, 1, S, R])``: ``kv_b_proj`` of the latent, split per head into the key's non-rotary part and
the value, and the key's shared rotary part broadcast over the heads (written into ``new_empty`` storage with two
``copy_``s, which torch.export turns into ops with no IR form). During export (``traceable``) each such module's
``expand_kv`` is replaced by a call to the custom op ``lowerlm::mla_expand(kv_nope, k_rot, kv_b_proj.weight)``,
which the importer turns into the IR op ``mla_expand`` (``convert``) -- after checking on random latents that it
gives exactly what the module's own method gives (a family whose method computes something else keeps it, and is
refused at import as before). The attention over its keys and values is raised like any other; passes/raise_mla.py
then makes the pair one ``mla_attention``, whose stateful form caches the latent and the rotary key (L + R numbers
per token) instead of the heads' keys and values. A ``kv_b_proj`` that is not a plain bias-free ``nn.Linear`` gets
the same computation with a ``torch.cat`` instead: traced as ordinary ops, its cache expanded.
"""

from __future__ import annotations

import contextlib
import types

import torch

from lowerlm.ir import compute
from lowerlm.ir.ops import Op

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


@torch.library.custom_op("lowerlm::mla_expand", mutates_args=())
def mla_expand(kv_nope: torch.Tensor, k_rot: torch.Tensor, w: torch.Tensor, heads: int,
               nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``expand_kv`` as IR ``mla_expand``: kv_nope [B, 1, S, L], k_rot [B, 1, S, R] -> (key
    [B, H, S, P+R], value [B, H, S, V])."""
    b, _, s, _ = kv_nope.shape
    k, v = compute.mla_expand(kv_nope[:, 0], k_rot[:, 0], w, heads, nope)
    return tuple(x.view(b, s, heads, -1).transpose(1, 2).contiguous() for x in (k, v))


@mla_expand.register_fake
def _(kv_nope, k_rot, w, heads, nope):
    b, _, s, _ = kv_nope.shape
    v = w.shape[0] // heads - nope
    return kv_nope.new_empty((b, heads, s, nope + k_rot.shape[-1])), kv_nope.new_empty((b, heads, s, v))


def _captured(m: torch.nn.Module) -> bool:
    """Whether ``m``'s expansion can be the ``mla_expand`` op: kv_b_proj a plain bias-free linear whose rows split
    into heads of nope + v."""
    proj = m.kv_b_proj
    rows = m.qk_nope_head_dim + m.v_head_dim
    return type(proj) is torch.nn.Linear and proj.bias is None and proj.weight.shape[0] % rows == 0


def _expand_kv_op(self, kv_nope: torch.Tensor, k_rot: torch.Tensor) -> tuple:
    """transformers' ``expand_kv`` as one ``lowerlm::mla_expand`` call."""
    w = self.kv_b_proj.weight
    return mla_expand(kv_nope, k_rot, w, w.shape[0] // (self.qk_nope_head_dim + self.v_head_dim),
                      self.qk_nope_head_dim)


def _same(m: torch.nn.Module, original, replacement) -> bool:
    """``replacement`` computes exactly what the module's own method does, on random latents of two lengths."""
    p = next(m.kv_b_proj.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in (1, 3):
            c = torch.randn(2, 1, s, m.kv_lora_rank, generator=g).to(p.device, p.dtype)
            r = torch.randn(2, 1, s, m.qk_rope_head_dim, generator=g).to(p.device, p.dtype)
            want, got = original(c, r), replacement(m, c, r)
            if not (isinstance(want, tuple) and len(want) == 2 and
                    all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(want, got))):
                return False
    return True


@contextlib.contextmanager
def traceable(model: torch.nn.Module):
    """Within the context, every MLA module of ``model`` whose ``expand_kv`` the ``mla_expand`` op (or, for another
    kv_b_proj, ``_expand_kv``) reproduces runs that."""
    swapped = []
    try:
        for m in model.modules():
            if not _is_mla(m) or "expand_kv" in vars(m):
                continue
            replacement = _expand_kv_op if _captured(m) else _expand_kv
            if _same(m, m.expand_kv, replacement):
                m.expand_kv = types.MethodType(replacement, m)
                swapped.append(m)
        yield
    finally:
        for m in swapped:
            del m.expand_kv


def convert(imp, node):
    """The IR of a ``lowerlm::mla_expand`` call (``mla_expand`` on the token-major latents, its results viewed as
    transformers' [B, H, S, D]), or None for any other node."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "lowerlm" or \
            target._opname != "mla_expand":
        return None
    kv_nope, k_rot, w, heads, nope = node.args
    flat = []
    for x in (kv_nope, k_rot):  # [B, 1, S, D] -> [B, S, D]
        v = imp.value(x)
        b, _, s, d = imp.b.types[v].shape
        flat.append(imp.emit(node, Op.RESHAPE, [v], {"shape": [b, s, d]}))
    k, v = imp.emit(node, Op.MLA_EXPAND, [*flat, imp.value(w)], {"heads": int(heads), "nope": int(nope)})
    out = []
    for x in (k, v):
        b, s, width = imp.b.types[x].shape
        heads4 = imp.emit(node, Op.RESHAPE, [x], {"shape": [b, s, int(heads), width // int(heads)]})
        out.append(imp.emit(node, Op.TRANSPOSE, [heads4], {"perm": [0, 2, 1, 3]}))
    return tuple(out)
