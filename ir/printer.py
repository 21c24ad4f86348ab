"""The canonical text form of the IR. ``parser.py`` reads it back: print → parse → print is the identity."""

from __future__ import annotations

import json
import re

from lowerlm.ir.graph import Graph, Module, Node
from lowerlm.ir.opdefs import OPDEFS, AttrKind
from lowerlm.ir.ops import Op
from lowerlm.ir.weights import expr_str

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_KEYWORDS = {"true", "false", "inf", "nan"}


def format_number(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def format_attr_value(v, kind: AttrKind | None = None) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return format_number(v)
    if isinstance(v, str):
        if kind in (AttrKind.STR, None) and _IDENT.fullmatch(v) and v not in _KEYWORDS:
            return v
        return json.dumps(v)
    if isinstance(v, tuple):
        return "[" + ",".join(format_attr_value(x) for x in v) + "]"
    return str(v)  # DType, Sym


def format_attrs(node: Node) -> str:
    spec = OPDEFS[node.op].attrs if node.op in OPDEFS else {}
    parts = []
    for name, v in node.attrs.items():
        if node.op is Op.PARAM and name == "name" or node.op is Op.WEIGHT and name == "expr":
            continue
        kind = spec[name].kind if name in spec else None
        parts.append(name if v is True and kind is AttrKind.BOOL else f"{name}={format_attr_value(v, kind)}")
    return " {" + ", ".join(parts) + "}" if parts else ""


def print_node(node: Node) -> str:
    lhs = ", ".join("%" + r.name for r in node.results)
    if node.op is Op.PARAM and "name" in node.attrs:
        body = f"param {json.dumps(node.attrs['name'])}"
    elif node.op is Op.WEIGHT and "expr" in node.attrs:
        body = f"weight {expr_str(node.attrs['expr'])}"
    else:
        d = OPDEFS.get(node.op)
        args = []
        gap = False  # optional inputs are named, and so is every operand after an absent or named one
        for i, v in enumerate(node.inputs):
            if v is None:
                gap = True
                continue
            spec = d.inputs[min(i, len(d.inputs) - 1)] if d and d.inputs else None
            named = spec is not None and not spec.variadic and (spec.optional or gap)
            gap = gap or named
            args.append(f"{spec.name}=%{v}" if named else f"%{v}")
        body = node.op.value + (f"({', '.join(args)})" if node.inputs else "")
    body += format_attrs(node)
    types = ", ".join(str(r.type) for r in node.results)
    src = f"  # {', '.join(node.source)}" if node.source else ""
    return f"{lhs} = {body} : {types}{src}"


def _owner(path: str) -> str:
    """A state's owning module path: bare when the parser reads it as one name, else a JSON string (an
    ``nn.Sequential`` numbers its children: ``0.attn``)."""
    return path if _PATH.fullmatch(path) else json.dumps(path)


def print_graph(g: Graph, indent: str = "") -> str:
    sig = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
    lines = [f"{indent}graph {g.name}({sig})"]
    if g.state:
        st = ", ".join(f"%{s.name}: {s.type}" + (f" @{_owner(s.owner)}" if s.owner else "") for s in g.state)
        lines[0] += f"\n{indent}    state({st})"
    lines[0] += " {"
    lines += [f"{indent}  {print_node(n)}" for n in g.nodes]
    ret = "return " + ", ".join("%" + o for o in g.outputs)
    if g.state_outputs:
        ret += " state(" + ", ".join("%" + o for o in g.state_outputs) + ")"
    lines += [f"{indent}  {ret}", f"{indent}}}"]
    return "\n".join(lines)


def print_module(m: Module) -> str:
    parts = []
    if m.params:
        parts.append("params {\n" + "".join(f"  {json.dumps(n)}: {t}\n" for n, t in m.params) + "}")
    parts += [print_graph(g) for g in m.graphs]
    return "\n\n".join(parts) + "\n"
