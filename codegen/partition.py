"""Op-level partitioning of a graph between backends (``backend="auto"``).

Every node goes to the first backend that can run it; consecutive work for the same backend is grouped into as few
partitions as the dependencies allow, and each partition becomes a graph of its own:

- params and weight expressions are copied into every partition that reads them (they are not values to hand
  over);
- a value another partition needs is an output of the partition defining it and an input of the reader;
- a state version that a partition overwrites is declared state of that partition (updated in place by the
  backend that runs it); a version it only reads is a plain input.

In-place state adds one constraint beyond data dependencies: a writer runs no earlier than every reader of the
version it overwrites (the verifier guarantees those readers come first in the graph's order).

A value crossing between partitions whose devices differ is one copy per run; ``Plan.copies`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowerlm.ir.errors import CompileError
from lowerlm.ir.graph import Graph
from lowerlm.ir.opdefs import OPDEFS
from lowerlm.ir.ops import Op
from lowerlm.ir.types import KV, StateSpec, Value

FREE = (Op.PARAM, Op.WEIGHT)  # copied into each partition that reads them


@dataclass
class Partition:
    backend: str
    nodes: list = field(default_factory=list)  # the graph's nodes in order, free nodes excluded
    reasons: dict = field(default_factory=dict)  # node name -> why the preferred backend does not run it
    graph: Graph | None = None  # built by ``build``
    device: str = ""


@dataclass
class Plan:
    graph: Graph
    parts: list  # Partition, in execution order
    copies: list = field(default_factory=list)  # (value, from device, to device, TensorType)

    @property
    def whole(self) -> bool:
        """One partition covering the graph: it runs as is."""
        return len(self.parts) == 1


def _state_roots(g: Graph) -> dict:
    """State version name -> the graph state it descends from."""
    roots = {s.name: s.name for s in g.state}
    for n in g.nodes:
        for i, r in OPDEFS[n.op].writes.items() if n.op in OPDEFS else ():
            if n.inputs[i] in roots:
                roots[n.results[r].name] = roots[n.inputs[i]]
    return roots


def assign(g: Graph, backends: list, reason) -> Plan:
    """Partitions of ``g``: ``reason(backend, node)`` is None when ``backend`` runs ``node``, else why not;
    the last backend must run everything."""
    parts: list = []
    where: dict = {}  # value name -> partition index defining it
    readers: dict = {}  # state version -> partition indices reading it
    roots = _state_roots(g)
    for node in g.nodes:
        if node.op in FREE:
            continue
        backend, why = backends[-1], {}
        for b in backends[:-1]:
            r = reason(b, node)
            if r is None:
                backend = b
                break
            why[b] = r
        lo = max((where.get(v, 0) for v in node.args), default=0)
        d = OPDEFS.get(node.op)
        writes = d.writes if d else {}
        for i in writes:  # anti-dependency: overwrite a version only after everything reading it ran
            lo = max([lo] + readers.get(node.inputs[i], []))
        index = next((i for i in range(lo, len(parts)) if parts[i].backend == backend), None)
        if index is None:
            parts.append(Partition(backend))
            index = len(parts) - 1
        parts[index].nodes.append(node)
        if why:
            parts[index].reasons[node.name] = "; ".join(why.values())
        for r in node.results:
            where[r.name] = index
        for v in node.args:
            if v in roots:
                readers.setdefault(v, []).append(index)
    if not parts:
        parts.append(Partition(backends[-1]))
    return Plan(g, parts)


def _interface(g: Graph, p: Partition, roots: dict, located: dict, copies: list) -> tuple:
    """(state, state outputs, inputs, free nodes) of partition ``p``: a state version its writers consume (and the
    last version they make), the values it reads from elsewhere (a copy recorded where ``located`` puts one on
    another device), and the free leaves it recomputes rather than reads."""
    producers = g.producers
    specs = {s.name: s for s in g.state}
    defined = {r.name for n in p.nodes for r in n.results}
    # version a writer in this partition consumes -> the version it makes
    successor = {n.inputs[k]: n.results[r].name for n in p.nodes
                 for k, r in (OPDEFS[n.op].writes.items() if n.op in OPDEFS else ())}
    state, state_out, inputs, free = [], [], [], {}
    seen = set(defined)
    for n in p.nodes:
        for v in n.args:
            src = producers.get(v)
            if src is not None and src.op in FREE:
                free.setdefault(v, src)
                continue
            if v in seen:
                continue
            seen.add(v)
            if v in successor and v in roots:
                root = specs.get(roots[v])
                state.append(StateSpec(v, g.type_of(v), root.owner if root else "", root.kind if root else KV))
                last = v
                while last in successor:  # follow the chain through this partition's writers
                    last = successor[last]
                state_out.append(last)
            else:
                inputs.append(Value(v, g.type_of(v)))
                if located.get(v, p.device) != p.device:
                    copies.append((v, located[v], p.device, g.type_of(v)))
    return state, state_out, inputs, free


def build(plan: Plan, devices: dict) -> Plan:
    """Each partition's graph (named ``<graph>.p<i>``) and device; the cross-device copies."""
    g = plan.graph
    roots = _state_roots(g)
    producers = g.producers
    home = str(devices.get("", "cpu"))  # where the caller's inputs and state live
    located: dict = {v.name: home for v in g.inputs}
    located.update({s.name: home for s in g.state})
    part_of = {r.name: i for i, p in enumerate(plan.parts) for n in p.nodes for r in n.results}
    needed_later = {v for i, p in enumerate(plan.parts) for n in p.nodes for v in n.args  # read by another part
                    if v in part_of and producers[v].op not in FREE and part_of[v] != i}
    final = set(g.outputs) | set(g.state_outputs)
    order = {n: i for i, n in enumerate(g.nodes)}
    plan.copies = []
    for i, p in enumerate(plan.parts):
        p.device = str(devices[p.backend])
        if plan.whole:
            p.graph = g
            continue
        state, state_out, inputs, free = _interface(g, p, roots, located, plan.copies)
        returned = set(state_out)
        outputs = [r.name for n in p.nodes for r in n.results
                   if r.name not in returned and (r.name in needed_later or r.name in final)]
        for v in outputs:
            located[v] = p.device
        for v in state_out:
            located[v] = p.device
        nodes = sorted(free.values(), key=order.__getitem__) + p.nodes
        if state and p.device != home:
            raise CompileError(f"partition {i} of graph '{g.name}' would update state on {p.device}, but the "
                               f"state buffers live on {home}")
        p.graph = Graph(f"{g.name}.p{i}", tuple(inputs), tuple(state), tuple(nodes), tuple(outputs),
                        tuple(state_out))
    for v in list(g.outputs) + list(g.state_outputs):
        if located.get(v, home) != home:
            plan.copies.append((v, located[v], home, g.type_of(v)))
    return plan


def describe(plan: Plan) -> list:
    """Lines for dump-ir: one per partition, then the copies."""
    g = plan.graph
    lines = [f"{g.name}: {len(plan.parts)} partition{'s' * (len(plan.parts) != 1)}, "
             f"{len(plan.copies)} cross-device cop{'ies' if len(plan.copies) != 1 else 'y'} per run"]
    for p in plan.parts:
        names = [n.name for n in p.nodes]
        span = f"%{names[0]} .. %{names[-1]}" if len(names) > 1 else (f"%{names[0]}" if names else "empty")
        ops = sorted({str(n.op) for n in p.nodes if n.name in p.reasons})
        count = f"{len(names)} node{'s' * (len(names) != 1)}"
        line = f"  {p.graph.name if p.graph else '?'}: {p.backend} on {p.device}, {count} ({span})"
        if p.graph is not None and p.graph is not g:
            line += f"; in {len(p.graph.inputs) + len(p.graph.state)}, out {len(p.graph.outputs)}"
        if ops:
            first = next(iter(p.reasons.values()))
            line += f"; fallback for {', '.join(ops)}: {first}"
        lines.append(line)
    for v, src, dst, t in plan.copies:
        lines.append(f"  copy %{v} {t}: {src} -> {dst}")
    return lines

