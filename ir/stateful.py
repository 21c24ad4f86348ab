"""Stateful forms: what each op that reads earlier tokens becomes once it runs one call at a time against
declared state (``insert_state``). An op's row (``OpDef.stateful``) points here; the pass asks every node.

``form(b, node, positions, seq_lens)`` appends to the builder ``b`` the node's stateful replacement -- taking the
node's result names -- and returns the final state versions it made. ``positions`` are the cache slots (absolute
positions) of the call's tokens and ``seq_lens`` each sequence's valid tokens after the call (ir/abi.py); a token
at or past its ``seq_lens`` is padding and never enters state.
"""

from __future__ import annotations

from lowerlm.ir.abi import CACHE_LEN, short_path
from lowerlm.ir.dtypes import DType
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import sym
from lowerlm.ir.types import KV, RECURRENT, TensorType


def _owner(node) -> str:
    return node.source[0] if node.source else ""


def _hint(node, drop: str, what: str) -> str:
    owner = _owner(node)
    # the builder turns what a value name cannot hold into '_' (a module path may hold any character)
    return f"{short_path(owner, drop)}.{what}" if owner else what


def attention(b, node, positions, seq_lens) -> list:
    """``attention`` -> ``kv_cache_write`` of k and v into ``[B, Hkv, T, D]`` KV caches + ``cached_attention``
    over the new versions (``T``: the cache length, bound to max_seq_len by the runtime)."""
    q, k, v, pos, lens, sinks = node.inputs
    _, hk = node.attr("heads")
    kt, vt = b.types[k], b.types[v]
    caches = []
    for which, t in (("k", kt), ("v", vt)):
        spec = TensorType(t.dtype, (kt.shape[0], hk, sym(CACHE_LEN), t.shape[2] // hk))
        caches.append(b.add_state(_hint(node, ".self_attn", f"{which}cache"), spec, _owner(node), KV))
    kc, vc = (b.add(Op.KV_CACHE_WRITE, [c, x, pos], name=c + "1", source=node.source) for c, x in zip(caches, (k, v)))
    attrs = {a: node.attrs[a] for a in ("scale", "causal", "window", "softcap") if a in node.attrs}
    b.release(node.result_names)  # the cached attention takes the attention's name
    b.add(Op.CACHED_ATTENTION, [q, kc, vc, pos, lens, sinks], attrs, source=node.source, names=node.result_names)
    return [kc, vc]


def short_conv(b, node, positions, seq_lens) -> list:
    """``short_conv`` -> ``cached_short_conv`` over a recurrent ``[B, W-1, C]`` state: the last W-1 inputs."""
    x, w, bias = node.inputs
    xt, width = b.types[x], b.types[w].shape[1]
    state = b.add_state(_hint(node, "", "conv"), xt.with_shape((xt.shape[0], width - 1, xt.shape[2])),
                        _owner(node), RECURRENT)
    b.release(node.result_names)
    _, new = b.add(Op.CACHED_SHORT_CONV, [x, w, bias, state, positions, seq_lens], node.attrs, source=node.source,
                   names=[node.result_names[0], state + "1"])
    return [new]


def delta_rule(b, node, positions, seq_lens) -> list:
    """``delta_rule`` -> ``cached_delta_rule`` over a recurrent f32 ``[B, H, K, V]`` state."""
    q, k, v, g, beta = node.inputs
    heads = node.attr("heads")
    qt, vt = b.types[q], b.types[v]
    spec = TensorType(DType.F32, (qt.shape[0], heads, qt.shape[2] // heads, vt.shape[2] // heads))
    state = b.add_state(_hint(node, "", "delta"), spec, _owner(node), RECURRENT)
    b.release(node.result_names)
    _, new = b.add(Op.CACHED_DELTA_RULE, [q, k, v, g, beta, state, positions, seq_lens], node.attrs,
                   source=node.source, names=[node.result_names[0], state + "1"])
    return [new]


def mla_attention(b, node, positions, seq_lens) -> list:
    """``mla_attention`` -> ``kv_cache_write`` of the latent c into ``[B, 1, T, L]`` and of the shared rotary key
    k_pe into ``[B, 1, T, R]`` + ``cached_mla_attention`` over the new versions: the cache holds L+R numbers per
    token, not the heads' expanded keys and values."""
    q, c, k_pe, w, pos, lens = node.inputs
    caches = []
    for which, x in (("ccache", c), ("kpecache", k_pe)):
        t = b.types[x]
        spec = TensorType(t.dtype, (t.shape[0], 1, sym(CACHE_LEN), t.shape[2]))
        caches.append(b.add_state(_hint(node, ".self_attn", which), spec, _owner(node), KV))
    cc, kc = (b.add(Op.KV_CACHE_WRITE, [s, x, pos], name=s + "1", source=node.source)
              for s, x in zip(caches, (c, k_pe)))
    b.release(node.result_names)
    b.add(Op.CACHED_MLA_ATTENTION, [q, cc, kc, w, pos, lens], dict(node.attrs), source=node.source,
          names=node.result_names)
    return [cc, kc]
