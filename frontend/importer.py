"""Import an exported aten graph into the IR.

Raising comes first: ``raise_norm`` and ``raise_attention`` find RMSNorm, RoPE and attention in the forms the
decomposed graph really has and register, for the aten node that yields the block's result, a builder that emits
the IR op from the block's inputs. Import is then demand-driven from the outputs: only nodes some output needs
are converted, so what a raised block replaced (the mask the model builds for sdpa, its rotary cos/sin) is never
imported. Everything else converts op by op through ``ATEN`` (``frontend/aten.py``); an aten op with no IR
equivalent raises ``UnsupportedOpError`` naming the op and its module path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from lowerlm.frontend.fx import GETITEM, SymbolMap, is_tensor, module_path, op_name, tensor_type
from lowerlm.ir.abi import BATCH, FORWARD, INPUT_IDS, POSITIONS, SEQ, SEQ_LENS
from lowerlm.ir.dtypes import DType
from lowerlm.ir.errors import ShapeError, UnsupportedOpError
from lowerlm.ir.graph import GraphBuilder, Module
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import evaluate
from lowerlm.ir.types import TensorType


@dataclass
class Raised:
    """A block found by a raising pattern: the aten nodes its IR needs and a function that emits the IR (given the
    importer) and returns the IR value standing for the block's result node."""

    deps: list
    build: Callable
    kind: str


def short_name(path: str) -> str:
    """A compact value-name hint from a module path: ``model.layers.3.self_attn.q_proj`` -> ``L3.q_proj``."""
    path = re.sub(r"^model\.", "", path)
    path = re.sub(r"(^|\.)layers\.(\d+)", r"\1L\2", path)
    path = re.sub(r"\.(self_attn|mlp)(?=\.)", "", path)
    return path or "x"


@dataclass
class ExportInfo:
    """What the importer needs to know about an export besides the graph."""

    prefix: str  # the wrapper's attribute holding the model
    example: dict  # user input name -> example tensor
    max_positions: int  # for numeric checks of rotary embeddings and masks
    window_hint: int = 0  # the config's sliding window, so the mask check looks past it


class Importer:
    def __init__(self, ep: torch.export.ExportedProgram, info: ExportInfo):
        self.ep, self.info = ep, info
        self.graph: fx.Graph = ep.graph_module.graph
        self.symbols = SymbolMap()
        self.b = GraphBuilder(FORWARD)
        self.values: dict = {}
        self.params: dict = {}
        self.raised: dict = {}
        self.placeholders: dict = {}  # fx placeholder -> (kind, target)
        self.user_inputs: dict = {}  # user input name -> fx placeholder
        sig = ep.graph_signature
        phs = [n for n in self.graph.nodes if n.op == "placeholder"]
        for node, spec in zip(phs, sig.input_specs):
            self.placeholders[node] = (spec.kind.name, spec.target)
            if spec.kind.name == "USER_INPUT":
                self.user_inputs[spec.arg.name] = node
        self._env_cache: dict = {}

    # ---- example values for numeric checks ----------------------------------------------------------------
    def example_env(self, inputs: dict | None = None) -> dict:
        """Values for every placeholder: weights and buffers from the export, user inputs from ``inputs`` (default:
        the export's example)."""
        if "weights" not in self._env_cache:
            self._env_cache["weights"] = {
                node: self.ep.state_dict[target] if target in self.ep.state_dict else self.ep.constants[target]
                for node, (kind, target) in self.placeholders.items() if kind != "USER_INPUT"}
        inputs = inputs or self.info.example
        env = dict(self._env_cache["weights"])
        env.update({node: inputs[name] for name, node in self.user_inputs.items()})
        return env

    def example_shape(self, node: fx.Node) -> list:
        """The concrete shape of a node's value at the example inputs."""
        ids = self.info.example[INPUT_IDS]
        env = {BATCH: int(ids.shape[0]), SEQ: int(ids.shape[1])}
        return [evaluate(d, env) for d in tensor_type(node, self.symbols).shape]

    @property
    def positions_node(self) -> fx.Node | None:
        return self.user_inputs.get("position_ids")

    # ---- IR building helpers ------------------------------------------------------------------------------
    def path(self, node: fx.Node) -> str:
        return module_path(node, self.info.prefix)

    def param_name(self, node: fx.Node) -> str:
        kind, target = self.placeholders[node]
        return target[len(self.info.prefix) + 1:] if target.startswith(self.info.prefix + ".") else target

    def value(self, node) -> str:
        """The IR value of an fx node; weights become ``param`` nodes at their first use, tensors the model
        creates as constants become ``constant`` nodes holding their values."""
        if node not in self.values and node.op == "placeholder" and self.placeholders[node][0] == "CONSTANT_TENSOR":
            self.values[node] = self._lifted_constant(node)
        if node not in self.values and node.op == "placeholder":
            name = self.param_name(node)
            self.params[name] = tensor_type(node, self.symbols)
            self.values[node] = self.b.add(Op.PARAM, [], {"name": name}, types=[self.params[name]],
                                           name=short_name(name))
        return self.values[node]

    def constant(self, value, dtype: DType, like: str = "c") -> str:
        return self.b.add(Op.CONSTANT, [], {"value": float(value) if dtype.is_float else int(value), "dtype": dtype},
                          name=like)

    def cast(self, v: str, dtype: DType, source=()) -> str:
        if self.b.types[v].dtype == dtype:
            return v
        return self.b.add(Op.CAST, [v], {"dtype": dtype}, name=v + "_" + dtype.value, source=source)

    def emit(self, node: fx.Node, op: Op, inputs, attrs=None, name: str | None = None, **kw):
        path = self.path(node)
        hint = name or (short_name(path) if op in (Op.LINEAR, Op.EMBEDDING, Op.RMS_NORM) else
                        f"{short_name(path)}.{op.value}")
        return self.b.add(op, inputs, attrs, name=hint, source=(path,) if path else (), **kw)

    def _lifted_constant(self, node: fx.Node) -> str:
        from lowerlm.ir.fold import constant_attrs

        tensor = self.ep.constants[self.placeholders[node][1]]
        if tensor.numel() > 65536:
            raise UnsupportedOpError(f"constant tensor of {tensor.numel()} elements", self.path(node),
                                     "register it as a buffer of the module so it is a weight")
        t = tensor_type(node, self.symbols)
        return self.b.add(Op.CONSTANT, [], constant_attrs(tensor, t), types=[t], name="const")

    # ---- the import ---------------------------------------------------------------------------------------
    def add_inputs(self) -> None:
        ids = self.user_inputs[INPUT_IDS]
        shape = ids.meta["val"].shape
        self.symbols.bind(shape[0], BATCH)
        self.symbols.bind(shape[1], SEQ)
        self.values[ids] = self.b.input(INPUT_IDS, tensor_type(ids, self.symbols))
        pos_t = TensorType(DType.I64, self.symbols.shape(shape))
        pos = self.positions_node
        self.positions = self.b.input(POSITIONS, pos_t)
        if pos is not None:
            self.values[pos] = self.positions if pos.meta["val"].dtype == torch.int64 else \
                self.cast(self.positions, DType.from_torch(pos.meta["val"].dtype))
        self.seq_lens = self.b.input(SEQ_LENS, TensorType(DType.I32, (self.symbols.dim(shape[0]),)))

    def needed(self) -> set:
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        need: set = set()
        stack = [a for a in out_node.all_input_nodes]
        while stack:
            n = stack.pop()
            if n in need:
                continue
            need.add(n)
            if n in self.raised:
                stack.extend(self.raised[n].deps)
            elif n.op == "call_function" and n.target is GETITEM:
                stack.append(n.args[0])
            elif n.op == "call_function":
                stack.extend(a for a in n.all_input_nodes if is_tensor(a) or _is_multi(a))
        return need

    def run(self) -> Module:
        from lowerlm.frontend.aten import convert
        from lowerlm.frontend.raise_attention import raise_attention
        from lowerlm.frontend.raise_norm import raise_rms_norm
        from lowerlm.frontend.raise_positions import raise_positions

        self.add_inputs()
        self.raised.update(raise_rms_norm(self))
        self.raised.update(raise_attention(self))
        self.raised.update(raise_positions(self))
        need = self.needed()
        for node in self.graph.nodes:
            if node not in need or node in self.values:
                continue
            if node.op == "placeholder":
                continue  # weights: at first use, in value()
            if node in self.raised:
                self.values[node] = self.raised[node].build(self)
            elif node.target is GETITEM:
                self.values[node] = self.values[node.args[0]][node.args[1]]
            else:
                try:
                    self.values[node] = convert(self, node)
                except ShapeError as e:  # an IR rule refused what torch accepted: say where in the model
                    raise UnsupportedOpError(op_name(node), self.path(node), f"its operands do not fit the IR op "
                                             f"({e}); capture the module or report it") from None
                self._check_type(node)
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        outputs = [self.values[a] for a in out_node.args[0]]
        graph = self.b.build(outputs)
        return Module.of([graph], self.params)

    def _check_type(self, node: fx.Node) -> None:
        v = self.values[node]
        if not isinstance(v, str) or not is_tensor(node):
            return
        want = tensor_type(node, self.symbols)
        got = self.b.types[v]
        if got.dtype != want.dtype:
            self.values[node] = v = self.cast(v, want.dtype, source=(self.path(node),))
            got = self.b.types[v]
        if got.shape != want.shape:
            raise UnsupportedOpError(op_name(node), self.path(node),
                                     f"imported as {got} but torch.export says {want} (an importer bug: report it)")


def _is_multi(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), (tuple, list))


def import_program(ep: torch.export.ExportedProgram, info: ExportInfo) -> Module:
    """The IR module (one ``forward`` graph) for an exported program."""
    return Importer(ep, info).run()
