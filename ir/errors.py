"""Error types every stage of lowerlm raises (re-exported as ``lowerlm.errors``).

Each error names what was wrong, where (a module path, an op, a line of IR text) and, where the user can act,
what to do. The CLI turns any ``LowerlmError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class LowerlmError(Exception):
    """Base of every error lowerlm raises on purpose."""


class ParseError(LowerlmError):
    """IR text that does not follow the grammar; carries the line and column."""

    def __init__(self, message: str, line: int = 0, col: int = 0):
        self.line, self.col = line, col
        super().__init__(f"{line}:{col}: {message}" if line else message)


class VerifyError(LowerlmError):
    """A graph that breaks an invariant: arity, attributes, types, SSA order or state linearity."""

    def __init__(self, message: str, graph: str = "", node: str = ""):
        self.graph, self.node = graph, node
        where = "".join(f"{k} {v}: " for k, v in (("graph", graph), ("at", node)) if v)
        super().__init__(where + message)


class ShapeError(VerifyError):
    """Operand shapes or dtypes an op's result rule cannot accept."""


class UnsupportedOpError(LowerlmError):
    """An op (aten or model block) lowerlm has no IR equivalent for."""

    def __init__(self, op: str, module_path: str = "", hint: str = ""):
        self.op, self.module_path, self.hint = op, module_path, hint
        where = f" in module '{module_path}'" if module_path else ""
        super().__init__(f"unsupported op '{op}'{where}" + (f": {hint}" if hint else ""))


class PassError(LowerlmError):
    """A pass name that does not exist, or a pass that left an invalid graph."""


class CompileError(LowerlmError):
    """A backend that cannot lower a graph or a weight expression."""


class InputError(LowerlmError):
    """Bad user input at run time: wrong dtype, device, token id out of range, prompt too long."""


class ModelFileError(LowerlmError):
    """A missing or corrupt model file or cache entry."""
