"""Symbolic dimensions: integers or polynomials over named symbols with floor-division by positive constants.

A dimension is a plain ``int`` or a ``Sym``. A ``Sym`` is kept in one canonical form, so structural equality is
mathematical equality for the expressions torch.export produces (``B``, ``B*S``, ``H*D``, ``S//2``, ``(S+1)//2``):
terms are sorted, constants folded, and ``(c*q + r)//c`` is rewritten to ``q + r//c`` with every coefficient of
``r`` in ``[0, c)``. Symbols stand for non-negative integers.

The canonical form is expanded, and expansion is exponential in the worst case (a product of n sums of two terms
has 2**n terms), so every expression is bounded: its *size*, the number of its terms counting the terms inside
floor-division numerators at each occurrence, may not exceed ``MAX_TERMS``, and a product is refused before it is
expanded when the sizes of its factors multiply past it (``ShapeError``: "shape expression too large"). That keeps
every operation, and so parsing and comparing shapes, polynomial in the size of the text.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Union

from lowerlm.ir.errors import ShapeError

Dim = Union[int, "Sym"]
Shape = tuple  # tuple[Dim, ...]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Real shapes have a handful of terms (torch.export gives B, B*S, S+1, (S+1)//2, ...); 256 leaves a wide margin
# while bounding one product's expansion to 256 monomial products.
MAX_TERMS = 256


def _too_large(n: int) -> ShapeError:
    return ShapeError(f"shape expression too large ({n} terms; at most {MAX_TERMS})")


@dataclass(frozen=True)
class FloorDiv:
    """An atom ``num // den`` whose numerator cannot be divided exactly."""

    num: Sym
    den: int

    @functools.cached_property
    def key(self) -> str:
        """The sort key of the atom (its text), computed once: sorting compares it often."""
        return "~" + _print_poly(self.num) + "//" + str(self.den)


Atom = Union[str, FloorDiv]
Monomial = tuple  # tuple[tuple[Atom, int], ...] sorted by atom key


def _atom_key(atom: Atom) -> str:
    return atom if isinstance(atom, str) else atom.key


def _mono_size(m: Monomial) -> int:
    """1 for the term itself, plus the size of each floor-division numerator each time it occurs."""
    return 1 + sum(p * a.num.size for a, p in m if not isinstance(a, str))


@dataclass(frozen=True)
class Sym:
    """A canonical polynomial: ``terms`` maps monomials to non-zero integer coefficients, sorted. ``size`` counts
    the terms, those inside floor-division numerators included (bounded by ``MAX_TERMS``); it is not compared."""

    terms: tuple  # tuple[tuple[Monomial, int], ...]

    @functools.cached_property
    def size(self) -> int:
        return sum(_mono_size(m) for m, _ in self.terms)

    # construction ---------------------------------------------------------------------------------------
    @staticmethod
    def of(terms: dict) -> Dim:
        items = [(m, c) for m, c in terms.items() if c != 0]
        if all(m == () for m, _ in items):
            return sum(c for _, c in items)
        items.sort(key=lambda mc: (mc[0] == (), [(_atom_key(a), p) for a, p in mc[0]]))
        out = Sym(tuple(items))
        if out.size > MAX_TERMS:
            raise _too_large(out.size)
        return out

    @staticmethod
    def symbol(name: str) -> Sym:
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad symbol name '{name}'")
        return Sym(((((name, 1),), 1),))

    # arithmetic -----------------------------------------------------------------------------------------
    def __add__(self, other: Dim) -> Dim:
        out = dict(_terms(self))
        for m, c in _terms(other):
            out[m] = out.get(m, 0) + c
        return Sym.of(out)

    __radd__ = __add__

    def __neg__(self) -> Dim:
        return Sym.of({m: -c for m, c in self.terms})

    def __sub__(self, other: Dim) -> Dim:
        return self + (-other)

    def __rsub__(self, other: Dim) -> Dim:
        return (-self) + other

    def __mul__(self, other: Dim) -> Dim:
        t1, t2 = _terms(self), _terms(other)
        # the expansion's size is at most the product of the sizes: refuse it before computing it
        bound = self.size * (other.size if isinstance(other, Sym) else 1)
        if bound > MAX_TERMS:
            raise _too_large(bound)
        out: dict = {}
        for m1, c1 in t1:
            for m2, c2 in t2:
                m = _mono_mul(m1, m2)
                out[m] = out.get(m, 0) + c1 * c2
        return Sym.of(out)

    __rmul__ = __mul__

    def __floordiv__(self, den: int) -> Dim:
        if not isinstance(den, int) or isinstance(den, bool) or den <= 0:
            raise ValueError(f"symbolic floor-division needs a positive integer constant, got {den!r}")
        if den == 1:
            return self
        whole: dict = {}
        rest: dict = {}
        for m, c in self.terms:
            q, r = divmod(c, den)
            whole[m] = q
            if r:
                rest[m] = r
        rem = Sym.of(rest)
        if isinstance(rem, int):
            return Sym.of(whole) + rem // den
        # (x//a)//b == x//(a*b) for positive a, b
        if len(rem.terms) == 1 and rem.terms[0][1] == 1 and len(rem.terms[0][0]) == 1:
            (atom, power), = rem.terms[0][0]
            if isinstance(atom, FloorDiv) and power == 1:
                return Sym.of(whole) + (atom.num // (atom.den * den))
        return Sym.of(whole) + Sym.of({((FloorDiv(rem, den), 1),): 1})

    # queries --------------------------------------------------------------------------------------------
    @property
    def symbols(self) -> frozenset:
        out: set = set()
        for m, _ in self.terms:
            for a, _ in m:
                out |= {a} if isinstance(a, str) else a.num.symbols
        return frozenset(out)

    def evaluate(self, env: dict) -> int:
        total = 0
        for m, c in self.terms:
            v = c
            for a, p in m:
                if isinstance(a, str):
                    if a not in env:
                        raise KeyError(f"symbol '{a}' has no value")
                    base = env[a]
                else:
                    base = evaluate(a.num, env) // a.den
                v *= base**p
            total += v
        return total

    def __str__(self) -> str:
        return _print_poly(self)

    def __repr__(self) -> str:
        return f"Sym({_print_poly(self)})"


def _terms(d: Dim):
    if isinstance(d, Sym):
        return d.terms
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"not a dimension: {d!r}")
    return (((), d),) if d else ()


def _mono_mul(m1: Monomial, m2: Monomial) -> Monomial:
    powers: dict = dict(m1)
    for a, p in m2:
        powers[a] = powers.get(a, 0) + p
    return tuple(sorted(powers.items(), key=lambda ap: _atom_key(ap[0])))


def _print_atom(atom: Atom, alone: bool) -> str:
    if isinstance(atom, str):
        return atom
    num = _print_poly(atom.num)
    if not (len(atom.num.terms) == 1 and atom.num.terms[0][1] == 1 and len(atom.num.terms[0][0]) == 1
            and isinstance(atom.num.terms[0][0][0][0], str) and atom.num.terms[0][0][0][1] == 1):
        num = f"({num})"
    text = f"{num}//{atom.den}"
    return text if alone else f"({text})"


def _print_monomial(m: Monomial, coef: int, negated: bool = False) -> str:
    factors = [a for a, p in m for _ in range(p)]
    # a lone floor-division prints bare unless negated: "-S//2" would read as (-S)//2
    alone = len(factors) == 1 and coef == 1 and not negated
    parts = ([str(coef)] if coef != 1 else []) + [_print_atom(a, alone) for a in factors]
    return "*".join(parts)


def _print_poly(p: Sym) -> str:
    out = ""
    for m, c in p.terms:
        text = str(c) if m == () else _print_monomial(m, abs(c), c < 0)
        if c < 0:
            out += "-" + (text.lstrip("-") if m == () else text)
        else:
            out += ("+" if out else "") + text
    return out


# public helpers ---------------------------------------------------------------------------------------------
def sym(name: str) -> Sym:
    """The symbol ``name`` as a dimension."""
    return Sym.symbol(name)


def is_dim(d) -> bool:
    return isinstance(d, Sym) or (isinstance(d, int) and not isinstance(d, bool))


def evaluate(d: Dim, env: dict) -> int:
    """The integer value of ``d`` with symbols bound by ``env``."""
    return d.evaluate(env) if isinstance(d, Sym) else d


_INF = float("inf")


def _imul(x, y):
    """Product of two interval bounds where 0 times an infinite bound is 0 (the 0 is exact)."""
    return 0 if x == 0 or y == 0 else x * y


def _interval_mul(a: tuple, b: tuple) -> tuple:
    products = [_imul(x, y) for x in a for y in b]
    return min(products), max(products)


def _interval_pow(a: tuple, p: int) -> tuple:
    lo, hi = a
    if p == 0:
        return 1, 1
    if lo >= 0 or p % 2:  # monotonic
        return lo**p, hi**p
    if hi <= 0:
        return hi**p, lo**p
    return 0, max(lo**p, hi**p)


def dim_bounds(d: Dim) -> tuple:
    """``(lo, hi)``: bounds of ``d``'s value over every non-negative value of its symbols (ints, or -inf/inf).
    Interval arithmetic: sound, not always tight. ``hi < 0`` proves a dimension negative for any binding."""
    if not isinstance(d, Sym):
        return d, d
    lo = hi = 0
    for m, c in d.terms:
        term = (c, c)
        for atom, power in m:
            if isinstance(atom, str):
                base = (0, _INF)
            else:
                nlo, nhi = dim_bounds(atom.num)
                base = tuple(v if v in (_INF, -_INF) else v // atom.den for v in (nlo, nhi))
            term = _interval_mul(term, _interval_pow(base, power))
        lo, hi = lo + term[0], hi + term[1]
    return lo, hi


def free_symbols(shape) -> frozenset:
    out: frozenset = frozenset()
    for d in shape:
        if isinstance(d, Sym):
            out |= d.symbols
    return out


def numel(shape) -> Dim:
    total: Dim = 1
    for d in shape:
        total = d * total if isinstance(d, Sym) else total * d
    return total


def shape_str(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


# parsing ----------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|[-+*(),]))")


class DimSyntaxError(ValueError):
    def __init__(self, message: str, pos: int):
        self.pos = pos
        super().__init__(message)


class _DimParser:
    """``expr := term (('+'|'-') term)*``; ``term := unary ('*' unary | '//' INT)*``;
    ``unary := '-' unary | INT | NAME | '(' expr ')'``."""

    def __init__(self, text: str):
        self.text, self.toks = text, []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m:
                raise DimSyntaxError(f"unexpected character '{text[pos:].lstrip()[:1]}' in dimension", pos)
            kind = "int" if m.group(1) else "name" if m.group(2) else "op"
            self.toks.append((kind, m.group(m.lastindex), m.start(m.lastindex)))
            pos = m.end()
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "", len(self.text))

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expr(self) -> Dim:
        v = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            rhs = self.term()
            v = _add(v, rhs) if op == "+" else _add(v, _neg(rhs))
        return v

    def term(self) -> Dim:
        v = self.unary()
        while self.peek()[1] in ("*", "//"):
            op = self.take()[1]
            if op == "*":
                v = _mul(v, self.unary())
            else:
                kind, text, pos = self.take()
                if kind != "int" or int(text) <= 0:
                    raise DimSyntaxError("'//' needs a positive integer constant", pos)
                v = v // int(text)
        return v

    def unary(self) -> Dim:
        kind, text, pos = self.take()
        if text == "-":
            return _neg(self.unary())
        if kind == "int":
            if len(text) > 30:
                raise DimSyntaxError("dimension constant too large", pos)
            return int(text)
        if kind == "name":
            return Sym.symbol(text)
        if text == "(":
            v = self.expr()
            if self.take()[1] != ")":
                raise DimSyntaxError("expected ')'", pos)
            return v
        raise DimSyntaxError(f"expected a dimension, got '{text or 'end of text'}'", pos)


def _add(a: Dim, b: Dim) -> Dim:
    return a + b if isinstance(a, Sym) or isinstance(b, Sym) else a + b


def _neg(a: Dim) -> Dim:
    return -a


def _mul(a: Dim, b: Dim) -> Dim:
    return b * a if isinstance(b, Sym) else a * b


def parse_dim(text: str) -> Dim:
    """Parse one dimension expression such as ``B*S`` or ``(S+1)//2``."""
    p = _DimParser(text)
    v = p.expr()
    kind, tok, pos = p.peek()
    if kind != "end":
        raise DimSyntaxError(f"unexpected '{tok}' after dimension", pos)
    return v


def parse_shape(text: str) -> tuple:
    """Parse a comma-separated list of dimensions (the inside of ``[...]``)."""
    p = _DimParser(text)
    dims: list = []
    if p.peek()[0] == "end":
        return ()
    while True:
        dims.append(p.expr())
        kind, tok, pos = p.take()
        if kind == "end":
            return tuple(dims)
        if tok != ",":
            raise DimSyntaxError(f"expected ',' between dimensions, got '{tok}'", pos)


def substitute(d: Dim, env: dict) -> Dim:
    """``d`` with the symbols in ``env`` replaced by dimensions (ints or other expressions)."""
    if not isinstance(d, Sym):
        return d
    total: Dim = 0
    for m, c in d.terms:
        term: Dim = c
        for atom, power in m:
            if isinstance(atom, str):
                base = env.get(atom, Sym.symbol(atom))
            else:
                base = substitute(atom.num, env) // atom.den
            for _ in range(power):
                term = base * term if isinstance(base, Sym) else term * base
        total = term + total if isinstance(term, Sym) else total + term
    return total
