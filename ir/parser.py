"""Reads the text form ``printer.py`` writes. Any malformed text raises ``ParseError`` with a line and column;
the parser builds nodes but does not check them (``verify`` does)."""

from __future__ import annotations

import json
import re

from lowerlm.ir.body import Apply
from lowerlm.ir.dtypes import DType
from lowerlm.ir.errors import ParseError, ShapeError
from lowerlm.ir.graph import Graph, Module, Node
from lowerlm.ir.opdefs import OPDEFS, AttrKind
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import Sym
from lowerlm.ir.types import KV, STATE_KINDS, StateSpec, TensorType, Value
from lowerlm.ir.weights import Cast, Concat, Data, Deinterleave, MatMul, Param, Scale, Slice, Transpose

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<comment>//[^\n]*)
  | (?P<source>\#[^\n]*)
  | (?P<value>%[A-Za-z0-9_.]+)
  | (?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<punct>//|[()\[\]{},:=@*+\-])
""", re.VERBOSE)

_MAX_DEPTH = 64
_JSON = json.JSONDecoder()


class _Tok:
    __slots__ = ("kind", "text", "line", "col")

    def __init__(self, kind, text, line, col):
        self.kind, self.text, self.line, self.col = kind, text, line, col


def _tokenize(text: str) -> list:
    toks, pos, line, line_start = [], 0, 1, 0
    at_line_start = True
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"unexpected character {text[pos]!r}", line, pos - line_start + 1)
        kind = m.lastgroup
        tok = m.group()
        if kind == "comment" and not at_line_start:
            kind, tok = "punct", "//"
            m_end = pos + 2
        else:
            m_end = m.end()
        if kind not in ("ws", "comment"):
            toks.append(_Tok(kind, tok, line, pos - line_start + 1))
            at_line_start = False
        if kind in ("ws", "comment", "source"):
            nl = text.count("\n", pos, m_end)
            if nl:
                line += nl
                line_start = text.rindex("\n", pos, m_end) + 1
                at_line_start = True
        pos = m_end
    toks.append(_Tok("end", "", line, pos - line_start + 1))
    return toks


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0

    # token helpers ------------------------------------------------------------------------------------------
    def peek(self, k: int = 0) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def error(self, msg: str, tok: _Tok | None = None) -> ParseError:
        tok = tok or self.peek()
        return ParseError(msg, tok.line, tok.col)

    def take(self) -> _Tok:
        tok = self.peek()
        self.i = min(self.i + 1, len(self.toks) - 1)
        return tok

    def at(self, text: str) -> bool:
        tok = self.peek()
        return tok.kind in ("punct", "ident") and tok.text == text

    def expect(self, text: str) -> _Tok:
        if not self.at(text):
            got = self.peek().text or "end of text"
            raise self.error(f"expected '{text}', got '{got}'")
        return self.take()

    def expect_kind(self, kind: str, what: str) -> _Tok:
        if self.peek().kind != kind:
            raise self.error(f"expected {what}, got '{self.peek().text or 'end of text'}'")
        return self.take()

    def value_name(self) -> str:
        return self.expect_kind("value", "a %value").text[1:]

    def string(self) -> str:
        tok = self.expect_kind("string", "a string")
        try:
            return json.loads(tok.text)
        except ValueError as e:
            raise self.error(f"bad string literal: {e}", tok) from None

    def nest(self):
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.error("nesting too deep")

    # module and graphs --------------------------------------------------------------------------------------
    def module(self) -> Module:
        params: list = []
        graphs: list = []
        if self.at("params"):
            self.take()
            self.expect("{")
            while not self.at("}"):
                name = self.string()
                self.expect(":")
                params.append((name, self.tensor_type()))
            self.expect("}")
        while self.peek().kind != "end":
            graphs.append(self.graph())
        return Module(tuple(graphs), tuple(params))

    def graph(self) -> Graph:
        self.expect("graph")
        name = self.expect_kind("ident", "a graph name").text
        self.expect("(")
        inputs = []
        while not self.at(")"):
            if inputs:
                self.expect(",")
            v = self.value_name()
            self.expect(":")
            inputs.append(Value(v, self.tensor_type()))
        self.expect(")")
        state = []
        if self.at("state"):
            self.take()
            self.expect("(")
            while not self.at(")"):
                if state:
                    self.expect(",")
                v = self.value_name()
                self.expect(":")
                t = self.tensor_type()
                kind = KV  # texts from before state kinds: every state was a KV cache
                if any(self.at(k) for k in STATE_KINDS):
                    kind = self.take().text
                owner = ""
                if self.at("@"):
                    self.take()
                    owner = self.string() if self.peek().kind == "string" else \
                        self.expect_kind("ident", "an owning module path").text
                state.append(StateSpec(v, t, owner, kind))
            self.expect(")")
        self.expect("{")
        nodes = []
        while not self.at("return"):
            if self.peek().kind == "end" or self.at("}"):
                raise self.error("expected 'return' before the end of the graph")
            nodes.append(self.node())
        self.take()
        outputs = self.value_list()
        state_outputs: list = []
        if self.at("state"):
            self.take()
            self.expect("(")
            state_outputs = self.value_list()
            self.expect(")")
        self.expect("}")
        return Graph(name, tuple(inputs), tuple(state), tuple(nodes), tuple(outputs), tuple(state_outputs))

    def value_list(self) -> list:
        out = []
        while self.peek().kind == "value":
            out.append(self.value_name())
            if not self.at(","):
                break
            self.take()
        return out

    # nodes --------------------------------------------------------------------------------------------------
    def node(self) -> Node:
        names = [self.value_name()]
        while self.at(","):
            self.take()
            names.append(self.value_name())
        self.expect("=")
        op_tok = self.expect_kind("ident", "an op name")
        try:
            op = Op(op_tok.text)
        except ValueError:
            raise self.error(f"unknown op '{op_tok.text}'", op_tok) from None
        inputs: list = []
        attrs: dict = {}
        if op is Op.PARAM and self.peek().kind == "string":
            attrs["name"] = self.string()
        elif op is Op.WEIGHT and not self.at("{") and not self.at(":"):
            attrs["expr"] = self.weight_expr()
        elif self.at("("):
            inputs = self.operands(op)
        if self.at("{"):
            attrs.update(self.attrs(op))
        self.expect(":")
        types = [self.tensor_type()]
        while self.at(","):
            self.take()
            types.append(self.tensor_type())
        if len(types) != len(names):
            raise self.error(f"{len(names)} results but {len(types)} types", op_tok)
        source: tuple = ()
        if self.peek().kind == "source":
            source = self.sources(self.take())
        return Node.make(op, inputs, [Value(n, t) for n, t in zip(names, types)], attrs, source)

    def sources(self, tok: _Tok) -> tuple:
        """The paths after ``#``, separated by commas: a JSON string, or bare text (spaces at its ends dropped;
        empty pieces are skipped)."""
        text, out, i = tok.text, [], 1
        while i <= len(text):
            j = i
            while j < len(text) and text[j] in " \t\r":
                j += 1
            if j < len(text) and text[j] == '"':
                try:
                    path, end = _JSON.raw_decode(text, j)
                except ValueError as e:
                    raise ParseError(f"bad source path string: {e}", tok.line, tok.col + j) from None
                out.append(path)
                while end < len(text) and text[end] in " \t\r":
                    end += 1
                if end < len(text) and text[end] != ",":
                    raise ParseError("expected ',' after a source path string", tok.line, tok.col + end)
                i = end + 1
            else:
                end = text.find(",", j)
                end = len(text) if end < 0 else end
                if text[j:end].strip():
                    out.append(text[j:end].strip())
                i = end + 1
        return tuple(out)

    def operands(self, op: Op) -> list:
        d = OPDEFS[op]
        self.expect("(")
        inputs: list = []
        named: dict = {}
        while not self.at(")"):
            if inputs or named:
                self.expect(",")
            if self.peek().kind == "ident" and self.peek(1).text == "=":
                key = self.take()
                self.take()
                slots = [i for i, s in enumerate(d.inputs) if s.name == key.text and not s.variadic]
                if not slots:
                    names = [s.name for s in d.inputs if not s.variadic]
                    raise self.error(f"{op} has no input '{key.text}' (it takes: {', '.join(names) or 'none'})", key)
                if slots[0] in named or slots[0] < len(inputs):
                    raise self.error(f"operand '{key.text}' given twice", key)
                named[slots[0]] = self.value_name()
            else:
                if named:
                    raise self.error("positional operand after a named one")
                if not d.variadic and len(inputs) == len(d.inputs):
                    at_most = "at most " if any(s.optional for s in d.inputs) else ""
                    raise self.error(f"{op} takes {at_most}{len(d.inputs)} operands")
                inputs.append(self.value_name())
        self.expect(")")
        if named:
            inputs += [None] * (max(named) + 1 - len(inputs))
            for slot, v in named.items():
                inputs[slot] = v
        return inputs

    def attrs(self, op: Op) -> dict:
        spec = OPDEFS[op].attrs
        self.expect("{")
        out: dict = {}
        while not self.at("}"):
            if out:
                self.expect(",")
            key = self.expect_kind("ident", "an attribute name")
            if key.text in out:
                raise self.error(f"attribute '{key.text}' given twice", key)
            kind = spec[key.text].kind if key.text in spec else None
            if not self.at("="):
                out[key.text] = True  # a bare flag
                continue
            self.take()
            out[key.text] = self.attr_value(kind)
        self.expect("}")
        return out

    def attr_value(self, kind: AttrKind | None):
        tok = self.peek()
        if kind is AttrKind.DTYPE:
            return self.dtype()
        if kind in (AttrKind.DIM,):
            return self.dim()
        if kind in (AttrKind.INTS, AttrKind.FLOATS, AttrKind.DIMS):
            self.expect("[")
            items: list = []
            while not self.at("]"):
                if items:
                    self.expect(",")
                items.append(self.dim() if kind is AttrKind.DIMS else self.number())
            self.expect("]")
            return tuple(items)
        if kind is AttrKind.EXPR:
            return self.weight_expr()
        if kind is AttrKind.BODY:
            return self.body()
        if tok.kind == "string":
            return self.string()
        if tok.kind == "ident" and tok.text in ("true", "false"):
            return self.take().text == "true"
        if tok.kind == "ident" and tok.text not in ("inf", "nan"):
            return self.take().text
        if self.at("["):
            self.nest()
            self.take()
            items = []
            while not self.at("]"):
                if items:
                    self.expect(",")
                items.append(self.attr_value(None))
            self.take()
            self.depth -= 1
            return tuple(items)
        return self.number()

    def number(self):
        neg = False
        if self.at("-"):
            self.take()
            neg = True
        tok = self.take()
        if tok.kind == "ident" and tok.text in ("inf", "nan"):
            v = float(tok.text)
        elif tok.kind == "num":
            try:
                v = float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
            except ValueError:
                raise self.error(f"bad number '{tok.text}'", tok) from None
        else:
            raise self.error(f"expected a number, got '{tok.text or 'end of text'}'", tok)
        return -v if neg else v

    # types and dimensions -----------------------------------------------------------------------------------
    def dtype(self) -> DType:
        tok = self.expect_kind("ident", "a dtype")
        try:
            return DType.parse(tok.text)
        except ValueError as e:
            raise self.error(str(e), tok) from None

    def tensor_type(self) -> TensorType:
        dtype = self.dtype()
        self.expect("[")
        dims: list = []
        while not self.at("]"):
            if dims:
                self.expect(",")
            dims.append(self.dim())
        self.expect("]")
        return TensorType(dtype, tuple(dims))

    def dim(self):
        self.nest()
        v = self.dim_term()
        while self.at("+") or self.at("-"):
            op = self.take()
            v = self.arith(op, v, self.dim_term())
        self.depth -= 1
        return v

    def dim_term(self):
        v = self.dim_unary()
        while self.at("*") or self.at("//"):
            op = self.take()
            if op.text == "*":
                v = self.arith(op, v, self.dim_unary())
            else:
                tok = self.expect_kind("num", "a positive integer divisor")
                den = self.int_literal(tok)
                if den <= 0:
                    raise self.error("'//' needs a positive integer divisor", tok)
                v = self.arith(op, v, den)
        return v

    def arith(self, op: _Tok, a, b):
        """``a op b`` on dimensions; an expression past the size limit (``MAX_TERMS``) is a ParseError at ``op``."""
        try:
            if op.text == "+":
                return a + b
            if op.text == "-":
                return a - b
            if op.text == "*":
                return b * a if isinstance(b, Sym) else a * b
            return a // b
        except ShapeError as e:
            raise self.error(str(e), op) from None

    def dim_unary(self):
        tok = self.take()
        if tok.kind == "punct" and tok.text == "-":
            return -self.dim_unary()  # negation keeps the size
        if tok.kind == "num":
            return self.int_literal(tok)
        if tok.kind == "ident" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tok.text):
            return Sym.symbol(tok.text)
        if tok.kind == "punct" and tok.text == "(":
            v = self.dim()
            self.expect(")")
            return v
        raise self.error(f"expected a dimension, got '{tok.text or 'end of text'}'", tok)

    def int_literal(self, tok: _Tok) -> int:
        if not tok.text.isdigit() or len(tok.text) > 30:
            raise self.error(f"expected an integer of at most 30 digits, got '{tok.text}'", tok)
        return int(tok.text)

    # weight expressions -------------------------------------------------------------------------------------
    def weight_expr(self):
        self.nest()
        tok = self.expect_kind("ident", "a weight expression")
        head = tok.text
        if head == "param":
            out = Param(self.string())
        elif head == "data":
            key = self.string()
            self.expect(":")
            t = self.tensor_type()
            self.expect("sha")
            digest = self.string()
            out = Data(key, t, digest)
        elif head in ("concat", "scale", "cast", "deinterleave"):
            self.expect("[")
            arg = self.dtype() if head == "cast" else self.number()
            if head != "cast" and not isinstance(arg, int):
                raise self.error(f"{head} needs an integer axis", tok)
            self.expect("]")
            args = self.weight_args()
            if head == "concat":
                out = Concat(tuple(args), arg)
            elif head == "deinterleave":
                out = Deinterleave(*self.arity(args, 1, tok), arg)
            elif head == "scale":
                out = Scale(*self.arity(args, 2, tok), arg)
            else:
                out = Cast(*self.arity(args, 1, tok), arg)
        elif head == "slice":
            self.expect("[")
            bounds = [self.number()]
            for _ in range(2):
                self.expect(",")
                bounds.append(self.number())
            if not all(isinstance(v, int) for v in bounds):
                raise self.error("slice needs an integer axis, start and end", tok)
            self.expect("]")
            out = Slice(*self.arity(self.weight_args(), 1, tok), *bounds)
        elif head == "transpose":
            out = Transpose(*self.arity(self.weight_args(), 1, tok))
        elif head == "matmul":
            out = MatMul(*self.arity(self.weight_args(), 2, tok))
        else:
            raise self.error(f"unknown weight expression '{head}'", tok)
        self.depth -= 1
        return out

    def body(self):
        """An ew_chain body (ir/body.py): ``%i`` or ``op[attr=value, ...](body, ...)``."""
        tok = self.peek()
        if tok.kind == "value":
            self.take()
            if not tok.text[1:].isdigit():
                raise self.error(f"an ew_chain body reads operands by number (%0, %1, ...), got {tok.text}", tok)
            return int(tok.text[1:])
        self.nest()
        name = self.expect_kind("ident", "an element-wise op")
        try:
            op = Op(name.text)
        except ValueError:
            raise self.error(f"unknown op '{name.text}' in an ew_chain body", name) from None
        spec = OPDEFS[op].attrs
        attrs: list = []
        if self.at("["):
            self.take()
            while not self.at("]"):
                if attrs:
                    self.expect(",")
                key = self.expect_kind("ident", "an attribute name")
                if key.text not in spec or key.text in dict(attrs):
                    raise self.error(f"{op} takes no attribute '{key.text}' here", key)
                self.expect("=")
                attrs.append((key.text, self.attr_value(spec[key.text].kind)))
            self.take()
        self.expect("(")
        args: list = []
        while not self.at(")"):
            if args:
                self.expect(",")
            args.append(self.body())
        self.expect(")")
        self.depth -= 1
        return Apply(op, tuple(args), tuple(attrs))

    def weight_args(self) -> list:
        self.expect("(")
        args: list = []
        while not self.at(")"):
            if args:
                self.expect(",")
            args.append(self.weight_expr())
        self.expect(")")
        return args

    def arity(self, args: list, n: int, tok: _Tok) -> list:
        if len(args) != n:
            raise self.error(f"'{tok.text}' takes {n} operand(s), got {len(args)}", tok)
        return args


def _run(text: str, what):
    if not isinstance(text, str):
        raise ParseError(f"IR text must be a str, got {type(text).__name__}")
    p = _Parser(text)
    try:
        out = what(p)
        if p.peek().kind != "end":
            raise p.error(f"unexpected '{p.peek().text}' after the end")
        return out
    except RecursionError:
        raise p.error("nesting too deep") from None
    except (ValueError, TypeError, OverflowError) as e:  # a value no rule above anticipated
        raise p.error(f"invalid IR: {e}") from None


def parse_module(text: str) -> Module:
    """Parse a module: an optional ``params {...}`` block, then graphs."""
    return _run(text, _Parser.module)


def parse_graph(text: str) -> Graph:
    """Parse one graph."""
    return _run(text, _Parser.graph)


def parse_type(text: str) -> TensorType:
    """Parse a tensor type such as ``f32[B,S,576]``."""
    return _run(text, _Parser.tensor_type)
