"""Next-token sampling: greedy, temperature, top-k, top-p, from a seeded generator (reproducible)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowerlm.ir.errors import InputError


@dataclass(frozen=True)
class Sampling:
    """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` turn those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        # written so that NaN fails every check (it compares false with any bound)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:  # what a torch generator can hold
            raise InputError(f"seed must be an integer in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with every token outside the top-k and outside the top-p nucleus set to -inf.

    top-k keeps exactly k tokens (ties at the k-th value broken by ``torch.topk``); top-p keeps the smallest set
    of most likely tokens whose probability reaches ``top_p`` (the token that crosses it included), and always
    the most likely token.
    """
    # logits: [B, V]
    out = logits.float()
    if top_k and top_k < out.shape[-1]:
        kept = torch.topk(out, top_k, dim=-1).indices
        mask = torch.ones_like(out, dtype=torch.bool).scatter_(-1, kept, False)
        out = out.masked_fill(mask, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]."""
    if sampling.greedy:
        return logits.argmax(-1)
    scores = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
