"""``lowerlm.calibrate``: ARM statistics measured on the reference backend, handed to the arm pass as data.

Runs the imported, canonicalised model over calibration tokens and records, for every gated MLP, the activation
``a = act(W_g x̂)`` of the valid tokens. Per channel: centre μ = median(a), scale s = max(MAD(a), 1e-6·max MAD);
τ = the quantile of |(a − μ) / s| over the layer that zeroes the target share of activations. ``mode="plain"``
gives μ = 0, s = 1, τ on |a|: plain thresholding, for comparison; ``mode="center"`` keeps μ but s = 1
(recentring without rescaling), to tell the two parts of ARM apart.
"""

from __future__ import annotations

from importlib import resources

import torch

from lowerlm.errors import InputError
from lowerlm.ir.abi import FORWARD, INPUT_IDS, POSITIONS, SEQ_LENS
from lowerlm.passes.arm import ArmCalibration, ArmLayer, find_gated_mlps

MODES = ("arm", "center", "plain")


def shipped_text(name: str) -> str:
    """A text shipped with lowerlm: ``calibration`` or ``heldout`` (never used for calibration)."""
    return resources.files("lowerlm").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")


def text_tokens(model, text: str, chunk: int = 256, max_tokens: int = 2048) -> list:
    """Token-id chunks of a text (no chat template)."""
    from lowerlm.runtime.text import load_tokenizer

    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise InputError("this model has no tokenizer: calibrate it with token_ids")
    ids = tokenizer.encode(text)[:max_tokens]
    return [ids[i:i + chunk] for i in range(0, len(ids), chunk)]


def activations(model, token_ids: list) -> dict:
    """MLP path -> activations [tokens, I] of every gated MLP over the prompts ``token_ids`` (lists of ids)."""
    from lowerlm.codegen.reference import ReferenceProgram
    from lowerlm.compile import model_weights
    from lowerlm.frontend.trace import trace_model
    from lowerlm.passes import run_pipeline

    if not token_ids or any(len(t) == 0 for t in token_ids):
        raise InputError("calibration needs at least one non-empty prompt of token ids")
    module = run_pipeline(trace_model(model), passes=["canonicalize"], dump=set())
    graph = module.graphs[0]
    wanted = {m.act.name: m.key for m in find_gated_mlps(graph)}
    if not wanted:
        raise InputError("the model has no gated MLP (rms_norm → gate/up → act·mul → down) to calibrate")
    program = ReferenceProgram(module, model_weights(model))
    collected: dict = {key: [] for key in wanted.values()}
    for ids in token_ids:
        valid = len(ids)

        def observe(node, outs, valid=valid):
            if node.name in wanted:
                collected[wanted[node.name]].append(outs[0][0, :valid].reshape(valid, -1).float())

        inputs = {INPUT_IDS: torch.tensor([ids]), POSITIONS: torch.arange(valid)[None],
                  SEQ_LENS: torch.tensor([valid], dtype=torch.int32)}
        program.run(FORWARD, inputs, observe=observe)
    return {key: torch.cat(chunks) for key, chunks in collected.items()}


def layer_stats(a: torch.Tensor, sparsity: float, mode: str = "arm") -> ArmLayer:
    """μ, s and τ for one MLP's activations a [tokens, I]."""
    if mode == "plain":
        mu, scale = torch.zeros(a.shape[1]), torch.ones(a.shape[1])
    else:
        mu = torch.quantile(a, 0.5, dim=0)
        if mode == "center":
            scale = torch.ones(a.shape[1])
        else:
            mad = torch.quantile((a - mu).abs(), 0.5, dim=0)
            scale = torch.clamp(mad, min=1e-6 * float(mad.max()))
    a_hat = ((a - mu) / scale).abs().flatten()
    tau = float(torch.quantile(a_hat[:16_000_000], sparsity)) if sparsity > 0 else 0.0
    return ArmLayer(tuple(mu.tolist()), tuple(scale.tolist()), tau)


def calibrate(model, texts=None, token_ids=None, sparsity: float = 0.5, mode: str = "arm",
              max_tokens: int = 2048) -> ArmCalibration:
    """ARM statistics for a model: from ``token_ids`` (lists of ids; tiny models without a tokenizer) or
    ``texts`` (default: the calibration text shipped with lowerlm)."""
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if token_ids is None:
        texts = [shipped_text("calibration")] if texts is None else ([texts] if isinstance(texts, str) else texts)
        token_ids = [c for t in texts for c in text_tokens(model, t, max_tokens=max_tokens)]
    acts = activations(model, [list(map(int, t)) for t in token_ids])
    return from_activations(acts, sparsity, mode)


def from_activations(acts: dict, sparsity: float, mode: str = "arm") -> ArmCalibration:
    """Calibration data from collected activations (``activations``), at a sparsity."""
    return ArmCalibration(sparsity, tuple((key, layer_stats(a, sparsity, mode)) for key, a in acts.items()), mode)
