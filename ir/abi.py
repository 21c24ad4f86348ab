"""The graph interface, defined once: the names every stage agrees on.

The frontend makes a ``forward`` graph over ``input_ids``, ``positions`` and ``seq_lens`` with the batch and sequence
symbols ``B`` and ``S``; ``insert_state`` adds caches over the cache length ``T``; ``specialize`` turns ``forward``
into ``prefill`` and ``decode``; ``select_logits`` gives ``prefill`` the input ``logit_index``; backends and the
runtime call the graphs and bind the inputs by these names. Code names them through this module, never as loose
strings. No torch here: ``ir`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lowerlm.ir.ops import Op

if TYPE_CHECKING:
    from lowerlm.ir.graph import Node

# ---- graph names ------------------------------------------------------------------------------------------------
FORWARD = "forward"  # the imported graph: the whole sequence, no state
PREFILL = "prefill"  # specialize's copy of forward with S free: the prompt into the cache
DECODE = "decode"  # specialize's copy of forward with S = 1: one token per sequence

# ---- interface inputs -------------------------------------------------------------------------------------------
INPUT_IDS = "input_ids"  # i64[B, S] token ids
POSITIONS = "positions"  # i64[B, S] each token's position (after insert_state: the cache slot it writes)
SEQ_LENS = "seq_lens"  # i32[B] valid tokens per sequence (after insert_state: in its cache after the call)
LOGIT_INDEX = "logit_index"  # i64[B, L] the rows whose logits prefill computes (added by select_logits)
INTERFACE = (INPUT_IDS, POSITIONS, SEQ_LENS)  # the frontend's graph inputs, in order

# ---- shape symbols ----------------------------------------------------------------------------------------------
BATCH = "B"  # sequences per call, bound by the frontend (the runtime fixes it to max_batch for state)
SEQ = "S"  # tokens per sequence in a call, bound by the frontend (specialize binds it to 1 in decode)
CACHE_LEN = "T"  # the cache length, introduced by insert_state (the runtime binds it to max_seq_len)
LOGIT_ROWS = "L"  # logit rows per sequence, introduced by select_logits (L1, L2, … if L is taken)

# ---- activations ------------------------------------------------------------------------------------------------
SILU = "silu"  # x·sigmoid(x)
GELU = "gelu"  # exact GeLU (erf)
GELU_TANH = "gelu_tanh"  # GeLU's tanh approximation
ACTS = (SILU, GELU, GELU_TANH)  # the ``act`` values of swiglu, rms_norm_linear, arm_mlp, moe, grouped_gemm


def activation_of(node: Node) -> str | None:
    """The ``ACTS`` name of an activation node: ``silu`` → "silu", ``gelu`` → "gelu" or, with
    ``approximate=tanh``, "gelu_tanh"; None for any other node."""
    if node.op is Op.SILU:
        return SILU
    if node.op is Op.GELU:
        return GELU_TANH if node.attr("approximate") == "tanh" else GELU
    return None


# ---- module paths -----------------------------------------------------------------------------------------------
def short_path(path: str, drop: str = "") -> str:
    """A module path shortened for a value or state name hint: every ``model.layers.`` becomes ``L`` and every
    ``drop`` goes: ``short_path("model.layers.3.self_attn", ".self_attn")`` is ``"L3"``."""
    path = path.replace("model.layers.", "L")
    return path.replace(drop, "") if drop else path
