"""The canonical text form of the IR. ``parser.py`` reads it back: print → parse → print is the identity."""

from __future__ import annotations

import json
import re

from lowerlm.ir.body import Apply, format_body
from lowerlm.ir.graph import Graph, Module, Node
from lowerlm.ir.opdefs import OPDEFS, AttrKind
from lowerlm.ir.ops import Op
from lowerlm.ir.weights import WeightExpr, expr_str

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_KEYWORDS = {"true", "false", "inf", "nan"}
_BARE_SOURCE = re.compile(r'[^\s",\x00-\x1f\x7f]+(?: [^\s",\x00-\x1f\x7f]+)*')


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
    if kind is AttrKind.BODY and isinstance(v, Apply):
        return format_body(v)
    return str(v)  # DType, Sym


def _leaf_form(node: Node) -> str | None:
    """``param "w"`` or ``weight <expr>``: the text of a leaf whose name or expression stands in place of operands
    and attributes, or None when the node does not have that shape (it then prints like any other op)."""
    if node.inputs:
        return None
    if node.op is Op.PARAM and isinstance(node.attrs.get("name"), str):
        return f"param {json.dumps(node.attrs['name'])}"
    if node.op is Op.WEIGHT and isinstance(node.attrs.get("expr"), WeightExpr.__args__):
        return f"weight {expr_str(node.attrs['expr'])}"
    return None


def format_attrs(node: Node, skip: str = "") -> str:
    spec = OPDEFS[node.op].attrs if node.op in OPDEFS else {}
    parts = []
    for name, v in node.attrs.items():
        if name == skip:
            continue
        kind = spec[name].kind if name in spec else None
        parts.append(name if v is True and kind is AttrKind.BOOL else f"{name}={format_attr_value(v, kind)}")
    return " {" + ", ".join(parts) + "}" if parts else ""


def print_node(node: Node) -> str:
    lhs = ", ".join("%" + r.name for r in node.results)
    leaf = _leaf_form(node)
    if leaf is not None:
        body = leaf
    else:
        d = OPDEFS.get(node.op)
        if d is None or d.variadic or len(node.inputs) > len(d.inputs):
            # variadic operands, or more than the op has slots (the verifier refuses that): all positional, an
            # absent one as '?' -- what the node holds, and for an invalid node text the parser refuses
            args = [f"%{v}" if v is not None else "?" for v in node.inputs]
        else:
            args = []
            gap = False  # optional inputs are named, and so is every operand after an absent or named one
            for spec, v in zip(d.inputs, node.inputs):
                if v is None:
                    gap = True
                    continue
                named = spec.optional or gap
                gap = gap or named
                args.append(f"{spec.name}=%{v}" if named else f"%{v}")
        body = node.op.value + (f"({', '.join(args)})" if node.inputs else "")
    body += format_attrs(node, skip={Op.PARAM: "name", Op.WEIGHT: "expr"}.get(node.op, "") if leaf else "")
    types = ", ".join(str(r.type) for r in node.results)
    src = f"  # {', '.join(map(format_source, node.source))}" if node.source else ""
    return f"{lhs} = {body} : {types}{src}"


def format_source(path: str) -> str:
    """A source path as the ``#`` list writes it: bare when it reads back as itself (no comma, quote or line
    break, no space at its ends or doubled), else a JSON string (module names may hold any of these)."""
    return path if _BARE_SOURCE.fullmatch(path) else json.dumps(path)


def _owner(path: str) -> str:
    """A state's owning module path: bare when the parser reads it as one name, else a JSON string (an
    ``nn.Sequential`` numbers its children: ``0.attn``)."""
    return path if _PATH.fullmatch(path) else json.dumps(path)


def print_graph(g: Graph, indent: str = "") -> str:
    sig = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
    lines = [f"{indent}graph {g.name}({sig})"]
    if g.state:
        st = ", ".join(f"%{s.name}: {s.type} {s.kind}" + (f" @{_owner(s.owner)}" if s.owner else "") for s in g.state)
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
