"""select_logits: ``prefill`` computes logits only at the prompt rows its new input ``%logit_index`` [B, L] names.

Why: generation needs the logits of each prompt's last token, yet a prefill computed them at every position. For
Llama-3.2-1B at 2048 tokens the lm_head alone is about 1 TFLOP, a fifth of the prefill, and the [B, S, V] logits of
a batch of long prompts take gigabytes (8 × 2048 × 128256 f32 is 8.4 GB). The rows are gathered before the lm_head
(a row-wise norm and projection), so it runs on [B, L, H]: generation asks for ``seq_lens - 1`` (L = 1),
``cm(input_ids)`` for every row. Runs after specialize, on ``prefill`` only: decode's one row is already the last.
Does not fire on another graph, on a graph that already has the input, or when the graph's one output is not made
by a ``linear`` or ``rms_norm_linear`` (with no residual input) over [B, S, H]: there is no row-wise head to gather
before. A vocab-parallel lm_head's ``allgather`` (tensor parallelism) is looked through.
"""

from __future__ import annotations

from lowerlm.ir.abi import LOGIT_INDEX, LOGIT_ROWS, PREFILL, SEQ
from lowerlm.ir.dtypes import DType
from lowerlm.ir.graph import Graph, GraphBuilder
from lowerlm.ir.opdefs import OPDEFS
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import free_symbols, sym
from lowerlm.ir.types import TensorType, Value
from lowerlm.passes.pattern import Pass


def _head(g: Graph):
    """The lm_head node whose input rows can be gathered, or None."""
    if g.name != PREFILL or len(g.outputs) != 1 or any(v.name == LOGIT_INDEX for v in g.inputs):
        return None
    head = g.producer(g.outputs[0])
    if head is not None and head.op is Op.ALLGATHER:  # a vocab-parallel lm_head: its slices put side by side
        head = g.producer(head.inputs[0])
    if head is None or head.op not in (Op.LINEAR, Op.RMS_NORM_LINEAR) or len(head.results) != 1:
        return None
    if head.inputs[[s.name for s in OPDEFS[head.op].inputs].index("residual")] is not None:
        return None  # a residual [B, S, ...] read by the head (rare for an lm_head): left alone
    x = g.type_of(head.inputs[0])
    if x.rank != 3 or x.shape[1] != sym(SEQ):
        return None
    return head


def _fresh_symbol(g: Graph) -> str:
    taken = set()
    for t in g.types.values():
        taken |= free_symbols(t.shape)
    return next(s for s in (LOGIT_ROWS, *(f"{LOGIT_ROWS}{i}" for i in range(1, len(taken) + 2))) if s not in taken)


@Pass
def select_logits(g: Graph) -> tuple:
    """``prefill`` gathers the rows of ``%logit_index`` before its lm_head."""
    head = _head(g)
    if head is None:
        return g, 0
    x = head.inputs[0]
    b_dim, _, hidden = g.type_of(x).shape
    rows = sym(_fresh_symbol(g))
    b = GraphBuilder.rebuild(g)
    index = b.input(LOGIT_INDEX, TensorType(DType.I64, (b_dim, rows)))
    for n in g.nodes:
        if n.op is Op.ALLGATHER and n.inputs[0] == head.results[0].name:  # after the head: [B, L, V]
            out = n.results[0]
            b.append(n.with_(results=(Value(out.name, out.type.with_shape((b_dim, rows) + out.type.shape[2:])),)))
            continue
        if n is not head:
            b.append(n)
            continue
        col = b.add(Op.RESHAPE, [index], {"shape": (b_dim, rows, 1)}, name=f"{LOGIT_INDEX}.col", source=n.source)
        wide = b.add(Op.EXPAND, [col], {"shape": (b_dim, rows, hidden)}, name=f"{LOGIT_INDEX}.rows", source=n.source)
        picked = b.add(Op.GATHER, [x, wide], {"dim": 1}, name=f"{x}.picked", source=n.source)
        out = n.results[0]
        b.append(n.with_(inputs=(picked,) + n.inputs[1:],
                         results=(Value(out.name, out.type.with_shape((b_dim, rows) + out.type.shape[2:])),)))
    return b.build(g.outputs, g.state_outputs), 1
