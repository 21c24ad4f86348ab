"""The body of an ``ew_chain``: a tree of element-wise ops over the node's operands.

A body is an ``Apply(op, args, attrs)`` whose args are ``Apply`` or operand indices (ints). Its text form is the
op's name, its attributes in brackets when it has any, and its arguments in parentheses, ``%i`` standing for the
chain's operand i::

    %y = ew_chain(%g, %u) {body=mul(silu(%0), %1)} : f32[B,S,64]
    %z = ew_chain(%w) {body=cast[dtype=f32](add(%0, %0))} : f32[64]

Every step is typed by its op's row (so each intermediate is rounded to its dtype, as torch rounds op by op) and
must be element-wise (``Trait.UNARY`` or ``Trait.BINARY``). An operand may be read by several steps; a step's
result by one (a chain is a tree).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowerlm.ir.errors import ShapeError
from lowerlm.ir.ops import Op


@dataclass(frozen=True)
class Apply:
    op: Op
    args: tuple  # of Apply or operand index (int)
    attrs: tuple = ()  # (name, value) pairs as given; defaults are filled in by the op's row

    def all_attrs(self) -> dict:
        from lowerlm.ir.opdefs import OPDEFS, REQUIRED

        full = {k: s.default for k, s in OPDEFS[self.op].attrs.items() if s.default is not REQUIRED}
        full.update(self.attrs)
        return full


def steps(body: Apply) -> list:
    """The body's ``Apply`` nodes in evaluation order (arguments first); the last is the body."""
    out: list = []

    def visit(e):
        if isinstance(e, Apply):
            for a in e.args:
                visit(a)
            out.append(e)

    visit(body)
    return out


def operands(body: Apply) -> set:
    """The operand indices the body reads."""
    return {a for s in steps(body) for a in s.args if isinstance(a, int)}


def types(body: Apply, ts: list) -> dict:
    """Each step's result type (by ``id`` of the step), given the operands' types ``ts``."""
    from lowerlm.ir.opdefs import OPDEFS, Trait

    out: dict = {}
    for s in steps(body):
        d = OPDEFS[s.op]
        if not d.traits & {Trait.UNARY, Trait.BINARY}:
            raise ShapeError(f"ew_chain body: {s.op} is not element-wise")
        if len(s.args) != len(d.inputs):
            raise ShapeError(f"ew_chain body: {s.op} takes {len(d.inputs)} operand(s), got {len(s.args)}")
        ins = []
        for a in s.args:
            if isinstance(a, int) and not 0 <= a < len(ts):
                raise ShapeError(f"ew_chain body reads %{a}; the node has {len(ts)} operand(s)")
            ins.append(ts[a] if isinstance(a, int) else out[id(a)])
        out[id(s)] = d.rule(ins, s.all_attrs())[0]
    return out


def rule(ts, a):
    """The ``ew_chain`` result rule: the type of the body's last step; every operand must be read."""
    body = a["body"]
    if not isinstance(body, Apply):
        raise ShapeError("ew_chain needs a body")
    unread = set(range(len(ts))) - operands(body)
    if unread:
        raise ShapeError(f"ew_chain operand(s) {', '.join('%' + str(i) for i in sorted(unread))} not read by its body")
    return [types(body, ts)[id(body)]]


def evaluate(*xs, body: Apply):
    """The reference implementation: each step with its op's ``impl``."""
    from lowerlm.ir.opdefs import OPDEFS

    values: dict = {}
    for s in steps(body):
        args = [xs[a] if isinstance(a, int) else values[id(a)] for a in s.args]
        values[id(s)] = OPDEFS[s.op].impl(*args, **s.all_attrs())
    return values[id(body)]


def format_body(e) -> str:
    if isinstance(e, int):
        return f"%{e}"
    from lowerlm.ir.opdefs import OPDEFS
    from lowerlm.ir.printer import format_attr_value

    spec = OPDEFS[e.op].attrs
    attrs = ", ".join(f"{k}={format_attr_value(v, spec[k].kind if k in spec else None)}" for k, v in e.attrs)
    return f"{e.op.value}{f'[{attrs}]' if attrs else ''}({', '.join(format_body(a) for a in e.args)})"


def from_nodes(members: list, inputs: list) -> Apply:
    """The body computing the last of ``members`` (IR nodes in graph order, each single-result, each used only
    by a later member except the last) over the values ``inputs`` (names, operand order)."""
    index = {v: i for i, v in enumerate(inputs)}
    made: dict = {}
    for n in members:
        args = tuple(made[v] if v in made else index[v] for v in n.args)
        made[n.results[0].name] = Apply(n.op, args, tuple(n.attrs.items()))
    return made[members[-1].results[0].name]
