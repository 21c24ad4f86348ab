"""raise_mla: attention over the keys and values of one ``mla_expand`` becomes ``mla_attention``.

    %k, %v = mla_expand(%c, %k_pe, %w) {heads, nope}
    %o = attention(%q, %k, %v, %positions, %seq_lens) {heads=[H, H], scale}
  ->
    %o = mla_attention(%q, %c, %k_pe, %w, %positions, %seq_lens) {heads, nope, scale}

Why: the attention then reads the latent c [B, S, L] and the shared rotary key k_pe [B, S, R] instead of the heads'
expanded keys and values, so insert_state's stateful form of ``mla_attention`` caches L + R numbers per token and
layer (576 at DeepSeek-V3's sizes) rather than H * (P + R + V) (40960), and decode runs the absorbed form (W_UK
folded into the query, W_UV applied to the latent output; docs/models.md). Runs before insert_state.

Does not fire when the attention is not exactly mla_attention's: keys from one expansion and values from another,
a window, a soft-cap, sinks, a non-causal mask, or heads other than the expansion's. The ``mla_expand`` stays when
something else reads its keys or values.
"""

from __future__ import annotations

from lowerlm.ir.graph import Graph
from lowerlm.ir.ops import Op
from lowerlm.passes.canonicalize import dce
from lowerlm.passes.pattern import Pass, Pat, rewrite


def _expansion(ctx, root):
    """The ``mla_expand`` whose keys (result 0) and values (result 1) the attention reads, or None."""
    _, k, v, *_ = root.inputs
    exp = ctx.producer(k)
    if exp is None or exp.op != Op.MLA_EXPAND or tuple(exp.result_names) != (k, v):
        return None
    return exp


def _plain(ctx, root) -> bool:
    exp = _expansion(ctx, root)
    return exp is not None and root.inputs[5] is None and root.attr("causal") and not root.attr("window") \
        and not root.attr("softcap") and list(root.attr("heads")) == [exp.attr("heads")] * 2


def _raise(ctx, root):
    exp = _expansion(ctx, root)
    q, _, _, positions, seq_lens, _ = root.inputs
    c, k_pe, w = exp.inputs
    return ctx.add(Op.MLA_ATTENTION, [q, c, k_pe, w, positions, seq_lens],
                   {"heads": exp.attr("heads"), "nope": exp.attr("nope"), "scale": root.attr("scale")})


RULES = [(Pat(Op.ATTENTION, name="root", where=_plain), _raise)]


@Pass
def raise_mla(g: Graph) -> tuple:
    """Attention over one mla_expand's keys and values becomes mla_attention over its latents."""
    g, n = rewrite(g, RULES, name="raise_mla")
    return (dce(g)[0] if n else g), n
