"""``lowerlm.compile_model``: trace a model, run the pass pipeline, build a program on a backend."""

from __future__ import annotations

import sys
from typing import Callable

import torch

from lowerlm.errors import CompileError, InputError
from lowerlm.ir.graph import Module
from lowerlm.ir.printer import print_module
from lowerlm.passes import PassRecord, dump_header, run_pipeline

BACKENDS = ("reference",)


class CompiledModel:
    """A compiled model: ``cm(input_ids)`` gives the logits ``model(input_ids).logits`` would."""

    def __init__(self, imported: Module, records: list, weights: dict, program, vocab_size: int | None):
        self.imported = imported
        self.records = records  # one PassRecord per pass, in order
        self.weights = weights
        self.program = program
        self.vocab_size = vocab_size

    @property
    def ir(self) -> Module:
        """The final IR."""
        return self.records[-1].module if self.records else self.imported

    def stages(self) -> list:
        """(header, module) for the import and after each pass."""
        return [("// imported", self.imported)] + [(dump_header(r), r.module) for r in self.records]

    def dump(self, after: str = "all", file=None) -> None:
        """Print the IR as imported and after each pass (``after="all"``) or after one named pass."""
        for header, module in self.stages():
            if after == "all" or header.startswith(f"// after {after} "):
                print(header, file=file or sys.stdout)
                print(print_module(module), file=file or sys.stdout)

    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        ids, positions, seq_lens = self.prepare(input_ids, attention_mask, position_ids)
        (logits,), _ = self.program.run("forward", {"input_ids": ids, "positions": positions, "seq_lens": seq_lens})
        return logits

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
        positions = torch.arange(s).repeat(b, 1) if position_ids is None else torch.as_tensor(position_ids).long()
        if positions.shape != ids.shape:
            raise InputError(f"position_ids shape {list(positions.shape)} differs from input_ids {list(ids.shape)}")
        return ids, positions, seq_lens


def model_weights(model: torch.nn.Module) -> dict:
    """Parameters and buffers by name (tied weights under every name)."""
    out = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    out.update({n: b.detach() for n, b in model.named_buffers(remove_duplicate=False)})
    return out


def compile_model(model: torch.nn.Module, backend: str = "reference", dtype=None, device=None,
                  max_seq_len: int = 2048, max_batch: int = 8, passes="default", arm=None, tp: int = 1,
                  captures=(), use_cache: bool = True,
                  progress: Callable[[str], None] | None = None) -> CompiledModel:
    """Compile a causal LM (a transformers model or an ``nn.Module`` mapping input_ids to logits)."""
    from lowerlm.codegen.reference import ReferenceProgram
    from lowerlm.frontend.trace import trace_model

    if backend not in BACKENDS:
        raise CompileError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    if tp != 1 or arm is not None:
        raise CompileError("tensor parallelism and ARM are not available yet (tp=1, arm=None)")
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"compile_model takes a torch.nn.Module, got {type(model).__name__}")
    imported = trace_model(model, use_cache=use_cache, progress=progress, captures=captures)
    records: list[PassRecord] = []
    run_pipeline(imported, passes=passes, on_pass=records.append)
    final = records[-1].module if records else imported
    weights = model_weights(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return CompiledModel(imported, records, weights, ReferenceProgram(final, weights), vocab)
