"""ARM: golden IR before → after with must-not-fire cases, the arm_mlp semantics, τ = 0 is the dense model,
calibration statistics, prefill/decode agreement, and the reports."""

from __future__ import annotations

import pytest
import torch

import lowerlm
import lowerlm.ir as ir
from lowerlm.calibrate import calibrate, layer_stats
from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.ir import Op
from lowerlm.ir.compute import arm_mlp, rms_norm
from lowerlm.passes import run_pass
from lowerlm.passes.arm import ArmCalibration, ArmLayer, arm

from .conftest import ROOT, calibration_ids, random_weights, tiny_model

GOLDEN = ROOT / "tests" / "golden" / "passes"
LAYER = ArmLayer(mu=(-0.25, -0.1, 0.0, 0.05, 0.1, 0.2), scale=(0.5, 0.25, 1.0, 0.75, 0.5, 0.125), tau=0.5)


def _calibration(*paths, layer=LAYER):
    return ArmCalibration(0.5, tuple((p, layer) for p in paths))


def test_golden_and_must_not_fire():
    """m and n are rewritten (n's product has its operands swapped); o has a gate bias; q has no calibration
    entry; nothing fuses the residual adds yet (fuse_linear_residual does)."""
    before = ir.verify_module(ir.parse_module((GOLDEN / "arm.before.ir").read_text()))
    record = run_pass("arm", arm(_calibration("m.mlp", "n.mlp", "o.mlp")), before)
    assert ir.print_module(record.module) == (GOLDEN / "arm.after.ir").read_text()
    assert record.rewrites == 2
    ops = [n.op for n in record.module.graphs[0].nodes]
    assert ops.count(Op.ARM_MLP) == 2 and ops.count(Op.SILU) == 2


def test_tau_zero_is_exact_and_masked_channels_sit_at_their_centre():
    before = ir.parse_module((GOLDEN / "arm.before.ir").read_text())
    weights = random_weights(before, seed=2, scale=0.6)
    x = {"x": torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))}
    dense = ReferenceProgram(before, weights).run("forward", x)[0]
    exact = arm(_calibration("m.mlp", "n.mlp", layer=ArmLayer(LAYER.mu, LAYER.scale, 0.0)))
    after = run_pass("arm", exact, before).module
    for a, b in zip(ReferenceProgram(after, weights).run("forward", x)[0], dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # with τ > 0: W_d (where(|â| >= τ, a, μ) ⊙ u), an independent form of the same function
    h = rms_norm(x["x"], weights["ln"], 1e-6)
    a = torch.nn.functional.silu(h @ weights["wg"].T)
    u = h @ weights["wu"].T
    mu, s = torch.tensor(LAYER.mu), torch.tensor(LAYER.scale)
    keep = ((a - mu) / s).abs() >= LAYER.tau
    want = (torch.where(keep, a, mu) * u) @ weights["wd"].T
    m = (weights["wd"] * mu) @ weights["wu"]
    got = arm_mlp(x["x"], weights["ln"], torch.cat([weights["wg"], m]), weights["wu"], weights["wd"] * s, mu, s,
                  None, 1e-6, LAYER.tau, "silu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert 0 < keep.float().mean() < 1  # both kept and zeroed channels were exercised


def test_calibration_statistics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=g) * torch.arange(1, 9) + torch.arange(8)
    stats = layer_stats(a, 0.3)
    torch.testing.assert_close(torch.tensor(stats.mu), a.quantile(0.5, dim=0))
    mad = (a - a.quantile(0.5, dim=0)).abs().quantile(0.5, dim=0)
    torch.testing.assert_close(torch.tensor(stats.scale), mad)
    a_hat = (a - torch.tensor(stats.mu)) / torch.tensor(stats.scale)
    assert abs(float((a_hat.abs() < stats.tau).float().mean()) - 0.3) < 0.01
    plain = layer_stats(a, 0.3, mode="plain")
    assert set(plain.mu) == {0.0} and set(plain.scale) == {1.0}
    assert abs(float((a.abs() < plain.tau).float().mean()) - 0.3) < 0.01
    assert layer_stats(a, 0.0).tau == 0.0


CAL_IDS = calibration_ids()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_arm_with_tau_zero_matches_eager_logits_and_greedy_tokens(family):
    model = tiny_model(family)
    cal = calibrate(model, token_ids=CAL_IDS, sparsity=0.0)
    cm = lowerlm.compile_model(model, backend="reference", arm=cal, max_batch=2, max_seq_len=64)
    assert sum(n.op is Op.ARM_MLP for n in cm.ir.graph("decode").nodes) == 2
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(ids).logits
    assert (cm(ids) - want).abs().max() <= 1e-4 * want.abs().max()
    prompt = [5, 7, 9, 11, 3]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, 5:].tolist()
    assert [s[0] for s in cm.generate_ids([prompt], 32)] == hf


def test_arm_fires_on_a_model_computed_in_f32():
    """upcast turns parameters into load-time casts: arm still finds the MLPs and composes its weights over them
    (τ = 0: the logits of the model converted with ``model.float()``)."""
    import copy

    model = tiny_model("llama").to(torch.bfloat16)
    cal = calibrate(model, token_ids=CAL_IDS, sparsity=0.0)
    cm = lowerlm.compile_model(model, backend="reference", dtype=torch.float32, arm=cal, max_seq_len=64)
    assert [r.name for r in cm.records][:3] == ["upcast", "canonicalize", "arm"] and cm.records[2].rewrites == 2
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = copy.deepcopy(model).float()(ids).logits
    assert (cm(ids) - want).abs().max() <= 1e-4 * want.abs().max()


def test_sparse_arm_prefill_and_decode_agree():
    """The mask applies in prefill and decode alike: generated tokens are the argmax of cm() on the growing
    sequence (teacher forcing)."""
    model = tiny_model("llama")
    cal = calibrate(model, token_ids=CAL_IDS, sparsity=0.6)
    cm = lowerlm.compile_model(model, backend="reference", arm=cal, max_seq_len=64)
    prompt = [5, 7, 9, 11, 3]
    generated = [s[0] for s in cm.generate_ids([prompt], 12, stop_ids=[])]
    logits = cm(torch.tensor([prompt + generated[:-1]]))[0]
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == generated


@pytest.mark.slow
def test_smollm2_arm_tau_zero_matches_eager():
    model = lowerlm.load("smollm2")
    cal = calibrate(model, sparsity=0.0, max_tokens=64)
    cm = lowerlm.compile_model(model, backend="reference", arm=cal, max_batch=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    assert (cm(ids) - want).abs().max() <= 1e-4 * want.abs().max()
    from lowerlm.runtime.text import encode

    prompt = encode(cm.tokenizer, "What is the capital of France?", chat=True)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert [s[0] for s in cm.generate_ids([prompt], 32)] == hf
