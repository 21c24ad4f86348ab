"""insert_kv_cache: ``attention`` → ``kv_cache_write`` of k and v + ``cached_attention`` over declared state.

Why: decoding one token at a time needs the keys and values of every earlier token. Each attention gets two
states, ``[B, Hkv, T, D]`` key and value caches owned by its module (``T`` is the cache length, bound to
``max_seq_len`` by the runtime). The writes return new versions (functional, linear state); the attention reads the
new versions. Semantics of the graph inputs after this pass: ``positions`` are the cache slots the call writes,
``seq_lens`` the number of valid tokens in each sequence's cache after the writes — for a prefill into an empty
cache these are exactly the values the pass's input took, so outputs are unchanged.
Runs after the fusions (they never touch attention) and before specialize. Leaves graphs without attention alone.
"""

from __future__ import annotations

from lowerlm.ir.graph import Graph, GraphBuilder
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import sym
from lowerlm.ir.types import TensorType
from lowerlm.passes.pattern import record_rewrites

CACHE_LEN = "T"


def insert_kv_cache(g: Graph) -> Graph:
    """Give every attention a key and a value cache."""
    if not any(n.op is Op.ATTENTION for n in g.nodes):
        return g
    b = GraphBuilder.rebuild(g)
    finals = []
    for node in g.nodes:
        if node.op is not Op.ATTENTION:
            b.append(node)
            continue
        q, k, v, positions, seq_lens = node.inputs
        hq, hk = node.attr("heads")
        kt, vt = b.types[k], b.types[v]
        batch = kt.shape[0]
        owner = node.source[0] if node.source else ""
        caches = []
        for which, t in (("k", kt), ("v", vt)):
            spec = TensorType(t.dtype, (batch, hk, sym(CACHE_LEN), t.shape[2] // hk))
            hint = f"{owner.replace('model.layers.', 'L').replace('.self_attn', '')}.{which}cache" if owner \
                else f"{which}cache"
            caches.append(b.add_state(hint, spec, owner))
        kc, vc = (b.add(Op.KV_CACHE_WRITE, [c, x, positions], name=c + "1", source=node.source)
                  for c, x in zip(caches, (k, v)))
        attrs = {a: node.attrs[a] for a in ("scale", "causal", "window") if a in node.attrs}
        b.release(node.result_names)  # the cached attention takes the attention's name
        b.add(Op.CACHED_ATTENTION, [q, kc, vc, positions, seq_lens], attrs, source=node.source,
              names=node.result_names)
        finals += [kc, vc]
        record_rewrites()
    return b.build(g.outputs, list(g.state_outputs) + finals)
