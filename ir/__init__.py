"""lowerlm's IR: a typed SSA graph with declared, linear state; text printer and parser; verifier.

Importing it pulls in neither torch nor transformers: torch is imported lazily by the few functions that compute.
"""

from lowerlm.ir.dtypes import DType
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
from lowerlm.ir.graph import Attrs, Graph, GraphBuilder, Module, Node, infer_types
from lowerlm.ir.opdefs import OPDEFS, AttrKind, AttrSpec, InputSpec, OpDef
from lowerlm.ir.ops import BINARY, ELEMENTWISE, LEAF, REDUCE, UNARY, VIEW, Op
from lowerlm.ir.parser import parse_graph, parse_module, parse_type
from lowerlm.ir.printer import print_graph, print_module, print_node
from lowerlm.ir.shapes import Sym, evaluate, parse_dim, sym
from lowerlm.ir.types import StateSpec, TensorType, Value
from lowerlm.ir.verifier import verify_graph, verify_module

__all__ = [
    "Attrs", "AttrKind", "AttrSpec", "BINARY", "CompileError", "DType", "ELEMENTWISE", "Graph", "GraphBuilder",
    "InputError", "InputSpec", "LEAF", "LowerlmError", "ModelFileError", "Module", "Node", "OPDEFS", "Op", "OpDef",
    "ParseError", "PassError", "REDUCE", "ShapeError", "StateSpec", "Sym", "TensorType", "UNARY",
    "UnsupportedOpError", "VIEW", "Value", "VerifyError", "evaluate", "infer_types", "parse_dim", "parse_graph",
    "parse_module", "parse_type", "print_graph", "print_module", "print_node", "sym", "verify_graph",
    "verify_module",
]
