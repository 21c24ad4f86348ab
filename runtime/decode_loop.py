"""The decode loop kept on the device, for programs that sample on the device (the Triton backend).

Each step decodes the current tokens and samples the next ones straight into the same static inputs
(``sample(..., out=...)`` also advances positions and valid lengths), so a step needs nothing from the host. The host
queues step k+1 before it reads step k's tokens: while it streams text and checks stop tokens, the GPU is already
decoding, and no time per token is lost to the host. On a GPU a step is two graph replays (the captured decode step
of runtime/cuda_graph.py, then a captured sampling step per sampling setting); elsewhere the same loop runs the
program and the kernel directly (Triton's interpreter in the tests).

A finished sequence keeps decoding its own tokens (their results are dropped), its position held at the last cache
slot once it gets there; the extra rows of a bucket larger than the batch do the same in their own cache rows.
"""

from __future__ import annotations

import torch

from lowerlm.ir.abi import DECODE, INPUT_IDS, POSITIONS, SEQ_LENS
from lowerlm.runtime.sampler import Sampling


class DecodeLoop:
    """``begin(logits, positions, sampling)`` draws the first tokens from the prefill's logits; then ``advance()``
    queues one decode step, ``fetch()`` queues reading the current tokens back and ``tokens()`` waits for them."""

    def __init__(self, program, state: dict, max_batch: int, max_seq_len: int, graphed=None):
        self.program, self.state, self.graphed = program, state, graphed
        self.limit = max_seq_len - 1  # the last cache slot
        dev = program.device
        self.seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self.samplers: dict = {}  # (bucket, temperature, top_k, top_p) -> captured sampling step
        cuda = dev.type == "cuda"
        self.host = torch.empty(max_batch, dtype=torch.int64, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.inputs = self.logits = self.sampler = None

    def _static(self, b: int) -> int:
        """The static inputs and logits for ``b`` sequences (a graph bucket's on a GPU); the rows used."""
        if self.graphed is not None:
            bucket = min(k for k in self.graphed.graphs if k >= b)
            _, self.inputs, self.logits = self.graphed.graphs[bucket]
            return bucket
        dev = self.program.device
        self.inputs = {INPUT_IDS: torch.zeros(b, 1, dtype=torch.long, device=dev),
                       POSITIONS: torch.zeros(b, 1, dtype=torch.long, device=dev),
                       SEQ_LENS: torch.ones(b, dtype=torch.int32, device=dev)}
        self.logits = None
        return b

    def _sample(self, logits: torch.Tensor, rows: int) -> None:
        from lowerlm.codegen.triton.sampling import sample

        s = self.sampling
        sample(logits, s.temperature, s.top_k, s.top_p, self.seed, self.inputs[POSITIONS][:rows, 0],
               out=self.inputs[INPUT_IDS][:rows, 0], seq_lens=self.inputs[SEQ_LENS][:rows], limit=self.limit)

    def begin(self, logits: torch.Tensor, positions: torch.Tensor, sampling: Sampling) -> None:
        """Draw each sequence's first token from the prefill's ``logits`` [b, V], which follow the prompts' last
        tokens at ``positions`` [b], into the static inputs of the decode step."""
        self.sampling = sampling
        self.b = logits.shape[0]
        self.bucket = self._static(self.b)
        if self.graphed is not None:
            key = (self.bucket, sampling.temperature, sampling.top_k, sampling.top_p)
            if key not in self.samplers:  # (below, the inputs its capture's compiling run advanced are reset)
                self.samplers[key] = self.graphed.capture(lambda: self._sample(self.logits[:, 0], self.bucket))
            self.sampler = self.samplers[key]
        for buf in self.inputs.values():  # rows past the batch decode from slot 0 of their own cache rows
            buf.zero_()
        self.inputs[SEQ_LENS].fill_(1)
        self.inputs[POSITIONS][:self.b, 0].copy_(positions)
        self.seed.fill_(sampling.seed)
        self._sample(logits.contiguous(), self.b)

    def advance(self) -> None:
        """Queue one step: decode the current tokens, sample the next ones into the inputs."""
        if self.graphed is not None:
            self.graphed.graphs[self.bucket][0].replay()
            self.sampler.replay()
            return
        state = {name: buf[:self.b] for name, buf in self.state.items()}
        (logits,), _ = self.program.run(DECODE, self.inputs, state, inplace=True)
        self._sample(logits[:, 0], self.b)

    def fetch(self) -> None:
        """Queue reading the current tokens back (before the next ``advance`` overwrites them)."""
        self.host[:self.b].copy_(self.inputs[INPUT_IDS][:self.b, 0], non_blocking=True)
        if self.event is not None:
            self.event.record()

    def tokens(self) -> list:
        """The tokens the last ``fetch`` read, once they are there."""
        if self.event is not None:
            self.event.synchronize()
        return self.host[:self.b].tolist()
