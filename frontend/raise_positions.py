"""Raise a plain module's learned position embedding: ``embedding(W, arange(S))`` (or ``W[arange(S)]``,
``W.index_select(0, arange(S))``; the arange maybe seen as [1, S], expanded over the batch, offset by integers) →
``embedding(W, positions [+ offset])``.

A plain ``nn.Module`` that takes no ``position_ids`` numbers its tokens itself, ``torch.arange(seq_len)``. That is
right for a call that holds the whole sequence and wrong for a decode step, whose one token sits at its cache
position: so the row lookup reads the graph's ``positions`` input instead (equal to the arange in a prefill from
position 0, the only call the model's own code describes). The lookup then yields ``[B, S, D]`` rather than
``[S, D]``, so it is raised only where every user is an element-wise op with a ``[B, S, D]`` result (the add to
the token embeddings), which broadcasting gives the same value. Any other ``arange`` over the sequence length is
refused by the importer (frontend/aten.py): the error names it and its module.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lowerlm.frontend.fx import kwargs_of
from lowerlm.frontend.importer import Raised
from lowerlm.ir.abi import INPUT_IDS
from lowerlm.ir.ops import Op

aten = torch.ops.aten
_ARANGE = (aten.arange.default, aten.arange.start, aten.arange.start_step)
_ELEMENTWISE = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor)
_IDENTITY = (aten.detach.default, aten.clone.default, aten.alias.default)


def _is_sequence_arange(imp, node) -> bool:
    """``arange(S)`` (or ``arange(0, S, 1)``) of int64 where S is the input ids' length."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ARANGE):
        return False
    kw = kwargs_of(node)
    start, end, step = kw.get("start", 0), kw["end"], kw.get("step", 1)
    seq = imp.user_inputs[INPUT_IDS].meta["val"].shape[1]
    end_val = end.meta.get("val") if isinstance(end, fx.Node) else end
    val = node.meta["val"]
    return start == 0 and step == 1 and val.dtype == torch.int64 and str(end_val) == str(seq)


def _sequence_offset(imp, node) -> int | None:
    """c when ``node`` is ``arange(S)`` plus integers (c in all: BART and TrOCR count from padding_idx + 1, the
    cache position adds 0), seen as [1, S] or expanded over the batch; else None."""
    offset, batch = 0, str(imp.user_inputs[INPUT_IDS].meta["val"].shape[0])
    while isinstance(node, fx.Node) and node.op == "call_function":
        shape = node.meta["val"].shape
        if node.target is aten.add.Tensor and isinstance(node.args[1], int) and not isinstance(node.args[1], bool) \
                and kwargs_of(node).get("alpha", 1) == 1:
            offset += node.args[1]
        elif node.target is aten.unsqueeze.default and node.args[1] == 0 or \
                node.target is aten.expand.default and len(shape) == 2 and str(shape[0]) == batch or \
                node.target is aten.repeat.default and list(node.args[1])[1:] == [1] and str(shape[0]) == batch or \
                node.target is aten.view.default and len(shape) == 1:
            pass  # [S] seen as [1, S] or [B, S] (the positions input's rows, each equal to the arange), or as [S]
        else:
            break
        node = node.args[0]
    return offset if _is_sequence_arange(imp, node) else None


def raise_positions(imp) -> dict:
    """Position-embedding lookups by ``arange(S)``, keyed by their embedding node."""
    if imp.positions_node is not None:  # the model takes position_ids: its positions are already the input
        return {}
    ids = imp.user_inputs[INPUT_IDS].meta["val"].shape
    out = {}
    for node in imp.graph.nodes:
        table, index = _lookup(node)
        offset = _sequence_offset(imp, index) if table is not None else None
        if offset is None:
            continue
        while len(users := _users(node)) == 1 and users[0].target in _IDENTITY:  # MusicGen detaches its table's rows
            node = users[0]
        wide = tuple(str(d) for d in ids) + (str(node.meta["val"].shape[-1]),)
        if not users or not all(u.op == "call_function" and u.target in _ELEMENTWISE
                                and tuple(str(d) for d in u.meta["val"].shape) == wide for u in users):
            continue

        def build(imp, node=node, w=table, offset=offset):
            rows = imp.positions if not offset else imp.emit(
                node, Op.ADD, [imp.positions, imp.constant(offset, imp.b.types[imp.positions].dtype)])
            return imp.emit(node, Op.EMBEDDING, [imp.value(w), rows])

        out[node] = Raised([table], build, "position_embedding")
    return out


def _users(node) -> list:
    return [u for u in node.users if not str(u.target).startswith("aten._assert")]  # checks compute nothing


def _lookup(node) -> tuple:
    """(table, row indices) of a row lookup -- ``embedding(W, i)``, ``W[i]`` or ``W.index_select(0, i)`` of a 2-D
    ``W`` -- else (None, None)."""
    if node.op != "call_function" or node.target not in (aten.embedding.default, aten.index.Tensor,
                                                         aten.index_select.default):
        return None, None
    kw = kwargs_of(node)
    if node.target is aten.embedding.default:
        return kw["weight"], kw["indices"]
    table = kw["self"]
    if not isinstance(table, fx.Node) or table.meta["val"].dim() != 2:
        return None, None
    if node.target is aten.index.Tensor:
        return (table, kw["indices"][0]) if len(kw["indices"]) == 1 else (None, None)
    return (table, kw["index"]) if kw["dim"] == 0 else (None, None)
