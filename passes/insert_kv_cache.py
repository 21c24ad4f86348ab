"""insert_kv_cache: ``attention`` → ``kv_cache_write`` of k and v + ``cached_attention`` over declared state.

Why: decoding one token at a time needs the keys and values of every earlier token. Each attention gets two
states, ``[B, Hkv, T, D]`` key and value caches owned by its module (``T`` is the cache length, bound to
``max_seq_len`` by the runtime). The writes return new versions (functional, linear state); the attention reads the
new versions. Semantics of the graph inputs after this pass: ``positions`` are the cache slots the call writes,
``seq_lens`` the number of valid tokens in each sequence's cache after the writes — for a prefill into an empty
cache these are exactly the values the pass's input took, so outputs are unchanged.
Runs after the fusions (they never touch attention) and before specialize. Leaves graphs without attention as they
are.

It refuses a graph that mixes tokens outside attention (``sequence_mixers``): a reduction or softmax over the
sequence axis, a product contracting it, a value indexed by two sequence axes (pairwise scores), a slice, split,
gather or concat along it (token shifts). One token at a time against a cache computes something else there, so
generation would be silently wrong. The check reads shapes, so it sees the common forms, not every conceivable one
(a sequence axis first merged into another and then reduced over part of it would pass). It refuses an attention
without a causal mask for the same reason: there every token sees the later ones, which a token computed before
them never did.
"""

from __future__ import annotations

from lowerlm.ir.abi import CACHE_LEN, SEQ, short_path
from lowerlm.ir.errors import PassError
from lowerlm.ir.graph import Graph, GraphBuilder, Node
from lowerlm.ir.opdefs import OPDEFS, Trait
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import free_symbols, sym
from lowerlm.ir.types import TensorType
from lowerlm.passes.pattern import Pass

_REDUCE = {Op.MEAN: "dims", Op.SUM: "dims", Op.SOFTMAX: "dim", Op.ARGMAX: "dim", Op.TOPK: "dim", Op.SORT: "dim"}
_ALONG = (Op.SLICE, Op.SPLIT, Op.GATHER, Op.SCATTER, Op.CONCAT)


def _seq(dim) -> bool:
    return SEQ in free_symbols((dim,))


def _axes(node: Node, attr: str, rank: int) -> list:
    v = node.attr(attr)
    return [a % rank for a in (v if isinstance(v, (list, tuple)) else [v])]


def _mixes(g: Graph, node: Node) -> str | None:
    """Why ``node`` combines values of different tokens, or None."""
    if Trait.MIXES_TOKENS in OPDEFS[node.op].traits or not node.args:  # attention: mixing is what it declares
        return None
    x = g.type_of(node.args[0])
    if sum(_seq(d) for d in node.results[0].type.shape) > 1:
        return "its result is indexed by two sequence axes"
    if node.op in _REDUCE and any(_seq(x.shape[a]) for a in _axes(node, _REDUCE[node.op], x.rank)):
        return f"{node.op.value} over the sequence axis"
    if node.op in (Op.MATMUL, Op.LINEAR) and x.rank and _seq(x.shape[-1]):
        return "a product contracting the sequence axis"
    if node.op in _ALONG and any(_seq(x.shape[a]) for a in _axes(node, "dim", x.rank)):
        return f"{node.op.value} along the sequence axis"
    return None


def sequence_mixers(g: Graph) -> list:
    """(node, why) for every node that mixes tokens outside attention."""
    return [(n, why) for n in g.nodes if (why := _mixes(g, n)) is not None]


@Pass
def insert_kv_cache(g: Graph) -> tuple:
    """Give every attention a key and a value cache."""
    mixers = sequence_mixers(g)
    if mixers:
        node, why = mixers[0]
        where = f" in module '{node.source[0]}'" if node.source else ""
        raise PassError(f"'{node.op.value}'{where} mixes tokens outside an attention op ({why}): decoding one token "
                        "at a time against a KV cache would compute something else. Write attention with "
                        "F.scaled_dot_product_attention, or capture the block as one op; compile_model(model, "
                        "passes=['canonicalize']) gives logits without generation")
    bidirectional = [n for n in g.nodes if n.op is Op.ATTENTION and not n.attr("causal")]
    if bidirectional:
        node = bidirectional[0]
        where = f" in module '{node.source[0]}'" if node.source else ""
        raise PassError(f"'attention'{where} is not causal (every token sees the later ones): decoding one token at "
                        "a time against a KV cache would compute something else. Give the model a causal mask "
                        "(F.scaled_dot_product_attention(..., is_causal=True)); compile_model(model, "
                        "passes=['canonicalize']) gives logits without generation")
    if not any(n.op is Op.ATTENTION for n in g.nodes):
        return g, 0
    b = GraphBuilder.rebuild(g)
    finals = []
    for node in g.nodes:
        if node.op is not Op.ATTENTION:
            b.append(node)
            continue
        q, k, v, positions, seq_lens, sinks = node.inputs
        hq, hk = node.attr("heads")
        kt, vt = b.types[k], b.types[v]
        batch = kt.shape[0]
        owner = node.source[0] if node.source else ""
        caches = []
        for which, t in (("k", kt), ("v", vt)):
            spec = TensorType(t.dtype, (batch, hk, sym(CACHE_LEN), t.shape[2] // hk))
            # the builder turns what a value name cannot hold into '_' (a module path may hold any character)
            hint = f"{short_path(owner, '.self_attn')}.{which}cache" if owner \
                else f"{which}cache"
            caches.append(b.add_state(hint, spec, owner))
        kc, vc = (b.add(Op.KV_CACHE_WRITE, [c, x, positions], name=c + "1", source=node.source)
                  for c, x in zip(caches, (k, v)))
        attrs = {a: node.attrs[a] for a in ("scale", "causal", "window", "softcap") if a in node.attrs}
        b.release(node.result_names)  # the cached attention takes the attention's name
        b.add(Op.CACHED_ATTENTION, [q, kc, vc, positions, seq_lens, sinks], attrs, source=node.source,
              names=node.result_names)
        finals += [kc, vc]
    return b.build(g.outputs, list(g.state_outputs) + finals), len(finals) // 2
