"""The reference backend: every IR op with plain torch, each node through its row's implementation (``run_op``;
the implementations are in ``ir/opdefs.py`` and ``ir/compute.py``). It is the oracle every other backend and every
pass is tested against, so it favours the obvious formulation over speed.

State is functional here: ``kv_cache_write`` returns a new cache tensor and ``run`` returns the final version of
every state. Weights (params and weight expressions) are evaluated once per program, when it is built.
"""

from __future__ import annotations

from typing import Mapping

import torch

from lowerlm.ir.errors import CompileError, InputError
from lowerlm.ir.fold import run_core, run_op
from lowerlm.ir.graph import Graph, Module, Node
from lowerlm.ir.opdefs import OPDEFS, Trait, ops_with
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import Sym, evaluate
from lowerlm.ir.weights import Param, evaluate_weight, tensor_digest, weight_fingerprint

# the ops this backend runs: every row with an implementation, and the weight leaves it evaluates at load time
IMPLEMENTED = frozenset(op for op, d in OPDEFS.items() if d.impl is not None) | ops_with(Trait.WEIGHT)


# ---- programs -----------------------------------------------------------------------------------------------
def bind_symbols(declared, actual, env: dict, what: str) -> None:
    """Bind the symbols of a declared shape to an actual shape; raise InputError on a mismatch."""
    if len(declared) != len(actual):
        raise InputError(f"{what}: expected rank {len(declared)} {list(map(str, declared))}, got {list(actual)}")
    for d, n in zip(declared, actual):
        if isinstance(d, Sym) and len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1 \
                and isinstance(d.terms[0][0][0][0], str) and d.terms[0][0][0][1] == 1:
            name = d.terms[0][0][0][0]
            if env.setdefault(name, n) != n:
                raise InputError(f"{what}: dimension {name} is {env[name]} elsewhere but {n} here")
    for d, n in zip(declared, actual):
        try:
            want = evaluate(d, env)
        except KeyError:
            continue
        if want != n:
            raise InputError(f"{what}: expected shape {list(map(str, declared))}, got {list(actual)}")


class ReferenceProgram:
    """A module ready to run on the reference backend: ``run(graph, inputs, state) -> (outputs, new_state)``. A
    ``Program`` (codegen/program.py)."""

    device = torch.device("cpu")
    device_sampling = False  # the runtime samples on the host

    def __init__(self, module: Module, weights: Mapping[str, torch.Tensor], device=None, lazy: bool = False):
        """``lazy``: evaluate each weight expression (a concatenated q|k|v, …) when it is first read instead of
        now (the ONNX backend reads none when its lowered graphs come from the compile cache)."""
        if device is not None:
            self.device = torch.device(device)
        self.module = module
        self.weights = weights
        missing = [n for n, _ in module.params if n not in weights]
        if missing:
            raise CompileError(f"weights missing for params: {', '.join(missing[:5])}")
        self._param_digests: dict = {}
        self._constants: dict = dict.fromkeys(k for g in module.graphs for k in self._weight_keys(g))
        self._made_constants: dict = {}  # constant nodes' tensors by attributes
        if not lazy:
            for key in self._constants:
                self.constant(key)

    def constant(self, key):
        """The tensor of a weight key (``Param`` or weight expression), evaluated on first use."""
        value = self._constants[key]
        if value is None:
            value = self._constants[key] = evaluate_weight(key, self.weights.__getitem__).to(self.device)
        return value

    @staticmethod
    def _weight_key(node: Node):
        return Param(node.attrs["name"]) if node.op is Op.PARAM else node.attrs["expr"]

    @classmethod
    def _weight_keys(cls, graph: Graph) -> list:
        """The weight keys ``graph`` reads, in order."""
        return [cls._weight_key(n) for n in graph.nodes if n.op in (Op.PARAM, Op.WEIGHT)]

    def param_digest(self, name: str) -> str:
        if name not in self._param_digests:
            self._param_digests[name] = tensor_digest(self.weights[name])
        return self._param_digests[name]

    def weight_fingerprint(self, graph: Graph | None = None) -> str:
        """A digest over every weight the program evaluates, or only those ``graph`` reads (expression structure and
        parameter values)."""
        import hashlib

        keys = self._constants if graph is None else set(self._weight_keys(graph))
        h = hashlib.sha256()
        for key in sorted(keys, key=repr):
            h.update(weight_fingerprint(key, self.param_digest).encode())
        return h.hexdigest()[:16]

    def run(self, graph: str | Graph, inputs: Mapping[str, torch.Tensor] | list,
            state: Mapping[str, torch.Tensor] | None = None, symbols: Mapping[str, int] | None = None,
            inplace: bool = False, observe=None) -> tuple[list, dict]:
        """Run a graph. Shape symbols bind from the inputs' shapes; ``symbols`` gives those that appear only
        inside compound dimensions such as ``(S+1)//2``. With ``inplace`` state writes update the given state
        tensors (the runtime's buffers) instead of copies. ``observe(node, results)`` sees every node's results
        (calibration collects activations with it)."""
        g = self.module.graph(graph) if isinstance(graph, str) else graph
        values, env = bind_inputs(g, inputs, state, symbols, self.device)
        for node in g.nodes:
            args = [values[i] for i in node.args]
            if node.op in (Op.PARAM, Op.WEIGHT):
                out = self.constant(self._weight_key(node))
            else:
                out = self.execute(node, args, env, inplace, values)
            outs = out if isinstance(out, tuple) else (out,)
            if observe is not None:
                observe(node, outs)
            for r, t in zip(node.results, outs):
                values[r.name] = t
        return ([values[o] for o in g.outputs],
                {s.name: values[o] for s, o in zip(g.state, g.state_outputs)})

    def prefill_chunk(self, s: int) -> int | None:
        """Every prompt is prefilled in one call."""
        return None

    def prepare(self) -> None:
        """Nothing to build ahead: weights are evaluated at construction (or on first read when ``lazy``)."""

    def execute(self, node: Node, args: list, env: dict, inplace: bool, values: dict):
        """One node's results from its inputs' values (``values``: every value computed so far, by name)."""
        if node.op is Op.CONSTANT:  # made once, on the program's device
            if node.attrs not in self._made_constants:
                self._made_constants[node.attrs] = run_core(node, [], env).to(self.device)
            return self._made_constants[node.attrs]
        return run_op(node, args, env, inplace)

    def _check(self, name, type_, given: Mapping, env: dict, what: str):
        return check_tensor(name, type_, given, env, what, self.device)


def bind_inputs(g: Graph, inputs, state, symbols, device) -> tuple[dict, dict]:
    """(values by name, symbol bindings) for ``g``'s inputs (a mapping or a list in input order) and state, each
    checked against its declared type and ``device``."""
    if not isinstance(inputs, Mapping):
        inputs = dict(zip((v.name for v in g.inputs), inputs))
    state = state or {}
    env: dict = dict(symbols or {})
    values = {v.name: check_tensor(v.name, v.type, inputs, env, "input", device) for v in g.inputs}
    values.update({s.name: check_tensor(s.name, s.type, state, env, "state", device) for s in g.state})
    unbound = set().union(*(v.type.symbols for v in g.inputs + g.state)) - set(env)
    if unbound:
        raise InputError(f"shape symbols {', '.join(sorted(unbound))} cannot be read off the inputs of graph "
                         f"'{g.name}'; pass symbols={{...}}")
    return values, env


def check_tensor(name, type_, given: Mapping, env: dict, what: str, device) -> torch.Tensor:
    """``given[name]`` checked against its declared type and ``device``; binds the shape's symbols in ``env``."""
    if name not in given:
        raise InputError(f"{what} %{name} ({type_}) was not given")
    t = given[name]
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{what} %{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise InputError(f"{what} %{name} is on {t.device}; this program runs on {device}")
    if t.dtype != type_.dtype.to_torch():
        raise InputError(f"{what} %{name} must have dtype {type_.dtype}, got {t.dtype}")
    bind_symbols(type_.shape, tuple(t.shape), env, f"{what} %{name}")
    return t
