"""Passes: pure ``Graph -> Graph`` rewrites, and the driver that runs them over a module.

The default pipeline is the list below, in order, one line per pass. ``upcast`` and ``arm`` have no function
there because they need an argument: ``resolve(upcast_from=...)`` (a model computed in f32) and
``resolve(arm=...)`` (calibration data) build them, and without it they are skipped. ``PASSES`` maps the
names of passes that need no data to their functions, for ``dump-ir --after NAME`` and
``compile_model(passes=[...])``. The driver maps a pass over every graph of the module, verifies after each pass,
sums the rewrite counts the pass returns (``Pass.apply``), and prints the IR after a pass when ``LOWERLM_DUMP``
names it (``all``, or names separated by commas).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, TextIO

import lowerlm.passes.arm  # noqa: F401  (its docstring is listed by `lowerlm passes`)
from lowerlm.ir.errors import PassError, VerifyError
from lowerlm.ir.graph import Graph, Module
from lowerlm.ir.printer import print_module
from lowerlm.ir.verifier import verify_module
from lowerlm.passes.backend import (
    fuse_decode_attention,
    fuse_ew_chains,
    fuse_gqa_attention,
    fuse_rope_cache_write,
    fuse_route_norm,
)
from lowerlm.passes.canonicalize import canonicalize
from lowerlm.passes.fuse_linear_residual import fuse_linear_residual
from lowerlm.passes.fuse_rmsnorm_linear import fuse_rmsnorm_linear
from lowerlm.passes.fuse_swiglu import fuse_swiglu
from lowerlm.passes.insert_state import insert_state
from lowerlm.passes.moe_dispatch import moe_dispatch
from lowerlm.passes.pattern import Pass
from lowerlm.passes.raise_mla import raise_mla
from lowerlm.passes.raise_moe_route import raise_moe_route
from lowerlm.passes.select_logits import select_logits
from lowerlm.passes.specialize import specialize
from lowerlm.passes.upcast import upcast

# A pass maps a graph to a graph, or (specialize) to a tuple of graphs that replace it in the module. The passes
# here are ``Pass`` objects (passes/pattern.py), whose ``apply`` also returns the number of rewrites; a plain
# function works too, and counts 0.
PassFn = Callable[[Graph], "Graph | tuple"]

PIPELINE: list[tuple[str, PassFn | None]] = [
    ("upcast", None),  # with a dtype to compute in only: bf16/f16 values become f32, before anything looks at them
    ("canonicalize", canonicalize),  # one canonical form first: no-op views/casts gone, constants folded, CSE, DCE
    ("arm", None),  # with calibration data only: gate and up must still be apart, so before the fusions
    ("raise_moe_route", raise_moe_route),  # a traced softmax / sigmoid-group router feeding experts -> moe_route
    ("raise_mla", raise_mla),  # attention over one mla_expand's keys and values -> mla_attention over the latent
    ("fuse_linear_residual", fuse_linear_residual),  # o_proj/down take the residual add: the norm then reads them
    ("fuse_rmsnorm_linear", fuse_rmsnorm_linear),  # norm in the prologue of q|k|v, gate|up, lm_head
    ("fuse_swiglu", fuse_swiglu),  # act(gate)*up as the epilogue of the gate|up rms_norm_linear
    ("moe_dispatch", moe_dispatch),  # moe -> route, sort by expert, grouped GEMMs, combine (+ shared experts)
    ("insert_state", insert_state),  # attention, short_conv, delta_rule read and write declared state
    ("specialize", specialize),  # forward -> prefill (S free) + decode (S = 1), sharing weights and state
    ("select_logits", select_logits),  # prefill's lm_head only at the rows asked for (the prompts' last tokens)
]

# Each backend's tail: the fusions its kernels take, after the shared pipeline (passes/backend.py). They make
# real IR ops, so `dump-ir --backend NAME` shows what the backend runs.
TAILS: dict[str, list[tuple[str, PassFn]]] = {
    "reference": [],
    "onnx": [
        ("fuse_gqa_attention", fuse_gqa_attention),  # rope -> cache writes -> attention: GroupQueryAttention
    ],
    "triton": [
        ("fuse_decode_attention", fuse_decode_attention),  # decode: rope, cache writes, attention: one launch
        ("fuse_rope_cache_write", fuse_rope_cache_write),  # rope + the layer's two cache writes: one launch
        ("fuse_route_norm", fuse_route_norm),  # an MoE layer's norm computed by its route launch
        ("fuse_ew_chains", fuse_ew_chains),  # element-wise chains: generated kernels
    ],
}

PASSES: dict[str, PassFn] = {name: fn for name, fn in PIPELINE if fn is not None} | {
    name: fn for tail in TAILS.values() for name, fn in tail}

_MODULES = {name: fn.__module__ for name, fn in PASSES.items()} | {"arm": "lowerlm.passes.arm",
                                                                   "upcast": "lowerlm.passes.upcast"}


def _first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line (it may span several lines of source)."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    match = re.search(r"[.!?](?=\s+[A-Z(`])", paragraph)
    return paragraph[:match.end()] if match else paragraph


# first sentence of each pass's module docstring (a tail pass: its function's), for `lowerlm passes`
PASS_DOCS: dict[str, str] = {name: _first_sentence(sys.modules[_MODULES[name]].__doc__) for name, _ in PIPELINE} | {
    name: _first_sentence(fn.__doc__) for tail in TAILS.values() for name, fn in tail}


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: its name, the module after it and how many rewrites it made."""

    name: str
    module: Module
    rewrites: int


_BEFORE_TP = ("canonicalize", "raise_moe_route", "raise_mla")  # the shard is cut after these (before the fusions)
TP_PASSES = ("tensor_parallel", "fuse_allreduce_norm")  # what resolve inserts there for tp (made per rank)


def resolve(passes: str | Iterable[str | tuple] = "default", arm=None, upcast_from=None,
            backend: str | None = None, tp: tuple | None = None) -> list[tuple[str, PassFn]]:
    """The (name, function) list for ``"default"``, ``"none"`` or a list of names (or (name, fn) pairs). ``arm``
    (an ``ArmCalibration``) turns the arm pass on. ``upcast_from`` (bf16 or f16, a DType) puts the upcast pass
    first, whatever ``passes`` says: the program computes in f32 only if every graph does. ``backend`` (a key of
    ``TAILS``) appends that backend's tail to ``"default"``; a list names tail passes itself if it wants them."""
    out = _resolve(passes, arm)
    if tp is not None and tp[1] > 1:  # (rank, world): the shard once the LLM ops are raised, its fusion after it
        from lowerlm.passes.tensor_parallel import fuse_allreduce_norm, tensor_parallel

        at = max((i + 1 for i, (name, _) in enumerate(out) if name in _BEFORE_TP), default=0)
        out[at:at] = list(zip(TP_PASSES, (tensor_parallel(*tp), fuse_allreduce_norm)))
    if upcast_from is not None:
        out.insert(0, ("upcast", upcast(upcast_from)))
    if passes == "default" and backend is not None:
        if backend not in TAILS:
            raise PassError(f"no pass tail for backend '{backend}'; known: {', '.join(TAILS)}")
        out += TAILS[backend]
    return out


def _resolve(passes, arm) -> list[tuple[str, PassFn]]:
    if passes == "default":
        if arm is None:
            return [(name, fn) for name, fn in PIPELINE if fn is not None]
        from lowerlm.passes.arm import arm as arm_pass

        return [(name, fn if fn is not None else arm_pass(arm)) for name, fn in PIPELINE if name != "upcast"]
    if passes in ("none", None):
        return []
    if isinstance(passes, str):
        passes = [p.strip() for p in passes.split(",") if p.strip()]
    out = []
    for p in passes:
        if isinstance(p, tuple):
            out.append(p)
        elif p in PASSES:
            out.append((p, PASSES[p]))
        elif p == "upcast":
            raise PassError("pass 'upcast' needs the dtype to compute in: compile_model(model, dtype=torch.float32)")
        elif p == "arm":
            if arm is None:
                raise PassError("pass 'arm' needs calibration data: compile_model(model, "
                                "arm=lowerlm.calibrate(model))")
            from lowerlm.passes.arm import arm as arm_pass

            out.append((p, arm_pass(arm)))
        else:
            raise PassError(f"unknown pass '{p}'; known passes: {', '.join(PASSES)} (see `lowerlm passes`)")
    return out


def run_pass(name: str, fn: PassFn, module: Module, verify: bool = True) -> PassRecord:
    """Run one pass over every graph of ``module``; verify the result. The record's rewrites are the sum of what
    ``fn.apply`` returns when ``fn`` is a ``Pass``; a plain function (a user's ``(name, fn)`` pair) counts 0."""
    graphs = []
    count = 0
    for g in module.graphs:
        result, n = fn.apply(g) if isinstance(fn, Pass) else (fn(g), 0)
        count += n
        graphs += list(result) if isinstance(result, tuple) else [result]
    out = dataclasses.replace(module, graphs=tuple(graphs))
    if verify:
        try:
            verify_module(out)
        except VerifyError as e:
            raise PassError(f"pass '{name}' produced an invalid graph: {e}") from e
    return PassRecord(name, out, count)


def _dump_names() -> set:
    return {n.strip() for n in os.environ.get("LOWERLM_DUMP", "").split(",") if n.strip()}


def dump_header(record: PassRecord) -> str:
    return f"// after {record.name} ({record.rewrites} rewrites)"


def run_pipeline(module: Module, passes="default", verify: bool = True, dump: set | None = None,
                 out: TextIO | None = None, on_pass: Callable[[PassRecord], None] | None = None,
                 arm=None, upcast_from=None, backend: str | None = None, tp: tuple | None = None) -> Module:
    """Run the passes in order, and ``backend``'s tail after the default pipeline. ``dump`` (default: from
    LOWERLM_DUMP) names the passes whose result is printed to ``out`` (default stderr); ``on_pass`` receives each
    PassRecord."""
    dump = _dump_names() if dump is None else dump
    if verify:
        verify_module(module)
    for name, fn in resolve(passes, arm, upcast_from, backend, tp):
        record = run_pass(name, fn, module, verify)
        module = record.module
        if "all" in dump or name in dump:
            print(dump_header(record), file=out or sys.stderr)
            print(print_module(module), file=out or sys.stderr)
        if on_pass is not None:
            on_pass(record)
    return module
