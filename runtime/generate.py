"""The autoregressive loop, gpt-fast small: ``prefill``, ``decode_one`` and ``sample`` as plain functions over a
program and state buffers allocated once.

Batches are right-padded ``[B, S]``: every sequence has its own ``positions`` and ``seq_lens``. A padded row's
extra tokens are written into cache slots at or past its ``seq_lens``, which attention never reads and the next
steps overwrite, and recurrent state skips them, so padding never enters a result, and a batch gives each sequence
the tokens it would get alone.

State by kind (ir/types.py): a ``kv`` cache needs nothing between sequences (a new one overwrites every slot it
reads); ``recurrent`` state (short-conv inputs, delta-rule state) summarises every token so far, so ``prefill``
zeroes it for the rows it starts -- ``prefill_once`` continues whatever the state holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from lowerlm.codegen.program import Program
from lowerlm.ir.abi import BATCH, CACHE_LEN, DECODE, INPUT_IDS, LOGIT_INDEX, POSITIONS, PREFILL, SEQ_LENS
from lowerlm.ir.errors import InputError
from lowerlm.ir.graph import Module
from lowerlm.ir.shapes import evaluate
from lowerlm.ir.types import RECURRENT
from lowerlm.runtime.sampler import Sampling, sample


def allocate_state(module: Module, max_batch: int, max_seq_len: int, device="cpu") -> dict:
    """Zeroed buffers for every declared state: ``B`` bound to max_batch, ``T`` to max_seq_len."""
    env = {BATCH: max_batch, CACHE_LEN: max_seq_len}
    return {name: torch.zeros([evaluate(d, env) for d in spec.type.shape], dtype=spec.type.dtype.to_torch(),
                              device=device)
            for name, spec in module.state_specs.items()}


def reset_recurrent(module: Module, state: dict, rows: slice) -> None:
    """Zero the ``recurrent`` state of ``rows`` (in place: CUDA graphs and ONNX bindings keep the buffers)."""
    for name, spec in module.state_specs.items():
        if spec.kind == RECURRENT:
            state[name][rows].zero_()


def _batch_view(state: dict, batch: int) -> dict:
    return {name: buf[:batch] for name, buf in state.items()}


def selects_logits(module: Module) -> bool:
    """Whether the module's prefill takes ``logit_index`` (the select_logits pass ran)."""
    return any(v.name == LOGIT_INDEX for v in module.graph(PREFILL).inputs)


def prefill(program: Program, state: dict, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Run the prompts (right-padded ``ids`` [B, S], valid ``lengths`` [B]) into the cache; logits of each
    sequence's last prompt token [B, V].

    When ``program.prefill_chunk`` gives a chunk size for any row (the ONNX backend's long prompts), the batch runs
    one sequence at a time, each in chunks that continue its cache (ONNX Runtime continues a cache with more than
    one token only at batch 1), and without the padding."""
    reset_recurrent(program.module, state, slice(0, ids.shape[0]))
    rows = lengths.tolist()
    chunks = [program.prefill_chunk(n) for n in rows]
    if all(c is None for c in chunks):
        return prefill_once(program, _batch_view(state, ids.shape[0]), ids, 0, lengths)
    out = []
    for i, (n, chunk) in enumerate(zip(rows, chunks)):
        row = {name: buf[i:i + 1] for name, buf in state.items()}
        chunk = chunk or n
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            logits = prefill_once(program, row, ids[i:i + 1, c0:c1], c0, torch.tensor([c1]))
        out.append(logits)
    return torch.cat(out)


def prefill_once(program: Program, state: dict, ids: torch.Tensor, start: int,
                 lengths: torch.Tensor) -> torch.Tensor:
    """One prefill of ``ids`` [B, L] at positions start..start+L-1, the sequences ``lengths`` long after it: each
    one's logits at its last token [B, V]. With ``start`` > 0 it continues the sequences in ``state``."""
    b, s = ids.shape
    dev = program.device
    last = lengths.to(dev).long() - (1 + start)
    inputs = {INPUT_IDS: ids.to(dev), POSITIONS: torch.arange(start, start + s, device=dev).repeat(b, 1),
              SEQ_LENS: lengths.to(device=dev, dtype=torch.int32)}
    picked = selects_logits(program.module)
    if picked:  # the lm_head runs on the last rows only
        inputs[LOGIT_INDEX] = last[:, None]
    (logits,), _ = program.run(PREFILL, inputs, state, inplace=True)
    return logits[:, 0] if picked else logits[torch.arange(b, device=dev), last]  # [B, 1, V] or [B, S, V]


def decode_one(program: Program, state: dict, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token per sequence (``tokens`` [B] at ``positions`` [B]) through the cache; logits [B, V]."""
    b = tokens.shape[0]
    dev = program.device
    tokens, positions = tokens.to(dev), positions.to(dev)
    inputs = {INPUT_IDS: tokens[:, None], POSITIONS: positions[:, None],
              SEQ_LENS: (positions + 1).to(torch.int32)}
    (logits,), _ = program.run(DECODE, inputs, _batch_view(state, b), inplace=True)
    return logits[:, 0]


def check_skipped(rows, token: int | None) -> None:
    """Refuse a padding token that a later token of its row follows, in a model that numbers positions skipping
    padding tokens (RoBERTa-style; frontend/export.py's ``skipping_positions``): lowerlm numbers every token, so the
    positions after it would differ from the model's. ``rows``: token-id lists, each only the row's real tokens."""
    if token is None:
        return
    for i, row in enumerate(rows):
        row = list(row)
        last_other = max((j for j, t in enumerate(row) if t != token), default=-1)
        if token in row[:last_other]:
            j = row.index(token)
            raise InputError(f"token id {token} at index {j} of sequence {i} is the model's padding token, which its "
                             "own position numbering skips and lowerlm's does not; remove padding tokens from "
                             "inside the input (trailing ones are fine; pad batches with attention_mask)")


@dataclass
class Generator:
    """Owns the state buffers of one compiled model and runs generation over them."""

    program: Program
    module: Module
    max_seq_len: int
    max_batch: int
    vocab_size: int | None
    skip_token: int | None = None  # the padding token a RoBERTa-style model's numbering skips (see check_skipped)
    cuda_graphs: bool = True
    state: dict = field(default_factory=dict)
    graphed: object = None
    loop: object = None
    # why each sequence of the last ``generate`` ended: "stop" (a stop token), "max_new_tokens", or "max_seq_len"
    # (its cache was full first; the CLI tells the user, since fewer tokens than asked for came back)
    finish_reasons: list = field(default_factory=list)

    def __post_init__(self):
        self.state = allocate_state(self.module, self.max_batch, self.max_seq_len, self.program.device)
        if self.cuda_graphs and self.program.device.type == "cuda":
            from lowerlm.runtime.cuda_graph import GraphedDecode

            self.graphed = GraphedDecode(self.program, self.state, self.max_batch)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for one token per sequence: a graph replay on a GPU, else a plain run."""
        if self.graphed is not None:
            dev = self.program.device
            return self.graphed.step(tokens.to(dev), positions.to(dev))
        return decode_one(self.program, self.state, tokens, positions)

    def check_prompts(self, prompts: list, max_new_tokens: int) -> None:
        if not prompts:
            raise InputError("no prompt given")
        if len(prompts) > self.max_batch:
            raise InputError(f"batch of {len(prompts)} prompts is larger than max_batch {self.max_batch}; "
                             "compile with a larger max_batch")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty")
            if len(p) >= self.max_seq_len:
                raise InputError(f"prompt {i} is {len(p)} tokens, longer than max_seq_len {self.max_seq_len} allows "
                                 "(the prompt and one new token must fit); shorten it or compile with a larger "
                                 "max_seq_len")
            bad = [t for t in p if not 0 <= t < (self.vocab_size or 2**62)]
            if bad:
                raise InputError(f"token id {bad[0]} in prompt {i} is outside the vocabulary [0, {self.vocab_size})")
        check_skipped(prompts, self.skip_token)

    def generate(self, prompts: list, max_new_tokens: int, sampling: Sampling | None = None,
                 stop_ids=()) -> Iterator[list]:
        """Yield, per step, the new token of each sequence (None once it has stopped). A sequence stops at a stop
        token (which is yielded), after max_new_tokens, or when its cache is full."""
        self.check_prompts(prompts, max_new_tokens)
        sampling = sampling or Sampling()
        b = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        ids = torch.zeros(b, int(lengths.max()), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        stop = set(stop_ids)
        logits = prefill(self.program, self.state, ids, lengths)
        steps = self._device_steps if self.program.device_sampling else self._host_steps
        done = [False] * b
        self.finish_reasons = reasons = ["max_new_tokens"] * b
        lengths = lengths.tolist()
        for step, tokens in enumerate(steps(logits, lengths, sampling, max_new_tokens)):
            out = []
            for i in range(b):
                if done[i]:
                    out.append(None)
                    continue
                t = tokens[i]
                out.append(t)
                # t goes to cache slot lengths[i] + step when decoded: past the cache, the sequence ends here
                if t in stop:
                    done[i], reasons[i] = True, "stop"
                elif lengths[i] + step >= self.max_seq_len:
                    done[i] = True
                    if step < max_new_tokens - 1:  # fewer tokens than asked for
                        reasons[i] = "max_seq_len"
            yield out
            if all(done) or step == max_new_tokens - 1:
                return

    def _host_steps(self, logits, lengths: list, sampling: Sampling, n: int) -> Iterator[list]:
        """Tokens per step (the prompts' ``lengths``), sampled on the host: the reference backend, with a seeded
        torch generator. Step k's tokens are decoded at slot length + k, held at the last slot once there (a
        finished sequence's results are dropped)."""
        generator = torch.Generator().manual_seed(sampling.seed)
        for step in range(n):
            tokens = sample(logits.float().cpu(), sampling, generator)
            yield tokens.tolist()
            if step < n - 1:
                logits = self.decode(tokens, torch.tensor([min(x + step, self.max_seq_len - 1) for x in lengths]))

    def _device_steps(self, logits, lengths: list, sampling: Sampling, n: int) -> Iterator[list]:
        """Tokens per step from the decode loop kept on the device (runtime/decode_loop.py), which places them
        as ``_host_steps`` does; step k+1 is queued before step k's tokens are read."""
        if self.loop is None:
            from lowerlm.runtime.decode_loop import DecodeLoop

            self.loop = DecodeLoop(self.program, self.state, self.max_batch, self.max_seq_len, self.graphed)
        loop = self.loop
        loop.begin(logits, torch.tensor([x - 1 for x in lengths], device=self.program.device), sampling)
        loop.fetch()
        for step in range(n):
            if step < n - 1:
                loop.advance()
            tokens = loop.tokens()
            if step < n - 1:
                loop.fetch()
            yield tokens
