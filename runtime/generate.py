"""The autoregressive loop, gpt-fast small: ``prefill``, ``decode_one`` and ``sample`` as plain functions over a
program and state buffers allocated once.

Batches are right-padded ``[B, S]``: every sequence has its own ``positions`` and ``seq_lens``, so padding never
enters attention or the cache, and a batch gives each sequence the tokens it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from lowerlm.ir.errors import InputError
from lowerlm.ir.graph import Module
from lowerlm.ir.shapes import evaluate
from lowerlm.runtime.sampler import Sampling, sample


def allocate_state(module: Module, max_batch: int, max_seq_len: int, device="cpu") -> dict:
    """Zeroed buffers for every declared state: ``B`` bound to max_batch, ``T`` to max_seq_len."""
    env = {"B": max_batch, "T": max_seq_len}
    return {name: torch.zeros([evaluate(d, env) for d in spec.type.shape], dtype=spec.type.dtype.to_torch(),
                              device=device)
            for name, spec in module.state_specs.items()}


def _batch_view(state: dict, batch: int) -> dict:
    return {name: buf[:batch] for name, buf in state.items()}


def prefill(program, state: dict, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Run the prompts (right-padded ``ids`` [B, S], valid ``lengths`` [B]) into the cache; logits of each
    sequence's last prompt token [B, V]."""
    b, s = ids.shape
    dev = program.device
    inputs = {"input_ids": ids.to(dev), "positions": torch.arange(s, device=dev).repeat(b, 1),
              "seq_lens": lengths.to(device=dev, dtype=torch.int32)}
    (logits,), _ = program.run("prefill", inputs, _batch_view(state, b), inplace=True)
    # logits: [B, S, V]
    return logits[torch.arange(b, device=dev), lengths.to(dev).long() - 1]


def decode_one(program, state: dict, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token per sequence (``tokens`` [B] at ``positions`` [B]) through the cache; logits [B, V]."""
    b = tokens.shape[0]
    dev = program.device
    tokens, positions = tokens.to(dev), positions.to(dev)
    inputs = {"input_ids": tokens[:, None], "positions": positions[:, None],
              "seq_lens": (positions + 1).to(torch.int32)}
    (logits,), _ = program.run("decode", inputs, _batch_view(state, b), inplace=True)
    return logits[:, 0]


@dataclass
class Generator:
    """Owns the state buffers of one compiled model and runs generation over them."""

    program: object
    module: Module
    max_seq_len: int
    max_batch: int
    vocab_size: int | None
    cuda_graphs: bool = True
    state: dict = field(default_factory=dict)
    graphed: object = None

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

    def _sampler(self, sampling: Sampling):
        """logits [B, V] -> next tokens [B] on the host (streaming needs them there anyway). Triton programs
        sample on the device (only B tokens cross to the host; the Philox offset advances on the device); the
        reference backend samples on the host with a seeded torch generator."""
        if getattr(self.program, "device_sampling", False):
            from lowerlm.codegen.triton.sampling import sample as device_sample

            dev = self.program.device
            seed = torch.tensor([sampling.seed], dtype=torch.int64, device=dev)
            offset = torch.zeros(1, dtype=torch.int64, device=dev)

            def draw(logits):
                tokens = device_sample(logits.float().contiguous(), sampling.temperature, sampling.top_k,
                                       sampling.top_p, seed, offset)
                offset.add_(1)
                return tokens.cpu()

            return draw
        generator = torch.Generator().manual_seed(sampling.seed)
        return lambda logits: sample(logits.float().cpu(), sampling, generator)

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
        draw = self._sampler(sampling)
        stop = set(stop_ids)
        logits = prefill(self.program, self.state, ids, lengths)
        done = [False] * b
        for step in range(max_new_tokens):
            tokens = draw(logits)
            out = []
            for i in range(b):
                if done[i]:
                    out.append(None)
                    continue
                t = int(tokens[i])
                out.append(t)
                # t goes to cache slot lengths[i] when decoded: past the cache, the sequence ends here
                if t in stop or int(lengths[i]) >= self.max_seq_len:
                    done[i] = True
            yield out
            if all(done) or step == max_new_tokens - 1:
                return
            # finished sequences keep decoding their last token at a valid slot; their results are dropped
            positions = torch.minimum(lengths, torch.tensor(self.max_seq_len - 1))
            logits = self.decode(tokens, positions)
            lengths = lengths + torch.tensor([0 if d else 1 for d in done])
