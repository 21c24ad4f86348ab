"""Symbolic dimensions: canonical forms, printing and parsing, and soundness of the canonicalisation."""

from __future__ import annotations

import contextlib
import math
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowerlm.ir.errors import ShapeError
from lowerlm.ir.shapes import (
    MAX_TERMS,
    DimSyntaxError,
    Sym,
    dim_bounds,
    evaluate,
    numel,
    parse_dim,
    parse_shape,
    sym,
)

B, S, H = sym("B"), sym("S"), sym("H")


@pytest.mark.parametrize("expr, text", [
    (B * S, "B*S"),
    (S * B, "B*S"),
    (S // 2, "S//2"),
    ((S + 1) // 2, "(S+1)//2"),
    ((2 * S + 2) // 2, "S+1"),
    ((2 * S + 3) // 2, "S+1"),
    ((S // 2) // 3, "S//6"),
    (B * (S // 2), "B*(S//2)"),
    (2 * S - 1, "2*S-1"),
    (4 - S, "-S+4"),
    (S - S, "0"),
    (B * S * S + H, "B*S*S+H"),
    ((B * S) // 4 + B, "B+(B*S)//4"),
])
def test_canonical_text_round_trips(expr, text):
    assert str(expr) == text
    assert parse_dim(text) == expr


def test_constants_collapse_to_int():
    assert isinstance(S - S + 3, int) and S - S + 3 == 3
    assert numel((B, S, 4)) == 4 * B * S
    assert numel((2, 3)) == 6


def test_parse_shape_and_errors():
    assert parse_shape("B, S*2 ,576") == (B, 2 * S, 576)
    assert parse_shape("") == ()
    for bad in ("B S", "S//0", "S//B", "(S", "S+", "1.5", "S$"):
        with pytest.raises(DimSyntaxError):
            parse_shape(bad)


@st.composite
def exprs(draw, depth=3):
    """A random dimension expression as (python source, Dim)."""
    if depth == 0 or draw(st.booleans()):
        if draw(st.booleans()):
            n = draw(st.integers(0, 9))
            return str(n), n
        name = draw(st.sampled_from(["B", "S", "H"]))
        return name, sym(name)
    op = draw(st.sampled_from(["+", "-", "*", "//"]))
    ls, lv = draw(exprs(depth=depth - 1))
    if op == "//":
        c = draw(st.integers(1, 5))
        return f"({ls})//{c}", lv // c if isinstance(lv, Sym) else lv // c
    rs, rv = draw(exprs(depth=depth - 1))
    value = {"+": lambda: lv + rv, "-": lambda: lv - rv, "*": lambda: lv * rv}[op]()
    return f"({ls}){op}({rs})", value


@settings(max_examples=300, deadline=None)
@given(exprs(), st.integers(0, 40), st.integers(0, 40), st.integers(0, 40))
def test_canonical_form_is_sound(expr, b, s, h):
    """The canonical polynomial evaluates like the expression it came from, and prints to text that parses back
    to the same polynomial."""
    source, dim = expr
    env = {"B": b, "S": s, "H": h}
    # floor-division of negative numerators: python's // on the source is the reference semantics
    assert evaluate(dim, env) == eval(source, {}, env)
    assert parse_dim(str(dim)) == dim


# ---- size limit: expansion cannot blow up ------------------------------------------------------------------
@contextlib.contextmanager
def within(seconds: int):
    """Fail (rather than hang) when the block runs longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


FACTORS_18 = "*".join(f"({chr(ord('A') + i)}+1)" for i in range(18))  # expands to 2**18 terms


def test_product_of_many_sums_is_refused_quickly():
    """A product of n sums expands to 2**n terms: 18 factors never finished; now refused in milliseconds."""
    with within(1):
        with pytest.raises(ShapeError, match=r"shape expression too large \(512 terms; at most 256\)"):
            parse_dim(FACTORS_18)
        dim = 1
        with pytest.raises(ShapeError, match="too large"):
            for i in range(18):
                dim = (sym(chr(ord("A") + i)) + 1) * dim


def test_nested_floor_divisions_are_bounded():
    """Each floor-division keeps its numerator whole, so nesting multiplied the printed size by 8 per level
    (12 levels: 8**12 terms to print) with the text growing by 30 characters a level."""
    text = "A"
    for _ in range(12):
        text = f"(({text}+1)*(A+1)*(B+1)*(C+1))//2"
    with within(1), pytest.raises(ShapeError, match="too large"):
        parse_dim(text)


def test_expressions_under_the_limit_still_work():
    eight = parse_dim("*".join(f"({chr(ord('A') + i)}+1)" for i in range(8)))
    assert len(eight.terms) == MAX_TERMS == eight.size
    assert parse_dim(str(eight)) == eight
    # cancellation within the limit: (S+1)*(S-1) == S*S-1
    assert (S + 1) * (S - 1) == S * S - 1
    assert B * ((S + 1) // 2) == parse_dim("B*((S+1)//2)") and parse_dim("B*((S+1)//2)").size == 3


@pytest.mark.parametrize("text, lo, hi", [
    ("S-S-1", -1, -1),
    ("-S-1", -math.inf, -1),
    ("-B*S-2", -math.inf, -2),
    ("-S", -math.inf, 0),
    ("S-1", -1, math.inf),
    ("B*S", 0, math.inf),
    ("(S+1)//2+3", 3, math.inf),
    ("7", 7, 7),
])
def test_dim_bounds(text, lo, hi):
    assert dim_bounds(parse_dim(text)) == (lo, hi)


@settings(max_examples=100, deadline=None)
@given(exprs(), st.integers(0, 40), st.integers(0, 40), st.integers(0, 40))
def test_dim_bounds_are_sound(expr, b, s, h):
    _, dim = expr
    lo, hi = dim_bounds(dim)
    assert lo <= evaluate(dim, {"B": b, "S": s, "H": h}) <= hi
