"""Tensor types, SSA values and state specifications."""

from __future__ import annotations

from dataclasses import dataclass

from lowerlm.ir.dtypes import DType
from lowerlm.ir.shapes import free_symbols, numel, shape_str


@dataclass(frozen=True)
class TensorType:
    """dtype and shape; dims are ints or ``Sym`` polynomials. Printed ``f32[B,S,576]``."""

    dtype: DType
    shape: tuple

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self):
        return numel(self.shape)

    @property
    def symbols(self) -> frozenset:
        return free_symbols(self.shape)

    def with_shape(self, shape) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: DType) -> TensorType:
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}{shape_str(self.shape)}"


@dataclass(frozen=True)
class Value:
    """A named SSA value: a graph input or a node result."""

    name: str
    type: TensorType


KV = "kv"  # indexed by position (a KV cache): slots past a sequence's length are never read, so it is kept
RECURRENT = "recurrent"  # a running summary of every token so far (conv and delta-rule state): zeroed per sequence
STATE_KINDS = (KV, RECURRENT)  # room for "paged" later


@dataclass(frozen=True)
class StateSpec:
    """Declared per-layer state: the graph takes version 0 as ``name`` and returns its final version. ``owner`` is
    the nn.Module path of the layer that owns it; ``kind`` (``STATE_KINDS``) says how the runtime treats it between
    sequences: a ``kv`` cache is indexed by position and needs no reset (a new sequence overwrites the slots it
    reads), a ``recurrent`` state summarises every earlier token and is zeroed before each new sequence."""

    name: str
    type: TensorType
    owner: str = ""
    kind: str = KV
