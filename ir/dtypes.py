"""Element types of IR values and their text names (``f32``, ``bf16``, ``i64``, …)."""

from __future__ import annotations

import enum


class DType(enum.Enum):
    F64 = "f64"
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    I64 = "i64"
    I32 = "i32"
    I16 = "i16"
    I8 = "i8"
    U8 = "u8"
    BOOL = "bool"

    def __str__(self) -> str:
        return self.value

    @property
    def is_float(self) -> bool:
        return self in FLOAT_DTYPES

    @property
    def is_int(self) -> bool:
        return self in INT_DTYPES

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    def to_torch(self):
        import torch

        return getattr(torch, _TORCH_NAME[self])

    @staticmethod
    def from_torch(dtype) -> DType:
        name = str(dtype).removeprefix("torch.")
        for d, n in _TORCH_NAME.items():
            if n == name:
                return d
        raise ValueError(f"torch dtype {dtype} has no IR dtype")

    @staticmethod
    def parse(text: str) -> DType:
        try:
            return DType(text)
        except ValueError:
            raise ValueError(f"unknown dtype '{text}' (expected one of {', '.join(d.value for d in DType)})") from None


FLOAT_DTYPES = frozenset({DType.F64, DType.F32, DType.F16, DType.BF16})
INT_DTYPES = frozenset({DType.I64, DType.I32, DType.I16, DType.I8, DType.U8})
_ITEMSIZE = {DType.F64: 8, DType.F32: 4, DType.F16: 2, DType.BF16: 2, DType.I64: 8, DType.I32: 4,
             DType.I16: 2, DType.I8: 1, DType.U8: 1, DType.BOOL: 1}
_TORCH_NAME = {DType.F64: "float64", DType.F32: "float32", DType.F16: "float16", DType.BF16: "bfloat16",
               DType.I64: "int64", DType.I32: "int32", DType.I16: "int16", DType.I8: "int8", DType.U8: "uint8",
               DType.BOOL: "bool"}
