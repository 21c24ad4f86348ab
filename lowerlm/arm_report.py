"""ARM reports: ``arm-hist`` (the activation before and after redistribution) and ``arm-eval`` (held-out
perplexity and logit KL, ARM versus plain thresholding at equal bytes read per token)."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lowerlm.calibrate import activations, from_activations, shipped_text, text_tokens
from lowerlm.errors import InputError


def skew(x: torch.Tensor) -> float:
    x = x.double().flatten()
    d = x - x.mean()
    return float((d**3).mean() / (d**2).mean() ** 1.5)


def _layer_count(model) -> int | None:
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return layers if isinstance(layers, int) else None


def arm_hist(model, layer: int, out, sparsity: float = 0.5, progress: Callable[[str], None] | None = None) -> dict:
    """Write an image (its format from ``out``'s suffix: .png, .svg, .pdf): above, the raw activation a of MLP
    ``layer``; below, â = (a − μ)/s with the ±τ band shaded. Returns the numbers it prints (skew of each, mass
    within ±τ). The arguments are checked before the activations are measured (a minute for SmolLM2); the image
    is written under a temporary name and renamed into place."""
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
    layers = _layer_count(model)
    if layers is not None and not 0 <= layer < layers:
        raise InputError(f"layer {layer}: the model has {layers} layers; give 0 to {layers - 1}")
    out = Path(out)
    if not out.absolute().parent.is_dir():
        raise InputError(f"folder {out.absolute().parent} does not exist; create it or write the image elsewhere")
    say = progress or (lambda msg: None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = text_tokens(model, shipped_text("calibration"))
    say(f"measuring every MLP's activation over {sum(map(len, tokens))} calibration tokens (reference backend)")
    acts = activations(model, tokens)
    key = f"model.layers.{layer}.mlp"
    if key not in acts:
        raise InputError(f"no gated MLP at layer {layer}; the model has {len(acts)} ({', '.join(list(acts)[:3])} …)")
    say(f"drawing the histograms of {key}")
    a = acts[key]
    stats = dict(from_activations({key: a}, sparsity).layers)[key]
    a_hat = (a - torch.tensor(stats.mu)) / torch.tensor(stats.scale)
    tau = stats.tau
    lo, hi = torch.quantile(a.flatten()[:16_000_000], torch.tensor([0.001, 0.999])).tolist()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7))
    top.hist(a.flatten().numpy(), bins=300, range=(lo, hi), color="tab:blue")
    top.set_title(f"{key}: activation a = act(W_g x̂), {a.shape[0]} tokens × {a.shape[1]} channels")
    top.axvline(0, color="k", lw=0.8)
    top.set_xlabel("a")
    lo_h, hi_h = torch.quantile(a_hat.flatten()[:16_000_000], torch.tensor([0.001, 0.999])).tolist()
    bottom.hist(a_hat.flatten().numpy(), bins=300, range=(min(lo_h, -2 * tau), max(hi_h, 2 * tau)), color="tab:green")
    bottom.axvspan(-tau, tau, color="tab:red", alpha=0.2, label=f"|â| < τ = {tau:.3g}: zeroed ({sparsity:.0%})")
    bottom.axvline(0, color="k", lw=0.8)
    bottom.set_title("redistributed â = (a − μ) / s (per-channel median μ, MAD s)")
    bottom.set_xlabel("â")
    bottom.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=out.absolute().parent, prefix=f".{out.name}.tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets; an image gets the usual mode
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=110, format=out.suffix.lstrip(".").lower() or "png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"skew_a": skew(a), "skew_a_hat": skew(a_hat), "tau": tau,
            "mass_within_tau": float((a_hat.abs() < tau).float().mean())}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass(frozen=True)
class EvalRow:
    method: str
    sparsity: float
    mlp_bytes: float  # weight bytes the MLPs read per token, relative to dense
    perplexity: float
    kl: float  # mean KL(dense || method) per token, nats


def _nll_and_logprobs(cm, chunks: list):
    nll, count, logprobs = 0.0, 0, []
    for ids in chunks:
        logits = cm(torch.tensor([ids]))[0].float()
        lp = torch.log_softmax(logits, -1)
        target = torch.tensor(ids[1:])
        nll -= float(lp[:-1].gather(-1, target[:, None]).sum())
        count += len(ids) - 1
        logprobs.append(lp)
    return nll / count, torch.cat(logprobs)


def arm_eval(model, sparsities=(0.3, 0.4, 0.5, 0.6, 0.7), max_tokens: int = 1024,
             progress: Callable[[str], None] | None = None) -> list:
    """Rows for dense, then for each sparsity p: ARM at p, ARM's recentring alone (μ but no rescaling) at p, and
    plain thresholding of a at the sparsity that reads the same weight bytes per token (M counted:
    p_plain = p - H / (2 I)). ``progress(message)`` is told as each of those (minutes in all for SmolLM2)
    starts."""
    import lowerlm

    bad = [p for p in sparsities if not 0.0 <= p < 1.0]
    if bad or not sparsities:
        raise InputError(f"sparsities must be in [0, 1) (at least one), got {list(sparsities)}")
    if max_tokens < 2:
        raise InputError(f"max_tokens must be >= 2 (a perplexity needs a token to predict), got {max_tokens}")
    say = progress or (lambda msg: None)
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    m_share = hidden / (2 * inter)
    runs = [(method, sparsity, mode) for p in sparsities
            for method, sparsity, mode in (("arm", p, "arm"), ("arm, centre only", p, "center"),
                                           ("plain", p - m_share, "plain")) if sparsity >= 0]
    steps = len(runs) + 1
    cal_tokens = text_tokens(model, shipped_text("calibration"))
    say(f"measuring every MLP's activation over {sum(map(len, cal_tokens))} calibration tokens (reference backend)")
    cal_acts = activations(model, cal_tokens)
    held = text_tokens(model, shipped_text("heldout"), max_tokens=max_tokens)
    say(f"scoring 1/{steps}: dense, {sum(map(len, held))} held-out tokens")
    dense = lowerlm.compile_model(model, backend="reference", max_batch=1)
    dense_nll, dense_lp = _nll_and_logprobs(dense, held)
    rows = [EvalRow("dense", 0.0, 1.0, math.exp(dense_nll), 0.0)]
    for i, (method, sparsity, mode) in enumerate(runs):
        say(f"scoring {i + 2}/{steps}: {method} at sparsity {sparsity:.3f}")
        arm = from_activations(cal_acts, sparsity, mode)
        cm = lowerlm.compile_model(model, backend="reference", max_batch=1, arm=arm)
        nll, lp = _nll_and_logprobs(cm, held)
        kl = float((dense_lp.exp() * (dense_lp - lp)).sum(-1).mean())
        # bytes per token, in units of one I x H matrix: W_g (+ M) + the kept part of W_u and W_d
        read = 1 + (m_share * 2 if mode != "plain" else 0) + 2 * (1 - sparsity)
        rows.append(EvalRow(method, sparsity, read / 3, math.exp(nll), kl))
    return rows


def format_rows(rows: list) -> str:
    lines = ["| method | sparsity | MLP bytes / dense | held-out perplexity | mean KL vs dense (nats) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.sparsity:.3f} | {r.mlp_bytes:.3f} | {r.perplexity:.3f} | {r.kl:.4f} |")
    return "\n".join(lines)
