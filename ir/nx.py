"""A networkx view of a graph: reachability (a fusion must not create a cycle), liveness (buffer reuse),
topological order and DOT export.

Graph nodes are node indices; an edge u → v means v must run after u: v reads a result of u, or v overwrites a
state version that u reads (an anti-dependence, so reordering never reads a version after it was overwritten).
"""

from __future__ import annotations

import json

import networkx as nx

from lowerlm.ir.graph import Graph
from lowerlm.ir.opdefs import OPDEFS


def to_networkx(g: Graph) -> nx.DiGraph:
    d = nx.DiGraph()
    index = {}
    for i, n in enumerate(g.nodes):
        d.add_node(i, node=n, label=f"{n.op}")
        for r in n.results:
            index[r.name] = i
    readers: dict = {}
    for i, n in enumerate(g.nodes):
        for v in dict.fromkeys(n.args):
            if v in index:
                d.add_edge(index[v], i, value=v)
            readers.setdefault(v, []).append(i)
    for i, n in enumerate(g.nodes):
        for slot in OPDEFS[n.op].writes if n.op in OPDEFS else ():
            for r in readers.get(n.inputs[slot], ()):
                if r != i:
                    d.add_edge(r, i, anti=True)
    return d


def topological_order(g: Graph) -> Graph:
    """The same graph with nodes in a topological order that keeps the given order wherever it is valid."""
    d = to_networkx(g)
    order = nx.lexicographical_topological_sort(d, key=lambda i: i)
    return g.with_(nodes=tuple(g.nodes[i] for i in order))


def reachable(g: Graph, src: int, dst: int) -> bool:
    """Whether node ``dst`` depends (transitively) on node ``src``."""
    return src != dst and nx.has_path(to_networkx(g), src, dst)


def fusion_creates_cycle(g: Graph, group: set) -> bool:
    """Whether replacing the nodes in ``group`` (indices) by one node would create a cycle: some path leaves the
    group and comes back."""
    d = to_networkx(g)
    below = set().union(*(nx.descendants(d, i) for i in group)) - group
    above = set().union(*(nx.ancestors(d, i) for i in group)) - group
    return bool(below & above)


def liveness(g: Graph) -> dict:
    """For each value name, ``(defined at, last used at)`` as node indices; graph inputs and state are defined
    at -1 and returned values live to ``len(nodes)``."""
    out = {v.name: [-1, -1] for v in g.inputs}
    out.update({s.name: [-1, -1] for s in g.state})
    for i, n in enumerate(g.nodes):
        for r in n.results:
            out[r.name] = [i, i]
        for v in n.args:
            if v in out:
                out[v][1] = i
    for v in g.outputs + g.state_outputs:
        if v in out:
            out[v][1] = len(g.nodes)
    return {k: (a, b) for k, (a, b) in out.items()}


def to_dot(g: Graph) -> str:
    """DOT text: one box per node labelled with its op, results and source; edges labelled with value names."""
    lines = [f"digraph {json.dumps(g.name)} {{", "  node [shape=box, fontname=monospace];"]
    for v in g.inputs + g.state:
        lines.append(f"  {json.dumps('in:' + v.name)} [shape=ellipse, label={json.dumps(f'%{v.name}: {v.type}')}];")
    index = {}
    for i, n in enumerate(g.nodes):
        label = ", ".join("%" + r.name for r in n.results) + f" = {n.op}"
        if n.source:
            label += "\n" + "\n".join(n.source)
        lines.append(f"  n{i} [label={json.dumps(label)}];")
        index.update({r.name: f"n{i}" for r in n.results})
    for i, n in enumerate(g.nodes):
        for v in dict.fromkeys(n.args):
            src = index.get(v, json.dumps("in:" + v))
            lines.append(f"  {src} -> n{i} [label={json.dumps(v)}];")
    for k, v in enumerate(g.outputs + g.state_outputs):
        lines.append(f"  {index.get(v, json.dumps('in:' + v))} -> {json.dumps(f'out{k}')};")
        lines.append(f"  {json.dumps(f'out{k}')} [shape=ellipse, label={json.dumps('return %' + v)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
