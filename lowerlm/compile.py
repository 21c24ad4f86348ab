"""``lowerlm.compile_model``: trace a model, run the pass pipeline, build a program on a backend, and wrap it with
the runtime (logits for a batch, or streamed generation)."""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from typing import Callable, Iterator

import torch

from lowerlm.codegen.program import BACKENDS as BACKENDS  # the registry's names, re-exported
from lowerlm.codegen.program import DEFAULT_MAX_SEQ_LEN, build_program, check_backend, fusing_backend, preferred
from lowerlm.errors import CompileError, InputError
from lowerlm.frontend import sparse_attention
from lowerlm.ir.abi import BATCH, CACHE_LEN, DECODE, FORWARD, INPUT_IDS, LOGIT_INDEX, POSITIONS, PREFILL, SEQ_LENS
from lowerlm.ir.dtypes import DType
from lowerlm.ir.graph import Module
from lowerlm.ir.ops import Op
from lowerlm.ir.printer import print_module
from lowerlm.passes import PassRecord, dump_header, run_pipeline
from lowerlm.runtime.generate import Generator, allocate_state, check_skipped, selects_logits
from lowerlm.runtime.sampler import Sampling
from lowerlm.runtime.text import StreamDecoder, encode


class CompiledModel:
    """A compiled model: ``cm(input_ids)`` gives the logits ``model(input_ids).logits`` would; ``cm.generate``
    streams text."""

    def __init__(self, imported: Module, records: list, weights: dict, program, vocab_size: int | None,
                 max_seq_len: int, max_batch: int, tokenizer=None, stop_ids=(), logits_dtype=None,
                 position_table: tuple | None = None, skip_token: int | None = None,
                 context_limit: tuple | None = None):
        self.imported = imported
        self.records = records  # one PassRecord per pass, in order
        self.weights = weights
        self.program = program
        self.vocab_size = vocab_size
        self.max_seq_len, self.max_batch = max_seq_len, max_batch
        self.tokenizer = tokenizer
        self.stop_ids = tuple(stop_ids)
        self._generator: Generator | None = None
        self._stateless = None  # reference program for logits at arbitrary positions, built on first use
        self.logits_dtype = logits_dtype  # what ``cm(input_ids)`` returns (the model's own, when auto upcast it)
        self.position_table = position_table  # (name, rows) of a learned position embedding, or None
        self.skip_token = skip_token  # the padding token the model's position numbering skips, or None
        self.context_limit = context_limit  # (what, tokens): the most keys lowerlm computes exactly, or None

    @property
    def ir(self) -> Module:
        """The final IR."""
        return self.records[-1].module if self.records else self.imported

    def stages(self) -> list:
        """(header, module) for the import and after each pass."""
        return [("// imported", self.imported)] + [(dump_header(r), r.module) for r in self.records]

    def dump(self, after: str = "all", file=None) -> None:
        """Print the IR as imported and after each pass (``after="all"``), as imported (``"none"``) or after one
        pass that ran; any other name is an ``InputError`` listing the choices (printing nothing would look like an
        empty stage)."""
        ran = [r.name for r in self.records]
        if after not in ("all", "none") and after not in ran:
            from lowerlm.passes import PASSES, PIPELINE

            known = after in dict(PIPELINE) or after in PASSES  # a tail pass runs only for its backend
            why = "did not run in this compile" if known else "is not a pass"
            raise InputError(f"dump(after={after!r}): '{after}' {why}; give 'all', 'none' (as imported) or one of the "
                             f"passes that ran: {', '.join(ran) or 'none ran'}")
        for header, module in self.stages():
            name = header.split()[2] if header.startswith("// after ") else "none"
            if after in ("all", name):
                print(header, file=file or sys.stdout)
                print(print_module(module), file=file or sys.stdout)

    # ---- logits ---------------------------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        logits = self._logits(input_ids, attention_mask, position_ids)
        return logits if self.logits_dtype is None else logits.to(self.logits_dtype)

    def _logits(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        ids, positions, seq_lens = self.prepare(input_ids, attention_mask, position_ids)
        inputs = {INPUT_IDS: ids, POSITIONS: positions, SEQ_LENS: seq_lens}
        names = [g.name for g in self.ir.graphs]
        from_zero = torch.equal(positions, torch.arange(ids.shape[1]).expand_as(positions))
        dev = self.program.device
        on_device = {k: v.to(dev) for k, v in inputs.items()}
        if PREFILL in names and from_zero:
            # a prefill into a fresh cache just long enough for this call
            state = allocate_state(self.ir, ids.shape[0], ids.shape[1], dev)
            if selects_logits(self.ir):  # every row's logits
                on_device[LOGIT_INDEX] = torch.arange(ids.shape[1], device=dev).repeat(ids.shape[0], 1)
            (logits,), _ = self.program.run(PREFILL, on_device, state, inplace=True)
            return logits
        if FORWARD in names and not self.ir.graph(FORWARD).state:
            return self.program.run(FORWARD, on_device)[0][0]
        # positions that do not start at 0 are cache slots in the compiled graphs: run the last graph that
        # still attends within the call (before insert_state) on the reference backend
        return self._stateless_program().run(FORWARD, inputs)[0][0]

    def _stateless_program(self):
        if self._stateless is None:
            module = next(m for _, m in reversed(self.stages())
                          if [g.name for g in m.graphs] == [FORWARD] and not m.graphs[0].state)
            self._stateless = build_program("reference", module, self.weights)
        return self._stateless

    def prepare(self, input_ids, attention_mask=None, position_ids=None):
        """Check inputs and derive ``positions`` and ``seq_lens`` (right padding only)."""
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise InputError(f"input_ids must be [batch, seq] with seq >= 1, got shape {list(input_ids.shape)}")
        ids = input_ids.long()
        if self.vocab_size is not None and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0].item()
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        b, s = ids.shape
        if attention_mask is None:
            seq_lens = torch.full((b,), s, dtype=torch.int32)
        else:
            mask = torch.as_tensor(attention_mask).bool()
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
            seq_lens = mask.sum(-1).to(torch.int32)
            if not torch.equal(mask, torch.arange(s)[None] < seq_lens[:, None]):
                raise InputError("attention_mask must be right-padded (ones, then zeros) in every row")
        if self.skip_token is not None:
            if position_ids is not None:
                raise InputError("this model numbers positions from its input_ids (from padding_idx + 1, skipping "
                                 "padding tokens), which lowerlm models; call it without position_ids")
            check_skipped([row[:n] for row, n in zip(ids.tolist(), seq_lens.tolist())], self.skip_token)
        positions = torch.arange(s).repeat(b, 1) if position_ids is None else torch.as_tensor(position_ids).long()
        if positions.shape != ids.shape:
            raise InputError(f"position_ids shape {list(positions.shape)} differs from input_ids {list(ids.shape)}")
        if positions.min() < 0:
            raise InputError("position_ids must be >= 0")
        if self.position_table is not None and positions.max() >= self.position_table[1]:
            name, rows = self.position_table
            raise InputError(f"position {positions.max().item()} is past the {rows} positions of the model's position "
                             f"embedding '{name}'")
        if self.context_limit is not None and positions.max() >= self.context_limit[1]:
            what, tokens = self.context_limit
            raise InputError(f"position {positions.max().item()} is past the {tokens} tokens {what} lets lowerlm "
                             "compute exactly")
        return ids, positions, seq_lens

    # ---- generation -----------------------------------------------------------------------------------------
    @property
    def generator(self) -> Generator:
        if self._generator is None:
            if DECODE not in [g.name for g in self.ir.graphs]:
                raise CompileError("generation needs the insert_state and specialize passes")
            self._generator = Generator(self.program, self.ir, self.max_seq_len, self.max_batch, self.vocab_size,
                                        self.skip_token)
        return self._generator

    def generate_ids(self, prompts: list, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0, stop_ids=None) -> Iterator[list]:
        """Token-level generation for a batch of token-id prompts: yields, per step, each sequence's new token
        (None once it stopped)."""
        sampling = Sampling(temperature, top_k, top_p, seed)
        stop = self.stop_ids if stop_ids is None else tuple(stop_ids)
        return self.generator.generate([list(map(int, p)) for p in prompts], max_new_tokens, sampling, stop)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stream: bool = True, chat: bool = True, stop_ids=None):
        """Generate text. ``prompt``: a string (through the chat template when ``chat`` and the tokenizer has one)
        or a list of strings (a batch; returns their texts). A single string streams text pieces when ``stream``,
        else returns the whole text."""
        if isinstance(prompt, (list, tuple)):
            ids = [encode(self.tokenizer, p, chat) for p in prompt]
            steps = list(self.generate_ids(ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids))
            return [self._text([s[i] for s in steps]) for i in range(len(ids))]
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        pieces = self._stream(encode(self.tokenizer, prompt, chat), max_new_tokens, temperature, top_k, top_p,
                              seed, stop_ids)
        return pieces if stream else "".join(pieces)

    def _stream(self, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids) -> Iterator[str]:
        steps = self.generate_ids([ids], max_new_tokens, temperature, top_k, top_p, seed, stop_ids)
        decoder = StreamDecoder(self.tokenizer)
        for (token,) in steps:
            if token is None:
                break
            piece = decoder.push(token)
            if piece:
                yield piece

    def _text(self, tokens: list) -> str:
        return self.tokenizer.decode([t for t in tokens if t is not None], skip_special_tokens=True)


def model_weights(model: torch.nn.Module) -> dict:
    """Parameters and buffers by name (tied weights under every name)."""
    out = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    out.update({n: b.detach() for n, b in model.named_buffers(remove_duplicate=False)})
    return out


def stop_token_ids(model, tokenizer) -> list:
    """End-of-sequence ids from the generation config, the config and the tokenizer."""
    ids: list = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        for t in eos if isinstance(eos, (list, tuple)) else [eos]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return ids


def position_table(module: Module) -> tuple[str, int] | None:
    """The learned position embedding (parameter, positions it has rows for) the positions input is looked up in,
    if any -- directly or offset by a constant (TrOCR's rows start at padding_idx + 1): positions past its last
    row do not exist."""
    g = module.graphs[0]
    for node in g.nodes:
        if node.op is not Op.EMBEDDING:
            continue
        offset, index = 0, g.producer(node.inputs[1])
        if index is not None and _skipping(g, index) is not None:  # RoBERTa's: positions + c, padding skipped
            index = g.producer(index.inputs[2])
        if index is not None and index.op is Op.ADD and index.inputs[0] == POSITIONS:  # rows from positions + c
            c = g.producer(index.inputs[1])
            if c is None or c.op is not Op.CONSTANT or not isinstance(c.attrs["value"], int):
                continue
            offset = c.attrs["value"]
        elif node.inputs[1] != POSITIONS:
            continue
        table = g.producer(node.inputs[0])
        name = table.attrs["name"] if table is not None and table.op is Op.PARAM else node.inputs[0]
        return name, int(g.type_of(node.inputs[0]).shape[0]) - offset
    return None


def _constant(g, value):
    node = g.producer(value)
    return node.attrs["value"] if node is not None and node.op is Op.CONSTANT else None


def _skipping(g, node) -> int | None:
    """t when ``node`` is ``where(input_ids == t, t, positions + t + 1)`` (frontend/export.py's
    ``skipping_positions``), else None."""
    if node.op is not Op.WHERE:
        return None
    cond, then, other = (g.producer(v) for v in node.inputs)
    if cond is None or cond.op is not Op.COMPARE or cond.attrs.get("pred") != "eq" or cond.inputs[0] != INPUT_IDS:
        return None
    t = _constant(g, cond.inputs[1])
    ok = isinstance(t, int) and then is not None and _constant(g, node.inputs[1]) == t and other is not None and \
        other.op is Op.ADD and other.inputs[0] == POSITIONS and _constant(g, other.inputs[1]) == t + 1
    return t if ok else None


def skipped_token(module: Module) -> int | None:
    """The padding token a RoBERTa-style model's own position numbering skips (the frontend numbers its positions
    so), or None."""
    g = module.graphs[0]
    return next((t for node in g.nodes if (t := _skipping(g, node)) is not None), None)


def rank_digests(model: torch.nn.Module, captures, options: dict) -> dict:
    """What every rank of tp must agree on (runtime/distributed.py's ``agree``): the model (its classes' source,
    config and parameter shapes: the trace key), its weights (a strided sample of each parameter's values: another
    checkpoint of the same architecture differs there) and the compile options."""
    from lowerlm.frontend.trace import trace_key

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)].double()
            h.update(f"{name}:{float(sample.sum())!r}:{float(sample.abs().sum())!r};".encode())
    return {"model structure or config": trace_key(model, captures), "weights": h.hexdigest(),
            "compile options": repr(sorted(options.items()))}


def tp_rank(tp: int) -> tuple | None:
    """(rank, world) of this process for ``tp`` ranks, or None for tp = 1: torch.distributed's default group must
    hold exactly ``tp`` ranks (torchrun, or ``lowerlm generate --tp``)."""
    if not isinstance(tp, int) or tp < 1:
        raise CompileError(f"tp must be a positive integer, got {tp!r}")
    if tp == 1:
        return None
    import torch.distributed as dist

    from lowerlm.runtime.distributed import init_from_env

    init_from_env(tp)  # under torchrun, from its variables, when the script did not
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != tp:
        have = f"{dist.get_world_size()} ranks" if dist.is_available() and dist.is_initialized() else "none"
        raise CompileError(f"tp={tp} needs torch.distributed initialized with {tp} ranks (here: {have}): run the "
                           f"script under `torchrun --nproc-per-node {tp}`")
    return dist.get_rank(), tp


def fit_max_seq_len(table: tuple | None, max_seq_len: int | None, limit: tuple | None = None) -> int:
    """``max_seq_len``, by default 2048, or fewer: the rows of the learned position ``table``
    (``position_table``) and the context ``limit`` (what, tokens: frontend/sparse_attention.py's
    ``context_limit``); more than either is refused."""
    if limit is not None and max_seq_len is not None and max_seq_len > limit[1]:
        raise CompileError(f"max_seq_len {max_seq_len} is more than the {limit[1]} tokens {limit[0]} lets lowerlm "
                           f"compute exactly (dense attention up to there; the sparse selection beyond has no IR "
                           f"form); pass max_seq_len={limit[1]} or less")
    if max_seq_len is None:
        limits = [DEFAULT_MAX_SEQ_LEN] + [t[1] for t in (table, limit) if t]
        return min(limits)
    if table is not None and max_seq_len > table[1]:
        raise CompileError(f"max_seq_len {max_seq_len} is more than the {table[1]} positions of the model's "
                           f"position embedding '{table[0]}'; pass max_seq_len={table[1]} or less")
    return max_seq_len


def state_bytes(module: Module, max_batch: int, max_seq_len: int) -> int:
    """Bytes of the state buffers ``allocate_state`` would allocate (the KV caches)."""
    from lowerlm.ir.shapes import evaluate

    env = {BATCH: max_batch, CACHE_LEN: max_seq_len}
    total = 0
    for spec in module.state_specs.values():
        n = 1
        for d in spec.type.shape:
            n *= evaluate(d, env)
        total += n * spec.type.dtype.itemsize
    return total


def memory_bytes(device_type: str) -> tuple[int, str] | None:
    """(total memory, whose) of the device the state lives on: a CUDA GPU's, else this machine's physical memory
    (None when neither is known)."""
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "the GPU's"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"
    except (AttributeError, ValueError, OSError):
        return None


def check_state_fits(module: Module, max_batch: int, max_seq_len: int, device_type: str) -> None:
    """Refuse a KV cache larger than the memory it would live in, before anything is allocated (torch would ask
    for it when generation starts, and fail with an allocator error or be killed): layers·2·max_batch·kv_heads·
    max_seq_len·head_dim·itemsize bytes."""
    need = state_bytes(module, max_batch, max_seq_len)
    memory = memory_bytes(device_type)
    if memory is None or need <= memory[0]:
        return
    total, whose = memory
    fixed = state_bytes(module, max_batch, 0)
    per_token = max(state_bytes(module, max_batch, 1) - fixed, 1)
    fits = max(int((total // 2 - fixed) // per_token), 0)
    raise InputError(f"max_seq_len {max_seq_len} with max_batch {max_batch} needs a {need / 2**30:.1f} GiB KV cache "
                     f"({per_token // max_batch} bytes per token of each sequence), more than {whose} "
                     f"{total / 2**30:.1f} GiB of memory; give a smaller max_seq_len (up to {fits} fits in half of "
                     "it) or max_batch")


def compute_dtype(model_dtype: torch.dtype, dtype, backend: str, device) -> torch.dtype:
    """The dtype the program computes in: ``dtype`` when given (the model's own, or f32 for a bf16/f16 model),
    else the model's, except that auto on a CPU computes a bf16 model in f32 (ONNX Runtime has no bf16 kernels
    there; bf16 would run on the reference backend, slower than eager), and says so."""
    if dtype is None:
        if backend == "auto" and model_dtype == torch.bfloat16:
            if preferred(device) == "onnx":
                warnings.warn("lowerlm: ONNX Runtime has no bf16 kernels on a CPU, so this bf16 model is computed "
                              "in float32 (logits returned as bf16); dtype=torch.bfloat16 keeps bf16, on the "
                              "slower reference backend", stacklevel=3)
                return torch.float32
        return model_dtype
    if dtype == model_dtype or dtype == torch.float32 and model_dtype in (torch.bfloat16, torch.float16):
        return dtype
    raise CompileError(f"compile_model computes a model in its own dtype ({model_dtype}) or, for a bf16/f16 model, "
                       f"in float32; for {dtype}, convert the model first (model.to({dtype}))")


def _state_device(backend: str, device) -> str:
    """The device type the state buffers will live on; refuses the Triton backend without a GPU (or Triton's
    interpreter) before any tracing."""
    if backend == "triton":
        from lowerlm.codegen.triton.program import TritonProgram, check_available

        resolved = TritonProgram.resolve_device(device)
        check_available(resolved)
        return resolved.type
    if backend == "auto":
        if preferred(device) == "triton":
            from lowerlm.codegen.triton.program import TritonProgram

            return TritonProgram.resolve_device(device).type  # the CPU under Triton's interpreter
    return "cpu"


def compile_model(model: torch.nn.Module, backend: str = "auto", dtype=None, device=None,
                  max_seq_len: int | None = None, max_batch: int = 8, passes="default", arm=None, tp: int = 1,
                  weight_bits: int | None = None,
                  captures=(), use_cache: bool = True, tokenizer=None,
                  progress: Callable[[str], None] | None = None) -> CompiledModel:
    """Compile a causal LM (a transformers model or an ``nn.Module`` mapping input_ids to logits).
    ``backend``: "auto" (the default) runs each graph on the device's fast backend (a CUDA GPU: Triton; a CPU: ONNX
    Runtime) and the ops it lacks on the reference backend; "reference" is plain torch op by op (the oracle the
    others are tested against; slower than the model's own eager forward), "onnx" and "triton" name one.
    ``dtype``: what the program computes in; the model's own (None) or, for a bf16/f16 model, ``torch.float32``
    (its weights converted at load, logits returned in f32). A bf16 model under auto on a CPU is computed in f32
    unless ``dtype=torch.bfloat16`` says otherwise (ONNX Runtime has no bf16 kernels there); its logits are
    returned as bf16.
    ``max_seq_len``: the longest sequence (prompt and generated tokens) generation holds; 2048 by default, or
    the rows of the model's learned position embedding if it has fewer. With ``max_batch`` it sizes the KV cache,
    which must fit the memory it lives in (``InputError`` otherwise, before anything is allocated).
    ``weight_bits`` (4 or 8; ONNX backend, and auto on a CPU) stores the projections' weights quantized: faster
    on a CPU, no longer the same numbers as the model (BENCHMARKS.md reports the token agreement). ``use_cache``:
    the trace cache, the ONNX backend's compile cache and the Triton backend's generated kernel sources
    (``~/.cache/lowerlm``, ``LOWERLM_CACHE_DIR``; docs/caches.md); off, nothing is read from or written there.
    ``tokenizer``: the one ``cm.generate`` encodes text with; None loads the model's, False means none (token ids
    only). ``tp``: this process's shard of N tensor-parallel ranks (torch.distributed's default group must hold N:
    torchrun, or ``lowerlm generate --tp N``; every rank must pass the same model and options, which the ranks
    check before tracing). ``progress(message)`` is told when a step that can take seconds starts (export, import,
    the passes, the tokenizer, each ONNX graph lowered); the CLI shows it on a terminal."""
    from lowerlm.frontend.trace import trace_model
    from lowerlm.runtime.text import load_tokenizer

    check_backend(backend, weight_bits=weight_bits)
    shard = tp_rank(tp)
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"compile_model takes a torch.nn.Module, got {type(model).__name__}")
    first = next(model.parameters(), None)
    if first is None:
        raise InputError(f"{type(model).__name__} has no parameters: compile_model takes a language model")
    model_dtype = first.dtype
    compute = compute_dtype(model_dtype, dtype, backend, device)
    if backend == "reference" and device not in (None, "cpu"):
        raise CompileError("the reference backend runs on the CPU (device=None)")
    if max_seq_len is not None and max_seq_len < 2 or max_batch < 1:
        raise CompileError(f"max_seq_len must be >= 2 and max_batch >= 1, got {max_seq_len} and {max_batch}")
    state_device = _state_device(backend, device)  # before tracing: Triton without a GPU is refused here
    limit = sparse_attention.context_limit(model)
    fit_max_seq_len(None, max_seq_len, limit)  # refused before tracing
    if shard is not None:  # ranks built from different models or options refuse to start, before tracing
        from lowerlm.runtime.distributed import agree

        agree(rank_digests(model, captures, dict(backend=backend, dtype=str(dtype), max_seq_len=max_seq_len,
                                                 max_batch=max_batch, arm=arm is not None,
                                                 passes=passes if isinstance(passes, str) or passes is None
                                                 else [p if isinstance(p, str) else p[0] for p in passes],
                                                 weight_bits=weight_bits)))
    imported = trace_model(model, use_cache=use_cache, progress=progress, captures=captures)
    table = position_table(imported)
    max_seq_len = fit_max_seq_len(table, max_seq_len, limit)
    records: list[PassRecord] = []
    if progress:
        progress("running the passes")
    run_pipeline(imported, passes=passes, on_pass=records.append, arm=arm, backend=fusing_backend(backend, device),
                 upcast_from=DType.from_torch(model_dtype) if compute != model_dtype else None, tp=shard)
    final = records[-1].module if records else imported
    check_state_fits(final, max_batch, max_seq_len, state_device)
    weights = model_weights(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokenizer is None:
        if progress:
            progress("loading the tokenizer")
        tokenizer = load_tokenizer(model)
    elif tokenizer is False:
        tokenizer = None
    program = build_program(backend, final, weights, device, weight_bits=weight_bits, cache=use_cache,
                            progress=progress)
    return CompiledModel(imported, records, weights, program, vocab, max_seq_len, max_batch, tokenizer,
                         stop_token_ids(model, tokenizer), logits_dtype=model_dtype if dtype is None else compute,
                         position_table=table, skip_token=skipped_token(imported), context_limit=limit)
