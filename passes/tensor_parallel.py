"""tensor_parallel: rank r's shard of a graph for tensor parallelism over N ranks (Megatron's layout).

    attention  q/k/v linear: their rows by head (column-parallel; rank r keeps heads r*H/N .. (r+1)*H/N - 1 of the
               queries and of the kv heads, so each rank holds whole GQA groups), the ops between them and the
               attention on H/N heads, o_proj: its columns (row-parallel), then ``allreduce`` of the partial sums
               and o_proj's bias after it
    gated MLP  gate and up linear: their rows (column-parallel), down: its columns, then ``allreduce`` (+ bias)
    experts    tensor-parallel: units r*I/N .. of every expert (the same rows of gate_up's gate half and of its up
               half, those columns of down), the router replicated; a ``moe`` block's shared expert likewise
    MLA        by head: the rows of q's projection and of kv_b's weight for the rank's heads, o_proj's columns;
               the latent (c, k_pe) and its cache replicated
    lm_head    vocab-parallel: its rows r*V/N .. (a graph output made by a linear), then ``allgather``

Weights become ``weight slice[axis,start,end](param ...)`` expressions, so a rank evaluates only its shard. Then
the reductions move down past reshapes and products with a replicated value, and two of them added become one:
routed and shared experts are reduced once, and each reduction meets the residual add that fuse_allreduce_norm
joins to the next norm.

Experts are split by unit, not placed whole on ranks (expert parallelism): every rank then routes alike and holds
the same share of every expert, so a decode step's top-k experts load all ranks evenly (with experts by rank, one
token's k experts often sit on one rank while the others wait) and the result is one sum, with no exchange of
tokens; the experts' down bias, inside the routing-weighted sum, is added by rank 0 alone.

Every other value stays replicated: the embedding (a decode step reads one row of it; splitting it would cost a
reduction for no saved read), the norms, routers, KDA layers, any block whose form is not recognised
(computed whole on every rank: correct, only not split). An attention whose query or kv heads do not divide by N is
replicated and only its MLP is sharded (SmolLM2: 9 heads and 3 kv heads at N = 2): splitting GQA groups unevenly
would leave ranks with different shapes and the slowest rank setting the pace (docs/passes.md gives the numbers).

A recognised attention: each of q, k, v comes from a bias-optional ``linear`` through ``reshape`` (to or from
[..., heads, head_dim]), per-head ``rms_norm`` (Qwen3's q/k norms), ``rope`` and ``cast`` only; its result reaches
o_proj through reshapes only; an attention with sinks is replicated. A recognised MLP: ``linear(mul(act(linear(x, Wg)),
linear(x, Wu)), Wd)`` with act an element-wise unary op. Only weights (params and weight expressions) are sliced:
a projection whose weight is computed at run time stays whole. Runs after canonicalize, raise_moe_route and raise_mla
(the experts and MLA ops it splits are raised), before the passes that fuse projections (their concatenated weights
would mix shards).
"""

from __future__ import annotations

from lowerlm.ir.errors import PassError
from lowerlm.ir.graph import Graph, Node, infer_types
from lowerlm.ir.ops import UNARY, Op
from lowerlm.ir.types import Value
from lowerlm.ir.weights import Concat, Param, Slice
from lowerlm.passes.canonicalize import dce
from lowerlm.passes.pattern import Pass, Pat, merge_sources, rewrite, single_use

_HEAD_OPS = (Op.RESHAPE, Op.RMS_NORM, Op.ROPE, Op.CAST)


class _Plan:
    """What to change: weights to slice, nodes on H/N heads, partial linears."""

    def __init__(self):
        self.slices: dict = {}  # (node's name, input slot of a weight or bias) -> (axis, ((start, end), ...))
        self.dropped: set = set()  # (node's name, input slot): a bias only rank 0 adds (inside a partial sum)
        self.heads: set = set()  # names of the nodes on H/N heads (attention, rope, reshapes on the head path)
        self.partial: set = set()  # names of the nodes whose result is this rank's part of a sum
        self.gathered: set = set()  # names of the lm_heads computing this rank's slice of the vocabulary


def _maps(g: Graph):
    producer = {r.name: n for n in g.nodes for r in n.results}
    users: dict = {}
    for n in g.nodes:
        for v in n.inputs:
            if v is not None:
                users.setdefault(v, []).append(n)
    return producer, users


def _only_user(users, v: str):
    us = users.get(v, [])
    return us[0] if len(us) == 1 else None


def _head_path(producer, v: str, path: list):
    """The linear at the top of q, k or v's head path (appending the head ops passed), or None."""
    while True:
        n = producer.get(v)
        if n is None:
            return None
        if n.op is Op.LINEAR:
            return n if n.inputs[3] is None else None
        if n.op not in _HEAD_OPS or (n.op is Op.RMS_NORM and n.results[0].type.rank < 4):
            return None  # a norm over all heads at once (not per head) would change with the shard
        path.append(n)
        v = n.inputs[[r.name for r in n.results].index(v)] if n.op is Op.ROPE else n.inputs[0]


def _plan_attention(producer, users, a: Node, rank: int, world: int, plan: _Plan) -> bool:
    hq, hk = a.attr("heads")
    if hq % world or hk % world or a.inputs[5] is not None:  # sinks (one logit per head) stay whole: replicated
        return False
    q, k, v = a.inputs[:3]
    path: list = []
    lins = [_head_path(producer, x, path) for x in (q, k, v)]
    if any(lin is None for lin in lins) or len({id(n) for n in lins}) != 3:
        return False
    o, reshapes = _out_proj(producer, users, a)
    if o is None or not all(_weights_of(producer, lin) for lin in lins):
        return False
    region = {id(n) for n in path + lins + [a]}
    if not all(id(u) in region for n in path + lins for r in n.results for u in users.get(r.name, [])):
        return False  # a sharded value read outside the attention: keep it whole
    for lin in lins:
        rows = lin.results[0].type.shape[-1]
        per = rows // world
        plan.slices[(lin.name, 1)] = (0, (_shard(rank, per),))
        if lin.inputs[2] is not None:
            plan.slices[(lin.name, 2)] = (0, (_shard(rank, per),))
    _row_parallel(producer, o, rank, world, plan)
    plan.heads.update(n.name for n in path + [a] + reshapes)
    return True


def _out_proj(producer, users, a: Node) -> tuple:
    """(o_proj, the reshapes before it): the linear an attention's result reaches through reshapes alone, or
    (None, ...) when it reaches anything else."""
    reshapes = []
    o = _only_user(users, a.results[0].name)
    while o is not None and o.op is Op.RESHAPE:
        reshapes.append(o)
        o = _only_user(users, o.results[0].name)
    if o is None or o.op is not Op.LINEAR or o.inputs[3] is not None or not _weights_of(producer, o):
        return None, reshapes
    return o, reshapes


def _row_parallel(producer, o: Node, rank: int, world: int, plan: _Plan) -> None:
    """o's columns of this rank's heads, its result a partial sum (its bias added after the reduction)."""
    per = producer[o.inputs[1]].results[0].type.shape[1] // world
    plan.slices[(o.name, 1)] = (1, (_shard(rank, per),))
    plan.partial.add(o.name)


def _plan_mla(producer, users, a: Node, rank: int, world: int, plan: _Plan) -> bool:
    """Multi-head latent attention by head: q's projection (q_proj, or q_b_proj after the q LoRA) and kv_b's weight
    keep the rows of this rank's heads, o_proj their columns; the latent c and k_pe (one per token, shared by
    every head) stay replicated, as does the cache of them."""
    heads = a.attr("heads")
    lin = producer.get(a.inputs[0])
    if heads % world or lin is None or lin.op is not Op.LINEAR or lin.inputs[3] is not None or \
            not _weights_of(producer, lin) or not _is_weight(producer, a.inputs[3]) or \
            _only_user(users, a.inputs[0]) is not a:
        return False
    o, reshapes = _out_proj(producer, users, a)
    if o is None:
        return False
    rows = lin.results[0].type.shape[-1] // world
    plan.slices[(lin.name, 1)] = (0, (_shard(rank, rows),))
    if lin.inputs[2] is not None:
        plan.slices[(lin.name, 2)] = (0, (_shard(rank, rows),))
    plan.slices[(a.name, 3)] = (0, (_shard(rank, producer[a.inputs[3]].results[0].type.shape[0] // world),))
    _row_parallel(producer, o, rank, world, plan)
    plan.heads.update(n.name for n in [a] + reshapes)
    return True


def _plan_mlp(producer, users, down: Node, rank: int, world: int, plan: _Plan) -> bool:
    mul = producer.get(down.inputs[0])
    if mul is None or mul.op is not Op.MUL or down.inputs[3] is not None:
        return False
    a, b = (producer.get(x) for x in mul.inputs[:2])
    for act, up in ((a, b), (b, a)):
        if act is None or up is None or act.op not in UNARY or up.op is not Op.LINEAR:
            continue
        gate = producer.get(act.inputs[0])
        if gate is None or gate.op is not Op.LINEAR or gate.inputs[0] != up.inputs[0] or \
                gate.results[0].type != up.results[0].type or gate.inputs[3] is not None or up.inputs[3] is not None:
            continue
        inter = gate.results[0].type.shape[-1]
        if not isinstance(inter, int) or inter % world or not all(map(_weights_of, [producer] * 3, (gate, up, down))) \
                or not all(
                _only_user(users, n.results[0].name) is want for n, want in ((gate, act), (act, mul), (up, mul),
                                                                             (mul, down))):
            return False  # a partial value read anywhere else: keep the MLP whole
        per = inter // world
        for lin in (gate, up):
            plan.slices[(lin.name, 1)] = (0, (_shard(rank, per),))
            if lin.inputs[2] is not None:
                plan.slices[(lin.name, 2)] = (0, (_shard(rank, per),))
        plan.slices[(down.name, 1)] = (1, (_shard(rank, per),))
        plan.partial.add(down.name)
        return True
    return False


def _plan_experts(producer, n: Node, rank: int, world: int, plan: _Plan) -> bool:
    """Experts (or a whole ``moe`` block) tensor-parallel: each expert's intermediate units split over the ranks
    (gate_up [E, 2I, H]: rows r*I/N.. of the gate half and the same of the up half; down [E, H, I]: those columns),
    so every rank runs each routed token through its slice of the token's experts, and the sum over the ranks is the
    experts' output. The router stays replicated (every rank routes alike); a ``moe`` block's shared expert is split
    like a gated MLP; the experts' down bias, inside the routing-weighted sum, is added by rank 0 alone."""
    slots = (3, 4, 5, 6, 7) if n.op is Op.MOE else (3, 4, 5, 6)
    if not all(n.inputs[i] is None or _is_weight(producer, n.inputs[i]) for i in slots):
        return False  # weights computed at run time: not sliced
    inter = producer[n.inputs[4]].results[0].type.shape[2]
    shared = producer[n.inputs[5]].results[0].type.shape[0] if n.op is Op.MOE and n.inputs[5] is not None else 0
    if not isinstance(inter, int) or not isinstance(shared, int) or inter % world or shared % world:
        return False
    lo, hi = _shard(rank, inter // world)
    halves = ((lo, hi), (inter + lo, inter + hi))
    plan.slices[(n.name, 3)] = (1, halves)
    plan.slices[(n.name, 4)] = (2, ((lo, hi),))
    if n.op is Op.EXPERTS:
        if n.inputs[5] is not None:
            plan.slices[(n.name, 5)] = (1, halves)
        if n.inputs[6] is not None and rank:
            plan.dropped.add((n.name, 6))
    elif n.inputs[5] is not None:
        part = (_shard(rank, shared // world),)
        plan.slices.update({(n.name, 5): (0, part), (n.name, 6): (0, part), (n.name, 7): (1, part)})
    plan.partial.add(n.name)
    return True


def _is_weight(producer, v: str) -> bool:
    n = producer.get(v)
    return n is not None and n.op in (Op.PARAM, Op.WEIGHT)


def _weights_of(producer, lin: Node) -> bool:
    """A linear whose weight and bias (if any) are weights, not values computed at run time: sliceable."""
    return all(v is None or _is_weight(producer, v) for v in lin.inputs[1:3])


def _plan_lm_head(producer, n: Node, rank: int, world: int, plan: _Plan) -> bool:
    """A graph output made by a linear (the lm_head): vocab-parallel, rank r computes the logits of its V/N rows of
    the weight, then ``allgather`` puts the slices side by side (every rank then samples from the same logits)."""
    vocab = n.results[0].type.shape[-1]
    if n.inputs[3] is not None or not _weights_of(producer, n) or not isinstance(vocab, int) or vocab % world:
        return False
    part = (_shard(rank, vocab // world),)
    plan.slices[(n.name, 1)] = (0, part)
    if n.inputs[2] is not None:
        plan.slices[(n.name, 2)] = (0, part)
    plan.gathered.add(n.name)
    return True


def _shard(rank: int, per: int) -> tuple:
    return rank * per, (rank + 1) * per


def _reshape(n: Node, in_type, world: int) -> list:
    """A head-path reshape's new shape: [.., H, D] -> [.., H/N, D], or [.., H*D] -> [.., H*D/N]."""
    shape = list(n.attr("shape"))
    if len(shape) >= 2 and in_type.rank == len(shape) - 1:  # a split of the last dim into heads x head_dim
        shape[-2] = shape[-2] // world
    elif in_type.rank == len(shape) + 1:  # a merge of heads x head_dim
        shape[-1] = shape[-1] // world
    elif in_type.rank == len(shape):  # same rank: the heads dim is the one that changed
        shape = list(in_type.shape)
    else:
        raise PassError(f"tensor_parallel: cannot shard the reshape '{n.name}' on a head path")
    return shape


def tensor_parallel(rank: int, world: int) -> Pass:
    """The pass making ``rank``'s shard of each graph for ``world`` ranks."""
    if world < 1 or not 0 <= rank < world:
        raise PassError(f"tensor_parallel: rank {rank} of {world} ranks")

    @Pass
    def tensor_parallel_pass(g: Graph) -> tuple:
        if world == 1:
            return g, 0
        producer, users = _maps(g)
        plan = _Plan()
        count = 0
        for n in g.nodes:
            if n.op is Op.ATTENTION:
                count += _plan_attention(producer, users, n, rank, world, plan)
            elif n.op is Op.MLA_ATTENTION:
                count += _plan_mla(producer, users, n, rank, world, plan)
            elif n.op is Op.LINEAR and (n.name, 1) in plan.slices:
                continue  # an o_proj, already planned with its attention
            elif n.op is Op.LINEAR and n.results[0].name in g.outputs:
                count += _plan_lm_head(producer, n, rank, world, plan)
            elif n.op is Op.LINEAR:
                count += _plan_mlp(producer, users, n, rank, world, plan)
            elif n.op in (Op.EXPERTS, Op.MOE):
                count += _plan_experts(producer, n, rank, world, plan)
        if not count:
            return g, 0
        g = dce(_apply(g, plan, producer, world))[0]
        return rewrite(g, SINK_RULES, name="tensor_parallel")[0], count

    return tensor_parallel_pass


def _apply(g: Graph, plan: _Plan, producer: dict, world: int) -> Graph:
    types = {v.name: v.type for v in g.inputs} | {s.name: s.type for s in g.state}
    nodes: list = []
    taken = {r.name for n in g.nodes for r in n.results} | set(types)

    def fresh(hint: str) -> str:
        i, name = 1, hint
        while name in taken:
            i, name = i + 1, f"{hint}{i}"
        taken.add(name)
        return name

    def add(op, inputs, attrs, names, source):
        result_types = infer_types(op, [types[x] if x is not None else None for x in inputs], attrs)
        node = Node.make(op, inputs, [Value(nm, t) for nm, t in zip(names, result_types)], attrs, source)
        nodes.append(node)
        types.update({r.name: r.type for r in node.results})
        return node

    for n in g.nodes:
        if n.op in (Op.PARAM, Op.WEIGHT):
            nodes.append(n)
            types[n.results[0].name] = n.results[0].type
            continue
        inputs = list(n.inputs)
        for slot, v in enumerate(n.inputs):
            if (n.name, slot) in plan.dropped:
                inputs[slot] = None
            cut = plan.slices.get((n.name, slot))
            if cut is None or v is None:
                continue
            src = producer[v]
            expr = Param(src.attrs["name"]) if src.op is Op.PARAM else src.attrs["expr"]
            t = src.results[0].type
            axis, ranges = cut
            pieces = tuple(Slice(expr, axis, start, end) for start, end in ranges)
            shape = list(t.shape)
            shape[axis] = sum(end - start for start, end in ranges)
            name = fresh(f"{v}.shard")
            w = Node.make(Op.WEIGHT, (), [Value(name, t.with_shape(tuple(shape)))],
                          {"expr": pieces[0] if len(pieces) == 1 else Concat(pieces, axis)}, src.source)
            nodes.append(w)
            types[name] = w.results[0].type
            inputs[slot] = name
        attrs = dict(n.attrs)
        if n.name in plan.heads and n.op in (Op.ATTENTION, Op.ROPE):
            attrs["heads"] = [h // world for h in n.attr("heads")]
        elif n.name in plan.heads and n.op is Op.MLA_ATTENTION:
            attrs["heads"] = n.attr("heads") // world
        elif n.name in plan.heads and n.op is Op.RESHAPE:
            attrs["shape"] = _reshape(n, types[inputs[0]], world)
        if n.name in plan.gathered:
            part = fresh(f"{n.name}.part")
            add(n.op, inputs, attrs, [part], n.source)
            add(Op.ALLGATHER, [part], {"world": world}, [n.results[0].name], n.source)
            continue
        if n.name in plan.partial:
            bias = n.inputs[2] if n.op is Op.LINEAR else None  # a linear's bias: added once, after the reduction
            if bias is not None:
                inputs[2] = None
            partial = fresh(f"{n.name}.partial")
            add(n.op, inputs, attrs, [partial], n.source)
            if bias is None:
                add(Op.ALLREDUCE, [partial], {"world": world}, [n.name], n.source)
            else:
                summed = fresh(f"{n.name}.sum")
                add(Op.ALLREDUCE, [partial], {"world": world}, [summed], n.source)
                add(Op.ADD, [summed, bias], {}, [n.name], n.source)
            continue
        add(n.op, inputs, attrs, [r.name for r in n.results], n.source)
    return Graph(g.name, g.inputs, g.state, tuple(nodes), g.outputs, g.state_outputs)


# ---- reductions moved down: past views and scalings, two of them added become one ---------------------------------
def _sink_unary(ctx, root, ar):
    """reshape(allreduce(p)) -> allreduce(reshape(p)), and mul by a replicated value alike (a product is linear in
    each factor): the reduction moves towards the residual add it can fuse with, or another reduction."""
    if (root.op is Op.MUL and root.results[0].type != ctx.type_of(ar.name)) or not ctx.replace(ar):
        return None  # a product broadcast beyond the reduced value: reducing after it would move more data
    moved = ctx.add(root.op, [ar.args[0] if x == ar.name else x for x in root.inputs], root.attrs,
                    name=f"{root.name}.partial")
    return ctx.add(Op.ALLREDUCE, [moved], ar.attrs, names=[root.name], source=ar.source)


def _sink_add(ctx, root, a, b):
    """add(allreduce(p), allreduce(q)) -> allreduce(add(p, q)): routed and shared experts, one reduction."""
    p, q = a.args[0], b.args[0]
    if not ctx.type_of(p) == ctx.type_of(q) == root.results[0].type or not ctx.replace(a, b):
        return None
    summed = ctx.add(Op.ADD, [p, q], name=f"{root.name}.partial")
    return ctx.add(Op.ALLREDUCE, [summed], a.attrs, names=[root.name], source=merge_sources(a, b))


_ONE_READER = Pat(Op.ALLREDUCE, name="ar", where=single_use)
SINK_RULES = [(Pat(Op.RESHAPE, (_ONE_READER,), name="root"), _sink_unary),
              (Pat(Op.MUL, (_ONE_READER, Pat()), commutative=True, name="root"), _sink_unary),
              (Pat(Op.ADD, (Pat(Op.ALLREDUCE, name="a", where=single_use),
                            Pat(Op.ALLREDUCE, name="b", where=single_use)), name="root"), _sink_add)]


# ---- fuse_allreduce_norm ------------------------------------------------------------------------------------------
def _fused(ctx, root, add, ar, other, w):
    """rms_norm(add(allreduce(p), r)) -> allreduce_add_rms_norm(p, r): the norm's result and the new residual
    stream (the add's name, for its other readers)."""
    if ctx.type_of(other) != ctx.type_of(ar.name) or not ctx.replace(add, ar):
        return None
    normed, _ = ctx.add(Op.ALLREDUCE_ADD_RMS_NORM, [ar.args[0], other, w],
                        {"world": ar.attr("world"), "eps": root.attr("eps")}, names=[root.name, add.name],
                        source=merge_sources(ar, add, root))
    return normed


_REDUCED = Pat(Op.ALLREDUCE, name="ar", where=single_use)
FUSE_RULES = [(Pat(Op.RMS_NORM, (Pat(Op.ADD, (_REDUCED, Pat(name="other")), commutative=True, name="add"),
                                 Pat(name="w")), name="root"), _fused)]


@Pass
def fuse_allreduce_norm(g: Graph) -> tuple:
    """allreduce -> residual add -> rms_norm becomes one allreduce_add_rms_norm (the reduction, the add and the next
    layer's norm in one op, as serving engines fuse them)."""
    g, n = rewrite(g, FUSE_RULES, name="fuse_allreduce_norm")
    return (dce(g)[0] if n else g), n
