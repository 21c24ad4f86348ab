"""The error types every stage raises; defined in ``lowerlm.ir.errors`` so that ``ir/`` imports nothing of ours."""

from lowerlm.ir.errors import (
                               CompileError,
                               InputError,
                               LowerlmError,
                               ModelFileError,
                               ParseError,
                               PassError,
                               ShapeError,
                               UnsupportedOpError,
                               VerifyError,
)

__all__ = ["CompileError", "InputError", "LowerlmError", "ModelFileError", "ParseError", "PassError", "ShapeError",
           "UnsupportedOpError", "VerifyError"]
