"""``OnnxProgram``: each graph of a module lowered to one ONNX model and run by ONNX Runtime (CPU).

Inputs and state are bound to ONNX Runtime with IO binding straight from the torch tensors' memory; when the
runtime runs in place, each state output is bound to its input's buffer, so TensorScatter writes the new cache
entries into the runtime's buffer and nothing is copied per token.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch

from lowerlm.codegen.reference import ReferenceProgram, bind_symbols
from lowerlm.ir.abi import POSITIONS, PREFILL, SEQ_LENS
from lowerlm.ir.errors import CompileError, InputError
from lowerlm.ir.graph import Node

PREFILL_CHUNKS = 4  # a long prompt's prefill in this many calls (prefill_chunk)
MIN_PREFILL_CHUNK = 128


def providers() -> list:
    """ONNX Runtime's CUDA provider when the installed package has it (onnxruntime-gpu), then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


AUTO_HINT = "; backend='auto' runs such ops on the reference backend and the rest on ONNX"


def _rank_threads() -> int | None:
    """In a tensor-parallel rank, its share of the cores (torch's thread count: ``launch`` sets it, a torchrun
    script may): ONNX Runtime's default of one thread per core in every rank oversubscribes the cores, and the idle
    threads of one rank's pool spin while its peer computes. None elsewhere (ONNX Runtime's default)."""
    import torch
    import torch.distributed as dist

    return torch.get_num_threads() if dist.is_available() and dist.is_initialized() else None


class OnnxProgram(ReferenceProgram):
    """A module ready to run with ONNX Runtime: ``run(graph, inputs, state, inplace=True)``; sessions are built
    on a graph's first run."""

    def __init__(self, module, weights, threads: int | None = None, weight_bits: int | None = None,
                 cache: bool = True, progress: Callable[[str], None] | None = None):
        """``cache``: keep lowered graphs in the compile cache (codegen/onnx/cache.py) and reuse them.
        ``progress(message)``: told when a graph is lowered (seconds for SmolLM2), not when it comes from the cache,
        and when another process is lowering the same graph."""
        super().__init__(module, weights, lazy=True)  # a graph from the compile cache reads no weight here
        if weight_bits not in (None, 4, 8):
            raise CompileError(f"weight_bits must be 4 or 8 (or None for the model's own precision), got "
                               f"{weight_bits}")
        from lowerlm.codegen.onnx.quantize import Packer

        self.threads = threads
        self.weight_bits = weight_bits
        self.cache = cache
        self.progress = progress
        # weights already on a 4-bit grid (a Q4 GGUF's) run as exact 4-bit MatMulNBits; weight_bits=4 puts all there
        self.packer = Packer(exact=weight_bits != 4)
        self._check_lowerable()
        self._sessions: dict = {}
        self._bindings: dict = {}  # graph -> (state buffers' key, (IOBinding, state, OrtValues))
        self._chunks: dict = {}  # graph -> its attention takes runs of positions p0..p0+S-1 (_check_chunk)

    def prefill_chunk(self, s: int) -> int | None:
        """Tokens per ``prefill`` call for prompts ``s`` tokens wide (runtime/generate.py), or None for one call.

        ONNX Runtime's CPU GroupQueryAttention computes every query against every key of its call and masks the
        future afterwards: a prompt in C-token chunks (each continuing the cache; ORT takes those at batch 1 only,
        so the runtime prefills such prompts one at a time) computes about (1 + C/S)/2 of that. Four chunks of at
        least 128 tokens were the fastest on a 2-core CPU with SmolLM2 (one-off, 512 to 2048 tokens, against 2, 3
        and 8; BENCHMARKS.md); shorter prompts run whole."""
        if PREFILL not in [g.name for g in self.module.graphs]:
            return None
        self.session(PREFILL)
        if not self._chunks[PREFILL] or s < 2 * MIN_PREFILL_CHUNK:
            return None
        return max(MIN_PREFILL_CHUNK, -(-s // PREFILL_CHUNKS))

    def prepare(self) -> None:
        """Build every graph's session now (lowering + ONNX Runtime's optimisation take seconds for SmolLM2)."""
        for g in self.module.graphs:
            self.session(g.name)

    def _constant(self, node: Node):
        return self.constant(self._weight_key(node))

    def session(self, name: str):
        if name not in self._sessions:
            g = self.module.graph(name)
            model, source, hit = self._model(g)
            try:
                session = self._open(source)
            except Exception as e:  # a cached file ONNX Runtime cannot load is rebuilt
                if not hit:
                    raise
                from lowerlm.codegen.onnx import cache

                cache.discard(source, e)
                model, source, _ = self._model(g)  # lowered and written again
                session = self._open(source)
            self._sessions[name] = session
            positions = next((v for v in g.inputs if v.name == POSITIONS), None)
            # GroupQueryAttention over more than one token takes runs of positions (lower.py, _check_chunk)
            self._chunks[name] = positions is not None and positions.type.shape[-1] != 1 and \
                any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
        return self._sessions[name]

    def _check_lowerable(self) -> None:
        """Refuse now, when the program is built, a node the lowering table does not take (not at its graph's
        first run): the table's answer is a lookup (``lower.unsupported``)."""
        from lowerlm.codegen.onnx.lower import unsupported

        for g in self.module.graphs:
            reason = unsupported(g)
            why = next((why for n in g.nodes if (why := reason(n)) is not None), None)
            if why is not None:
                raise CompileError(f"{why} (graph '{g.name}'){AUTO_HINT}")

    def _lower(self, g):
        from lowerlm.codegen.onnx.lower import lower_graph

        try:
            return lower_graph(g, self._constant, weight_bits=self.weight_bits, packer=self.packer)
        except CompileError as e:
            raise CompileError(f"{e} (graph '{g.name}'){AUTO_HINT}") from e

    def _model(self, g):
        """(the graph's ONNX model, what ONNX Runtime opens: its file in the compile cache or its bytes, whether it
        came from the cache). A missing or damaged entry is lowered under the entry's lock: a process that finds
        another lowering the same graph waits for it and loads its entry."""
        if not self.cache:
            model = self._lower_reported(g)
            return model, model.SerializeToString(), False
        from lowerlm.codegen.onnx import cache
        from lowerlm.ir.cache import file_lock

        key = cache.graph_key(g, self.weight_fingerprint(g), {"weight_bits": self.weight_bits,
                                                              "exact": self.packer.exact})
        hit = cache.lookup(key)  # the warm path takes no lock
        if hit is None:
            wait = (lambda: self.progress(f"waiting for another process lowering graph {g.name}")) \
                if self.progress else None
            with file_lock(cache.lock_path(key), on_wait=wait):
                hit = cache.load(key)  # again, reporting a damaged entry: another process may have stored it
                if hit is None:
                    model = self._lower_reported(g)
                    try:
                        return model, str(cache.store(key, model)), False
                    except OSError as e:
                        warnings.warn(f"lowerlm: cannot write the ONNX compile cache ({e}); compiling without it",
                                      stacklevel=3)
                        return model, model.SerializeToString(), False
        return hit[1], str(hit[0]), True

    def _lower_reported(self, g):
        if self.progress:
            self.progress(f"lowering graph {g.name} for ONNX Runtime")
        return self._lower(g)

    def _open(self, source):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = self.threads or _rank_threads()
        if threads:
            options.intra_op_num_threads = threads
        return ort.InferenceSession(source, options, providers=providers())

    def run(self, graph, inputs, state=None, symbols=None, inplace=False, observe=None):
        g = self.module.graph(graph) if isinstance(graph, str) else graph
        if observe is not None or not isinstance(graph, str):
            return super().run(graph, inputs, state, symbols, inplace, observe)
        if not isinstance(inputs, dict):
            inputs = dict(zip((v.name for v in g.inputs), inputs))
        state = state or {}
        env = dict(symbols or {})
        session = self.session(g.name)
        if self._chunks[g.name]:
            self._check_chunk(g.name, torch.as_tensor(inputs[POSITIONS]), torch.as_tensor(inputs[SEQ_LENS]))
        # the state buffers are the runtime's, allocated once: their binding is made once and reused, so a decode
        # step only rebinds its three small inputs
        key = (inplace, tuple((n, t.data_ptr(), tuple(t.shape)) for n, t in sorted(state.items())))
        cached = self._bindings.get(g.name)
        if cached is None or cached[0] != key:
            binding = session.io_binding()
            for o in g.outputs:  # first: copy_outputs_to_cpu returns outputs in binding order
                binding.bind_output(o, "cpu")
            new_state, keep = {}, []
            for s in g.state:
                buf = self._check(s.name, s.type, state, env, "state")
                if inplace and not buf.is_contiguous():
                    raise ValueError(f"state %{s.name} must be contiguous to be updated in place")
                src = buf if inplace else buf.clone()
                # one OrtValue over the tensor's memory, bound as input and output: the cache writes land in
                # place instead of copying the cache
                value = self._ortvalue(src)
                binding.bind_ortvalue_input(s.name, value)
                binding.bind_ortvalue_output(s.name + ".out", value)
                keep.append(value)
                new_state[s.name] = src
            binding_entry = (binding, new_state, keep)
            if inplace:  # one binding per graph is kept (the runtime's buffers); a functional call's is not
                self._bindings[g.name] = (key, binding_entry)
        else:
            binding_entry = cached[1]
            for s in g.state:  # symbols (B, T) still have to come from somewhere for the input checks
                bind_symbols(s.type.shape, tuple(state[s.name].shape), env, f"state %{s.name}")
        binding, new_state, _ = binding_entry
        keep_inputs = [self._bind(binding.bind_input, v.name, self._check(v.name, v.type, inputs, env, "input"))
                       for v in g.inputs]
        for o in g.outputs:  # shapes change between calls: let ONNX Runtime allocate them afresh
            binding.bind_output(o, "cpu")
        session.run_with_iobinding(binding)
        del keep_inputs
        # only the graph outputs are read back (the state outputs are the runtime's buffers already)
        outputs = [torch.from_numpy(v.numpy()) for v in binding.get_outputs()[:len(g.outputs)]]
        return outputs, dict(new_state)

    @staticmethod
    def _check_chunk(name: str, positions: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """GroupQueryAttention derives positions from lengths: a prefill runs p0..p0+S-1 in every row, from p0 = 0
        (a first prompt, rows of any length) or continuing the cache with every row p0 + S long."""
        s = positions.shape[-1]
        p0 = int(positions[0, 0]) if positions.numel() else 0
        if not torch.equal(positions, torch.arange(p0, p0 + s).expand_as(positions)):
            raise InputError(f"graph '{name}' on the ONNX backend runs positions p0..p0+S-1, the same in every row; "
                             f"got rows starting at {positions[:, 0].tolist()}")
        if p0 and not bool((seq_lens == p0 + s).all()):
            raise InputError(f"graph '{name}' on the ONNX backend continues a cache only with every row full: "
                             f"seq_lens must all be {p0 + s} for positions {p0}..{p0 + s - 1}, got "
                             f"{seq_lens.tolist()}")

    @staticmethod
    def _ortvalue(tensor: torch.Tensor):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(tensor.numpy())  # shares the memory on the CPU

    @staticmethod
    def _bind(bind, name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        bind(name, "cpu", 0, _NP_DTYPE[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        return tensor


_NP_DTYPE = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
             torch.bool: np.bool_}
