"""insert_state: every op that reads earlier tokens becomes its stateful form over declared state.

Why: decoding one token at a time needs what the earlier tokens left behind. Each op whose row names a stateful
form (``OpDef.stateful``, ir/stateful.py) is asked for it: ``attention`` → ``kv_cache_write`` of k and v into two
``kv`` states ``[B, Hkv, T, D]`` (``T`` is the cache length, bound to ``max_seq_len`` by the runtime) +
``cached_attention`` over the new versions; ``short_conv`` → ``cached_short_conv`` over a ``recurrent`` state of
its last W-1 inputs; ``delta_rule`` → ``cached_delta_rule`` over a ``recurrent`` f32 ``[B, H, K, V]`` state. Each
state is owned by the op's module. The writes return new versions (functional, linear state). Semantics of the graph
inputs after this pass: ``positions`` are the cache slots the call writes (each token's absolute position),
``seq_lens`` the number of valid tokens in each sequence after the call -- for a prefill of a new sequence these
are exactly the values the pass's input took, so outputs are unchanged; tokens at or past ``seq_lens`` (right
padding) never enter recurrent state. The runtime zeroes ``recurrent`` state before each new sequence.
Runs after the fusions (they never touch these ops) and before specialize. Leaves graphs without such ops as they
are.

It refuses a graph that mixes tokens outside those ops (``sequence_mixers``): a reduction or softmax over the
sequence axis, a product contracting it, a value indexed by two sequence axes (pairwise scores), a slice, split,
gather or concat along it (token shifts). One token at a time against state computes something else there, so
generation would be silently wrong. The check reads shapes, so it sees the common forms, not every conceivable one
(a sequence axis first merged into another and then reduced over part of it would pass). It refuses an attention
without a causal mask for the same reason: there every token sees the later ones, which a token computed before
them never did.
"""

from __future__ import annotations

from lowerlm.ir.abi import POSITIONS, SEQ, SEQ_LENS
from lowerlm.ir.errors import PassError
from lowerlm.ir.graph import Graph, GraphBuilder, Node
from lowerlm.ir.opdefs import OPDEFS, Trait
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import free_symbols
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


def _interface(g: Graph, name: str, node: Node) -> str:
    if not any(v.name == name for v in g.inputs):
        where = f" in module '{node.source[0]}'" if node.source else ""
        raise PassError(f"'{node.op.value}'{where} needs the graph input %{name} to run against state; import the "
                        "model with lowerlm's frontend (its graphs take input_ids, positions and seq_lens)")
    return name


@Pass
def insert_state(g: Graph) -> tuple:
    """Give every op that reads earlier tokens its state (KV caches, recurrent state)."""
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
    stateful = [n for n in g.nodes if OPDEFS[n.op].stateful is not None]
    if not stateful:
        return g, 0
    b = GraphBuilder.rebuild(g)
    finals = []
    for node in g.nodes:
        form = OPDEFS[node.op].stateful
        if form is None:
            b.append(node)
            continue
        finals += form(b, node, _interface(g, POSITIONS, node), _interface(g, SEQ_LENS, node))
    return b.build(g.outputs, list(g.state_outputs) + finals), len(stateful)
