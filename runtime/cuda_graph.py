"""The decode step captured in CUDA graphs, one per batch-size bucket (1, 2, 4, … up to max_batch).

Rules the kernels follow so a captured step stays correct on replay (docs/runtime.md): they read positions and
lengths from device tensors (the static inputs copied in before each replay), grids are sized for the bucket and the
cache length with early exit, and every kernel has run (compiled) before capture. A smaller batch runs in the next
bucket up; its extra rows write only to cache rows no sequence of this batch uses.
"""

from __future__ import annotations

import torch

from lowerlm.ir.abi import DECODE, INPUT_IDS, POSITIONS, SEQ_LENS


def buckets(max_batch: int) -> list:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class GraphedDecode:
    """``step(tokens [b], positions [b]) -> logits [b, V]`` replaying a captured decode graph."""

    def __init__(self, program, state: dict, max_batch: int, warmup: int = 2):
        if program.device.type != "cuda":
            raise ValueError("CUDA graphs need the program on a CUDA device")
        self.program, self.state = program, state
        self.graphs: dict = {}
        self.pool = None
        for b in reversed(buckets(max_batch)):  # largest first: the smaller ones share its memory pool
            self._capture(b, warmup)

    def _capture(self, b: int, warmup: int) -> None:
        dev = self.program.device
        inputs = {INPUT_IDS: torch.zeros(b, 1, dtype=torch.long, device=dev),
                  POSITIONS: torch.zeros(b, 1, dtype=torch.long, device=dev),
                  SEQ_LENS: torch.ones(b, dtype=torch.int32, device=dev)}
        state = {name: buf[:b] for name, buf in self.state.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile and autotune every kernel outside the capture
            for _ in range(warmup):
                self.program.run(DECODE, inputs, state, inplace=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            (logits,), _ = self.program.run(DECODE, inputs, state, inplace=True)
        self.pool = graph.pool()
        self.graphs[b] = (graph, inputs, logits)

    def capture(self, fn):
        """A CUDA graph of ``fn``'s launches, in the decode graphs' memory pool, after one run outside the capture
        (which compiles its kernels; ``fn`` must tolerate that run)."""
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        bucket = min(k for k in self.graphs if k >= b)
        graph, inputs, logits = self.graphs[bucket]
        inputs[INPUT_IDS][:b, 0].copy_(tokens, non_blocking=True)
        inputs[POSITIONS][:b, 0].copy_(positions, non_blocking=True)
        inputs[SEQ_LENS][:b].copy_(positions + 1, non_blocking=True)
        graph.replay()
        return logits[:b, 0]
