"""The ONNX backend (ONNX Runtime, CPU): f32 logits within 1e-4 × max |logit| of eager, greedy tokens equal to
transformers' generate, batches equal to single prompts, and lowering of every op class the pipeline leaves."""

from __future__ import annotations

import pytest
import torch

import lowerlm
from lowerlm.calibrate import calibrate
from lowerlm.errors import InputError
from lowerlm.ir.opdefs import COMPARISONS

from .conftest import calibration_ids, tiny_model


def _close(got, want):
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_tiny_families_through_onnx(family):
    model = tiny_model(family, sliding_window=4) if family == "mistral" else tiny_model(family)
    cm = lowerlm.compile_model(model, backend="onnx", max_batch=3, max_seq_len=64)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = model(ids).logits
        want_padded = model(ids, attention_mask=mask).logits
    _close(cm(ids), want)
    got = cm(ids, attention_mask=mask)
    _close(got[1, :6], want_padded[1, :6])
    prompts = [[5, 7, 9, 11, 3], [8, 1, 4], [2, 9, 9, 9, 9, 9, 30]]
    for p in prompts:
        with torch.no_grad():
            hf = model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0, len(p):].tolist()
        assert [s[0] for s in cm.generate_ids([p], 32)] == hf
    batch = list(cm.generate_ids(prompts, 16))
    assert [s[1] for s in batch if s[1] is not None] == [s[0] for s in cm.generate_ids([prompts[1]], 16)]


def test_arm_through_onnx():
    model = tiny_model("llama")
    cal = calibrate(model, token_ids=calibration_ids(3, 32), sparsity=0.5)
    want = lowerlm.compile_model(model, backend="reference", arm=cal)
    got = lowerlm.compile_model(model, arm=cal, backend="onnx")
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got(x), want(x), rtol=1e-5, atol=1e-5)


def test_attention_uses_group_query_attention_when_head_dims_allow():
    """Head dims that are multiples of 16: rope + cache writes + attention become one com.microsoft
    GroupQueryAttention per layer, in decode and in the prefill (a first prompt: positions from 0). The logits of a
    right-padded batch whose rows are all shorter than the prompt width match the reference backend, so do the
    caches it writes, and the greedy tokens those of transformers; a prefill that continues the cache with rows of
    other lengths, or starts rows at different positions, is refused (ORT derives positions from lengths)."""
    from lowerlm.codegen.onnx.lower import lower_graph
    from lowerlm.runtime.generate import allocate_state

    model = tiny_model("llama", hidden_size=64, intermediate_size=96)  # 4 heads of 16
    cm = lowerlm.compile_model(model, backend="onnx", max_seq_len=64)
    for graph in ("decode", "prefill"):
        ops = [n.op_type for n in lower_graph(cm.ir.graph(graph), cm.program._constant).graph.node]
        assert ops.count("GroupQueryAttention") == 2 and "TensorScatter" not in ops, graph
    ref = lowerlm.compile_model(model, backend="reference", max_seq_len=64)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(2))
    lens = torch.tensor([7, 4, 1])  # total length 9 > every row's
    inputs = {"input_ids": ids, "positions": torch.arange(9).repeat(3, 1), "seq_lens": lens.to(torch.int32),
              "logit_index": (lens - 1)[:, None]}
    states = [allocate_state(cm.ir, 3, 16) for _ in range(2)]
    (got,), _ = cm.program.run("prefill", inputs, states[0], inplace=True)
    (want,), _ = ref.program.run("prefill", inputs, states[1], inplace=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, buf in states[1].items():  # the valid slots (ORT leaves the padded ones alone)
        for row, n in enumerate(lens.tolist()):
            torch.testing.assert_close(states[0][name][row, :, :n], buf[row, :, :n], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="continues a cache only with every row full"):
        cm.program.run("prefill", inputs | {"positions": torch.arange(2, 11).repeat(3, 1)}, states[0], inplace=True)
    staggered = torch.arange(9).repeat(3, 1) + torch.tensor([[0], [1], [0]])
    with pytest.raises(InputError, match="the same in every row"):
        cm.program.run("prefill", inputs | {"positions": staggered}, states[0], inplace=True)
    prompt = [5, 7, 9, 11, 3]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, 5:].tolist()
    assert [s[0] for s in cm.generate_ids([prompt], 24)] == hf
    batch = list(cm.generate_ids([prompt, [8, 1, 4]], 12))
    assert [s[1] for s in batch if s[1] is not None] == [s[0] for s in cm.generate_ids([[8, 1, 4]], 12)]


def test_long_prompts_prefill_in_chunks():
    """A long prompt's prefill runs in chunks that continue the cache (prefill_chunk: 4 of them from 256 tokens),
    a batch's sequences one at a time without their padding (ORT continues a cache only at batch 1): a right-padded
    batch gets the reference backend's last-token logits and the same cache slots, and the greedy tokens of
    transformers; short prompts run whole."""
    from lowerlm.runtime.generate import allocate_state, prefill

    model = tiny_model("llama", hidden_size=64, intermediate_size=96, max_position_embeddings=512)  # heads of 16
    cm = lowerlm.compile_model(model, backend="onnx", max_batch=3, max_seq_len=400)
    ref = lowerlm.compile_model(model, backend="reference", max_batch=3, max_seq_len=400)
    assert cm.program.prefill_chunk(255) is None and cm.program.prefill_chunk(300) == 128
    assert cm.program.prefill_chunk(1000) == 250 and ref.program.prefill_chunk(1000) is None
    if not torch.cuda.is_available():  # auto on a CPU runs this prefill whole on ONNX, so it chunks the same way
        assert lowerlm.compile_model(model, backend="auto", max_seq_len=400).program.prefill_chunk(300) == 128
    calls = []
    run = cm.program.run
    cm.program.run = lambda graph, inputs, *a, **k: calls.append(tuple(inputs["positions"].shape)) or \
        run(graph, inputs, *a, **k)
    lens = torch.tensor([300, 90, 280])
    ids = torch.randint(0, 64, (3, 300), generator=torch.Generator().manual_seed(4))
    states = [allocate_state(cm.ir, 3, 400) for _ in range(2)]
    got = prefill(cm.program, states[0], ids, lens)
    assert calls == [(1, 128), (1, 128), (1, 44), (1, 90), (1, 128), (1, 128), (1, 24)]  # 300, 90, 280 tokens
    want = prefill(ref.program, states[1], ids, lens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name, buf in states[1].items():
        for row, n in enumerate(lens.tolist()):
            torch.testing.assert_close(states[0][name][row, :, :n], buf[row, :, :n], rtol=1e-4, atol=1e-5)
    cm.program.run = run
    prompts = [ids[0].tolist(), ids[1, :90].tolist()]
    with torch.no_grad():
        hf = model.generate(ids[:1], max_new_tokens=16, do_sample=False)[0, 300:].tolist()
    steps = list(cm.generate_ids(prompts, 16))
    assert [s[0] for s in steps] == hf
    assert [s[1] for s in steps if s[1] is not None] == [s[0] for s in cm.generate_ids([prompts[1]], 16)]


@pytest.mark.slow
def test_smollm2_through_onnx():
    model = lowerlm.load("smollm2")
    cm = lowerlm.compile_model(model, backend="onnx", max_batch=1, max_seq_len=256)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    _close(cm(ids), want)
    from lowerlm.runtime.text import encode

    prompt = encode(cm.tokenizer, "What is the capital of France?", chat=True)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert [s[0] for s in cm.generate_ids([prompt], 32)] == hf


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_export_onnx_runs_with_plain_onnxruntime(tmp_path, family):
    """The exported prefill/decode models, driven by onnxruntime alone as the JSON describes, give lowerlm's
    logits, and the greedy tokens of transformers."""
    import json

    import numpy as np
    import onnx
    import onnxruntime as ort

    from lowerlm.codegen.onnx.export import export

    # head dim 16: the runtime path would use GroupQueryAttention; Mistral's window goes into the attention mask
    extra = {"sliding_window": 4} if family == "mistral" else {}
    model = tiny_model(family, hidden_size=64, intermediate_size=96, **extra)
    cm = lowerlm.compile_model(model, backend="onnx", max_seq_len=32)
    index = json.loads(export(cm.program, tmp_path, 32, 64).read_text())
    for name in ("prefill", "decode"):
        exported = onnx.load(str(tmp_path / f"{name}.onnx"), load_external_data=False)
        assert {n.domain for n in exported.graph.node} <= {""}, "standalone exports use standard ops only"
        ops = [n.op_type for n in exported.graph.node]
        assert ops.count("Attention") == ops.count("TensorScatter") // 2 == 2  # one per layer
        assert ops.count("RMSNormalization") == 5
    sessions = {name: ort.InferenceSession(str(tmp_path / g["file"]), providers=["CPUExecutionProvider"])
                for name, g in index["graphs"].items()}
    env = {"B": 1, "T": index["max_seq_len"]}
    state = {s["name"]: np.zeros([env[d] if d in env else int(d) for d in s["shape"]], np.float32)
             for s in index["graphs"]["prefill"]["state"]}

    def step(name, ids, positions):
        g = index["graphs"][name]
        feed = {"input_ids": np.array([ids], np.int64), "positions": np.array([positions], np.int64),
                "seq_lens": np.array([positions[-1] + 1], np.int32)} | state
        if name == "prefill":  # the logits of the last prompt row only (the JSON lists the input)
            assert [v["name"] for v in g["inputs"]][-1] == "logit_index"
            feed["logit_index"] = np.array([[len(ids) - 1]], np.int64)
        outs = sessions[name].run(None, feed)
        for s, value in zip(g["state"], outs[len(g["outputs"]):]):
            state[s["name"]] = value
        return outs[0][0, -1]

    prompt = [5, 7, 9, 11, 3]
    logits = step("prefill", prompt, list(range(5)))
    torch.testing.assert_close(torch.from_numpy(logits), cm(torch.tensor([prompt]))[0, -1], rtol=1e-5, atol=1e-5)
    tokens = []
    for i in range(8):
        tokens.append(int(logits.argmax()))
        logits = step("decode", [tokens[-1]], [5 + i])
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, 5:].tolist()
    assert tokens == hf


def test_the_default_backend_auto_prefers_onnx_on_a_cpu():
    """compile_model's default is auto, which on a CPU runs a Llama whole on ONNX Runtime (not the reference
    oracle): eager's logits and greedy tokens."""
    from lowerlm.codegen.auto import AutoProgram

    if torch.cuda.is_available():
        pytest.skip("with a GPU, auto prefers Triton")
    model = tiny_model("llama")
    cm = lowerlm.compile_model(model, max_seq_len=64)
    assert isinstance(cm.program, AutoProgram)
    plans = cm.program.plan()
    assert [(name, [p.backend for p in plan.parts]) for name, plan in plans.items()] == \
        [("prefill", ["onnx"]), ("decode", ["onnx"])]
    assert all(plan.whole and plan.parts[0].graph is plan.graph for plan in plans.values())
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    prompt = [5, 7, 9, 11, 3]
    with torch.no_grad():
        _close(cm(ids), model(ids).logits)
        eager = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert [s[0] for s in cm.generate_ids([prompt], 32, stop_ids=[])] == eager[0, len(prompt):].tolist()


def test_auto_computes_a_bf16_model_in_f32_on_a_cpu():
    """ONNX Runtime has no bf16 kernels on a CPU: auto computes a bf16 model in f32 (the upcast pass first), says
    so, runs both graphs whole on ONNX and returns bf16 logits. They are the f32 computation of the same weights
    (``model.float()``) rounded to bf16 (each within half a bf16 ulp of its own value: one ulp of the largest
    bounds it), eager bf16's to its rounding (four ulps of the largest), and the greedy tokens are the f32
    model's."""
    import copy

    if torch.cuda.is_available():
        pytest.skip("with a GPU, auto prefers Triton")
    model = tiny_model("llama").to(torch.bfloat16)
    with pytest.warns(UserWarning, match="bf16 model is computed in float32"):
        cm = lowerlm.compile_model(model, max_seq_len=64, use_cache=False)
    assert cm.records[0].name == "upcast"
    plans = cm.program.plan()
    assert all(plan.whole and plan.parts[0].backend == "onnx" for plan in plans.values())
    f32_model = copy.deepcopy(model).float()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    prompt = [5, 7, 9, 11, 3]
    with torch.no_grad():
        got = cm(ids)
        want32, want16 = f32_model(ids).logits, model(ids).logits.float()
        eager = f32_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want32).abs().max() <= 2**-8 * want32.abs().max()
    assert (got.float() - want16).abs().max() <= 4 * 2**-8 * want16.abs().max()
    assert [s[0] for s in cm.generate_ids([prompt], 32, stop_ids=[])] == eager[0, len(prompt):].tolist()


def test_auto_keeps_bf16_when_asked():
    """``dtype=torch.bfloat16`` keeps bf16 compute: no ONNX for it, so auto runs the graphs whole on the reference
    backend (not ONNX islands of index arithmetic between reference partitions), no warning, and the plan says
    why."""
    import warnings

    if torch.cuda.is_available():
        pytest.skip("with a GPU, auto prefers Triton")
    model = tiny_model("llama").to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = lowerlm.compile_model(model, dtype=torch.bfloat16, max_seq_len=64, use_cache=False)
    plans = cm.program.plan()
    assert all(plan.whole and plan.parts[0].backend == "reference" for plan in plans.values())
    assert cm.program.main._sessions == {}
    plan_text = "\n".join(cm.program.describe())
    assert "fallback for cached_attention, embedding" in plan_text and "dtype=torch.float32" in plan_text
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = cm(ids).float(), model(ids).logits.float()
    assert (got - want).abs().max() <= 4 * 2**-8 * want.abs().max()  # four bf16 ulps of the largest logit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_onnx_computes_a_narrow_model_in_f32_when_asked(dtype):
    """``backend="onnx", dtype=torch.float32`` on a bf16 or f16 model: f32 logits, those of ``model.float()``."""
    import copy

    model = tiny_model("llama").to(dtype)
    cm = lowerlm.compile_model(model, backend="onnx", dtype=torch.float32, max_seq_len=64, use_cache=False)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got, want = cm(ids), copy.deepcopy(model).float()(ids).logits
    assert got.dtype == torch.float32
    _close(got, want)


def test_an_f16_model_through_onnx():
    """An f16 model lowers without an overflowing constant (the attention mask's fill is f16's finite minimum, not
    -1e30, which casts to -inf) and gives eager f16's logits to f16 rounding: within 2e-3 (two f16 ulps at 1; the
    logits here are below 1), padded batch included."""
    import warnings

    model = tiny_model("llama").to(torch.float16)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cm = lowerlm.compile_model(model, backend="onnx", max_seq_len=64, use_cache=False)
        cm.program.prepare()
    with torch.no_grad():
        want, want_padded = model(ids).logits, model(ids, attention_mask=mask).logits
    got, got_padded = cm(ids), cm(ids, attention_mask=mask)
    assert got.dtype == torch.float16 and want.abs().max() < 1
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-3)
    torch.testing.assert_close(got_padded[1, :5].float(), want_padded[1, :5].float(), rtol=0, atol=2e-3)
    assert torch.isfinite(got_padded).all()


def test_quantized_weights_option():
    """weight_bits: every projection becomes MatMulNBits (the f32 weights are gone from the model); logits stay
    near the f32 ones (int8: within 3% of the largest logit here; int4 is reported in BENCHMARKS.md by token
    agreement on SmolLM2, not asserted)."""
    import onnx

    from lowerlm.codegen.onnx.lower import lower_graph
    from lowerlm.ir.errors import CompileError

    model = tiny_model("llama", hidden_size=64, intermediate_size=96)
    cm = lowerlm.compile_model(model, backend="onnx", weight_bits=8)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    assert (cm(ids) - want).abs().max() <= 0.03 * want.abs().max()
    from onnx import numpy_helper

    f32_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n)
    for bits in (8, 4):
        decode = lower_graph(cm.ir.graph("decode"), cm.program._constant, weight_bits=bits)
        ops = [n.op_type for n in decode.graph.node]
        assert ops.count("MatMulNBits") == 2 * 4 + 1  # per layer q|k|v, o, gate|up, down; then lm_head
        inits = {t.name: numpy_helper.to_array(t) for t in decode.graph.initializer}
        matmul_bytes = sum(inits[i].nbytes for n in decode.graph.node if n.op_type == "MatMul" for i in n.input
                           if i in inits)
        # int8: no f32 weight left; int4: only the per-block offsets and the block-sum indicator, not the weights
        assert matmul_bytes == 0 if bits == 8 else matmul_bytes < f32_bytes / 8
        onnx.checker.check_model(decode)
    with pytest.raises(CompileError, match="weight_bits quantizes weights for the ONNX backend"):
        lowerlm.compile_model(model, backend="reference", weight_bits=4)
    with pytest.raises(CompileError, match="weight_bits must be 4 or 8"):
        lowerlm.compile_model(model, backend="onnx", weight_bits=3)


def _q4_1(w: torch.Tensor) -> torch.Tensor:
    """``w`` [N, K] as a Q4_1 GGUF stores it, dequantised: per block of 32, min and (max-min)/15 in f16, codes."""
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    lo = blocks.min(-1, keepdim=True).values.half().float()
    d = ((blocks.max(-1, keepdim=True).values - lo) / 15).half().float()
    codes = ((blocks - lo) / d).round().clamp(0, 15)
    return (codes * d + lo).reshape(n, k)


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    """``w`` [N, K] as a Q8_0 GGUF stores it, dequantised: per block of 32, max|w|/127 in f16 times int8 codes."""
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    d = (blocks.abs().max(-1, keepdim=True).values / 127).half().float()
    return ((blocks / d).round().clamp(-127, 127) * d).reshape(n, k)


def test_weights_on_a_4_bit_grid_run_as_exact_matmulnbits():
    """A Q4_1 GGUF's weights dequantise onto a 4-bit grid, a Q8_0 one's onto a symmetric 8-bit grid: the ONNX
    backend finds that and stores them as 4-bit MatMulNBits (one term, or two for 8 bits: exactly the same numbers
    in a fraction of the bytes): logits within 1e-4 and the same 32 tokens."""
    from lowerlm.codegen.onnx.lower import lower_graph
    from lowerlm.codegen.onnx.quantize import Packer, grid4, grid8

    model = tiny_model("llama", hidden_size=64, intermediate_size=96)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.copy_(_q8_0(p) if name == "lm_head.weight" else _q4_1(p))
    cm = lowerlm.compile_model(model, backend="onnx", max_seq_len=64)
    ops = [n.op_type for n in lower_graph(cm.ir.graph("decode"), cm.program._constant,
                                          packer=Packer()).graph.node]
    assert ops.count("MatMulNBits") == 2 * 4 + 2  # q|k|v, o, gate|up, down per layer; lm_head's two terms
    assert grid4(model.lm_head.weight.detach().numpy()) is None
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(cm(ids), model(ids).logits)
    prompt = [5, 7, 9, 11, 3]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert [s[0] for s in cm.generate_ids([prompt], 32)] == hf
    # off the grids (the random embedding), nothing is packed
    embedding = model.model.embed_tokens.weight.detach().numpy()
    assert grid4(embedding) is None and grid8(embedding) is None


def _cache_model():
    """A tiny Llama whose projections are on Q4_1 grids (packed MatMulNBits weights, as SmolLM2's GGUF gives)."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=96)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and name != "lm_head.weight":
                p.copy_(_q4_1(p))
    return model


def _entries(root):
    folder = root / "onnx"
    return sorted(folder.glob("*.onnx")), sorted(folder.glob("*.bin"))


def _lowerings(monkeypatch):
    """Counts calls of the ONNX lowering (what a warm compile skips)."""
    import lowerlm.codegen.onnx.lower as lower

    calls = []
    real = lower.lower_graph
    monkeypatch.setattr(lower, "lower_graph", lambda *a, **k: calls.append(a[0].name) or real(*a, **k))
    return calls


def test_compile_cache_reuses_lowered_graphs(tmp_path, monkeypatch):
    """A second compile of the same model loads both lowered graphs from the compile cache (no lowering, no weight
    expression evaluated: the concatenated q|k|v copies are never made; every blob hashed, once per process though
    both graphs name it, and again after any change to the file, even one that keeps its mtime) and gives the same
    logits and tokens. The two graphs share one copy of each weight. Other weights or another weight_bits are other
    entries; use_cache=False neither reads nor writes it."""
    import os

    import onnx

    from lowerlm.codegen.onnx import cache

    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path))
    lowerings = _lowerings(monkeypatch)
    model = _cache_model()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    prompt = [5, 7, 9, 11, 3]
    cold = lowerlm.compile_model(model, backend="onnx", max_seq_len=64)
    want, want_tokens = cold(ids), list(cold.generate_ids([prompt], 16))
    assert sorted(lowerings) == ["decode", "prefill"]
    models, blobs = _entries(tmp_path)
    assert len(models) == 2 and blobs
    located = [{e.value for t in onnx.load(str(m), load_external_data=False).graph.initializer
                for e in t.external_data if e.key == "location"} for m in models]
    assert located[0] & located[1] and set.union(*located) == {b.name for b in blobs}  # shared, nothing else
    with torch.no_grad():
        _close(want, model(ids).logits)

    lowerings.clear()
    hashed = []
    real_digest = cache.content_digest
    monkeypatch.setattr(cache, "content_digest", lambda path: hashed.append(path.name) or real_digest(path))
    monkeypatch.setattr(cache, "_digests", {})  # as in a fresh process
    warm = lowerlm.compile_model(model, backend="onnx", max_seq_len=64)
    assert torch.equal(warm(ids), want) and list(warm.generate_ids([prompt], 16)) == want_tokens
    assert lowerings == [] and sorted(hashed) == [b.name for b in blobs]  # each blob once
    assert all(v is None for v in warm.program._constants.values())  # no weight expression evaluated either
    hashed.clear()
    lowerlm.compile_model(model, backend="onnx", max_seq_len=64).program.prepare()
    assert hashed == [] and lowerings == []  # hashed already by this process, unchanged since
    stat = blobs[0].stat()
    os.utime(blobs[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same mtime, a new ctime: hashed again
    lowerlm.compile_model(model, backend="onnx", max_seq_len=64).program.prepare()
    assert hashed == [blobs[0].name] and lowerings == []

    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] += 1.0
    lowerlm.compile_model(model, backend="onnx", max_seq_len=64).program.prepare()
    assert sorted(lowerings) == ["decode", "prefill"] and len(_entries(tmp_path)[0]) == 4
    lowerlm.compile_model(model, backend="onnx", max_seq_len=64, weight_bits=8).program.prepare()
    assert len(_entries(tmp_path)[0]) == 6
    lowerings.clear()
    lowerlm.compile_model(model, backend="onnx", max_seq_len=64, use_cache=False).program.prepare()
    assert sorted(lowerings) == ["decode", "prefill"] and len(_entries(tmp_path)[0]) == 6


@pytest.mark.parametrize("damage", ["blob bytes", "truncated model", "model altered, still valid",
                                    "model ONNX Runtime rejects"])
def test_compile_cache_rebuilds_a_damaged_entry(tmp_path, monkeypatch, damage):
    """A damaged entry is found on load (a blob whose content hash is not the manifest's; a model file that does not
    parse, or that parses and runs but not with the bytes its hash records; a model ONNX Runtime cannot load, its digest
    made to match): a warning, the graph lowered again, the right logits, and the entry whole again for the next
    compile."""
    import json

    import onnx
    from onnx import TensorProto, helper

    from lowerlm.ir.cache import bytes_digest

    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path))
    model = _cache_model()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    cold = lowerlm.compile_model(model, backend="onnx", max_seq_len=64)
    cold.program.prepare()
    want = cold(ids)
    models, blobs = _entries(tmp_path)
    assert len(models) == 2
    if damage == "blob bytes":
        data = bytearray(blobs[0].read_bytes())
        data[len(data) // 2] ^= 0x40
        blobs[0].write_bytes(bytes(data))
    for m in models:
        if damage == "truncated model":
            m.write_bytes(m.read_bytes()[:100])
        elif damage == "model altered, still valid":  # another epsilon: ONNX Runtime runs it, other numbers
            altered = onnx.load(str(m), load_external_data=False)
            norms = [a for n in altered.graph.node if n.op_type == "RMSNormalization" for a in n.attribute
                     if a.name == "epsilon"]
            assert norms
            for a in norms:
                a.f = 0.5
            m.write_bytes(altered.SerializeToString())
        elif damage == "model ONNX Runtime rejects":
            bad = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "bad",
                                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
            onnx.save(helper.make_model(bad), str(m))
            manifest = json.loads(m.with_suffix(".json").read_text())
            manifest["model"] = bytes_digest(m.read_bytes())
            m.with_suffix(".json").write_text(json.dumps(manifest))
    lowerings = _lowerings(monkeypatch)
    damaged = lowerlm.compile_model(model, backend="onnx", max_seq_len=64)
    with pytest.warns(UserWarning, match="compile cache entry"):
        damaged.program.prepare()
    torch.testing.assert_close(damaged(ids), want, rtol=0, atol=0)
    assert lowerings
    lowerings.clear()
    again = lowerlm.compile_model(model, backend="onnx", max_seq_len=64)
    again.program.prepare()
    torch.testing.assert_close(again(ids), want, rtol=0, atol=0)
    assert lowerings == []


def test_compile_cache_that_cannot_be_written(tmp_path, monkeypatch):
    """A cache that cannot be written (here: its folder is a file; then the model file alone fails) gives a warning
    and a program that runs as without the cache, the lowered model left whole."""
    from lowerlm.codegen.onnx import cache
    from lowerlm.codegen.onnx.program import OnnxProgram

    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path))
    model = _cache_model()
    cm = lowerlm.compile_model(model, backend="onnx", max_seq_len=64, use_cache=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    want = cm(ids)
    (tmp_path / "onnx").write_text("not a folder")
    cm.program = OnnxProgram(cm.ir, cm.weights)
    with pytest.warns(UserWarning, match="cannot write the ONNX compile cache"):
        assert torch.equal(cm(ids), want)
    (tmp_path / "onnx").unlink()
    real = cache.atomic_write
    monkeypatch.setattr(cache, "atomic_write", lambda path, data: real(path, data) if path.suffix == ".bin"
                        else (_ for _ in ()).throw(OSError("disk full")))
    cm.program = OnnxProgram(cm.ir, cm.weights)
    with pytest.warns(UserWarning, match="disk full"):
        assert torch.equal(cm(ids), want)
    assert list((tmp_path / "onnx").glob("*.bin")) and not list((tmp_path / "onnx").glob("*.onnx"))


# ---- the lowering table: every op lowered or declared not lowered; the backend fusions against ir/compute.py -------
def test_every_op_has_a_lowering_or_is_declared_not_lowered():
    from lowerlm.codegen.onnx.lower import LOWERINGS, NOT_LOWERED, ONNX_OPS, REFUSALS
    from lowerlm.ir import Op

    assert set(LOWERINGS) | NOT_LOWERED == set(Op) and not set(LOWERINGS) & NOT_LOWERED
    assert set(ONNX_OPS) <= set(LOWERINGS) and set(REFUSALS) <= set(LOWERINGS)


def _lower_and_run(text: str, feeds: dict, contrib: bool = True):
    """The one-node graph of ``text`` lowered to ONNX and run by ONNX Runtime, and its node run by the op's
    reference implementation (ir/compute.py): (the model's op types, ORT's results, the reference's), results in the
    node's order (a state result: its new version)."""
    import onnxruntime as ort

    import lowerlm.ir as ir
    from lowerlm.codegen.onnx.lower import lower_graph
    from lowerlm.ir.fold import run_op

    g = ir.verify_module(ir.parse_module(text)).graphs[0]
    (node,) = g.nodes
    model = lower_graph(g, constants=None, contrib=contrib)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {k: v.numpy() for k, v in feeds.items()})))
    state_of = {o: s.name + ".out" for s, o in zip(g.state, g.state_outputs)}
    got = [torch.from_numpy(got[state_of.get(r.name, r.name)]) for r in node.results]
    env = {str(d): n for v in g.inputs for d, n in zip(v.type.shape, feeds[v.name].shape) if not isinstance(d, int)}
    want = run_op(node, [feeds[v].clone() for v in node.inputs if v is not None], env)
    want = list(want) if isinstance(want, tuple) else [want]
    return [n.op_type for n in model.graph.node], got, want


def _attention_text(op: str, s: str, norms: bool = False, window: int = 0, layout: str = "half",
                    freqs: int = 8, softcap: float = 0.0, sinks: bool = False) -> str:
    """One layer's attention as one fused op: 2 query heads and 1 kv head of 16, caches [B, 1, T, 16]; with
    ``sinks`` an input %sinks: f32[2]."""
    norm_inputs = ", %qn: f32[16], %kn: f32[16]" if norms else ""
    sink_input = ", %sinks: f32[2]" if sinks else ""
    inv_freq = ",".join(repr(10.0 ** -i) for i in range(freqs))
    rope = f"heads=[2,1], inv_freq=[{inv_freq}], scaling=1.5, layout={layout}"
    if op == "rope_cache_write":
        call, attrs, first, result = "rope_cache_write(%q, %k, %v, %positions, %kc, %vc)", rope, "f32[B,S,32]", "%qr"
    else:
        extra = (", q_norm=%qn, k_norm=%kn" if norms else "") + (", sinks=%sinks" if sinks else "")
        call = f"rope_cached_attention(%q, %k, %v, %positions, %seq_lens, %kc, %vc{extra})"
        attrs = f"{rope}, scale=0.25, window={window}, softcap={softcap}, eps=1e-06"
        first, result = f"f32[B,{s},32]", "%qr"
    return (f"graph g(%q: f32[B,{s},32], %k: f32[B,{s},16], %v: f32[B,{s},16], %positions: i64[B,{s}], "
            f"%seq_lens: i32[B]{norm_inputs}{sink_input})\n"
            f"    state(%kc: f32[B,1,T,16] kv @layer0, %vc: f32[B,1,T,16] kv @layer0) {{\n"
            f"  {result}, %kc1, %vc1 = {call} {{{attrs}}} : {first}, f32[B,1,T,16], f32[B,1,T,16]\n"
            f"  return {result} state(%kc1, %vc1)\n}}\n")


def _attention_feeds(s: int, starts: list, lens: list, norms: bool = False, t: int = 8, sinks: bool = False) -> dict:
    gen = torch.Generator().manual_seed(s + sum(lens))
    b = len(lens)
    feeds = {"q": torch.randn(b, s, 32, generator=gen), "k": torch.randn(b, s, 16, generator=gen),
             "v": torch.randn(b, s, 16, generator=gen),
             "positions": torch.arange(s)[None, :] + torch.tensor(starts)[:, None],
             "seq_lens": torch.tensor(lens, dtype=torch.int32),
             "kc": torch.randn(b, 1, t, 16, generator=gen), "vc": torch.randn(b, 1, t, 16, generator=gen)}
    if norms:
        feeds |= {"qn": torch.rand(16, generator=gen) + 0.5, "kn": torch.rand(16, generator=gen) + 0.5}
    if sinks:  # logits of the scores' size (|q.k| * 0.25 ~ 1): each takes a real share of its softmax
        feeds["sinks"] = torch.tensor([0.8, -0.3])
    return feeds


def _assert_valid_close(got: list, want: list, feeds: dict) -> None:
    """Results at the valid queries (position < seq_len) and cache slots (slot < seq_len) of each row."""
    lens = feeds["seq_lens"].tolist()
    for row, n in enumerate(lens):
        queries = feeds["positions"][row] < n
        torch.testing.assert_close(got[0][row, queries], want[0][row, queries], rtol=1e-5, atol=1e-5)
        for cache in (1, 2):
            torch.testing.assert_close(got[cache][row, :, :n], want[cache][row, :, :n], rtol=1e-5, atol=1e-6)


# (S, each row's first position, seq_lens): decode at other lengths per row, a first prompt with rows shorter than
# S, a chunk continuing the cache (ORT's GroupQueryAttention takes those at batch 1)
_ATTENTION_CASES = [(1, [3, 6], [4, 7]), (4, [0, 0], [4, 2]), (3, [2], [5])]
# (softcap, sinks): Gemma-2's logit soft-capping (1.5: most scores bend), gpt-oss's sinks, both
_CAPS = [(1.5, False), (0.0, True), (1.5, True)]
_CAP_IDS = ["softcap", "sinks", "softcap+sinks"]


@pytest.mark.parametrize("softcap,sinks", [(0.0, False), *_CAPS], ids=["plain", *_CAP_IDS])
@pytest.mark.parametrize("s,starts,lens", _ATTENTION_CASES)
def test_rope_cached_attention_lowers_to_group_query_attention(s, starts, lens, softcap, sinks):
    """Without norms, causal, no window, head size 16: one com.microsoft GroupQueryAttention, the reference's
    results at every valid query and cache slot; softcap is the kernel's attribute, the sinks its head_sink input."""
    feeds = _attention_feeds(s, starts, lens, sinks=sinks)
    text = _attention_text("rope_cached_attention", "1" if s == 1 else "S", softcap=softcap, sinks=sinks)
    ops, got, want = _lower_and_run(text, feeds)
    assert ops.count("GroupQueryAttention") == 1 and "TensorScatter" not in ops
    _assert_valid_close(got, want, feeds)


@pytest.mark.parametrize("s,starts,lens", _ATTENTION_CASES)
@pytest.mark.parametrize("contrib,norms,window,softcap,sinks", [
    (False, False, 0, 0.0, False), (False, True, 0, 0.0, False), (True, True, 0, 0.0, False),
    (True, False, 2, 0.0, False), *((False, False, 0) + cap for cap in _CAPS),
    *((True, False, 2) + cap for cap in _CAPS), (True, True, 0, 1.5, True)])
def test_rope_cached_attention_lowers_as_its_composition(s, starts, lens, contrib, norms, window, softcap, sinks):
    """Standalone (no com.microsoft ops), with q/k norms, or with a window: head norms, rope, two TensorScatter
    cache writes and attention (opset-24 Attention standalone unless there are sinks, else the masked softmax), the
    reference's results, softcap and sinks included."""
    feeds = _attention_feeds(s, starts, lens, norms=norms, sinks=sinks)
    text = _attention_text("rope_cached_attention", "1" if s == 1 else "S", norms=norms, window=window,
                           softcap=softcap, sinks=sinks)
    ops, got, want = _lower_and_run(text, feeds, contrib=contrib)
    assert "GroupQueryAttention" not in ops and ops.count("TensorScatter") == 2
    assert ops.count("Attention") == (0 if contrib or sinks else 1)
    assert ops.count("RMSNormalization") == (2 if norms else 0)
    _assert_valid_close(got, want, feeds)


def _plain_attention_text(op: str, s: str, window: int, causal: bool, softcap: float, sinks: bool) -> str:
    """One ``attention`` over this call's k, v or one ``cached_attention`` over caches %kc, %vc [B, 1, T, 16] (plain
    inputs): 2 query heads and 1 kv head of 16; with ``sinks`` an input %sinks: f32[2]."""
    if op == "attention":
        kv, kv_types, heads = "%k, %v", f"%k: f32[B,{s},16], %v: f32[B,{s},16]", "heads=[2,1], "
    else:
        kv, kv_types, heads = "%kc, %vc", "%kc: f32[B,1,T,16], %vc: f32[B,1,T,16]", ""
    sink_input, sink_arg = (", %sinks: f32[2]", ", sinks=%sinks") if sinks else ("", "")
    return (f"graph g(%q: f32[B,{s},32], {kv_types}, %positions: i64[B,{s}], %seq_lens: i32[B]{sink_input}) {{\n"
            f"  %o = {op}(%q, {kv}, %positions, %seq_lens{sink_arg}) "
            f"{{{heads}scale=0.25, causal={str(causal).lower()}, window={window}, softcap={softcap}}} : f32[B,{s},32]\n"
            "  return %o\n}\n")


# (op, S, each row's first position, seq_lens, window, causal): a right-padded prompt, a windowed one whose second
# row is empty (its queries see no key: zeros), a bidirectional one, a prefill over the cache, a decode, a windowed
# decode
_PLAIN_CASES = [("attention", 4, [0, 0], [4, 2], 0, True), ("attention", 4, [0, 0], [3, 0], 2, True),
                ("attention", 4, [0, 0], [4, 2], 0, False), ("cached_attention", 4, [0, 0], [4, 2], 0, True),
                ("cached_attention", 1, [3, 6], [4, 7], 0, True), ("cached_attention", 1, [3, 6], [4, 7], 2, True)]


@pytest.mark.parametrize("softcap,sinks", _CAPS, ids=_CAP_IDS)
@pytest.mark.parametrize("contrib", [True, False])
@pytest.mark.parametrize("op,s,starts,lens,window,causal", _PLAIN_CASES)
def test_attention_softcap_and_sinks_lower(op, s, starts, lens, window, causal, contrib, softcap, sinks):
    """attention and cached_attention with softcap, sinks or both: the masked softmax (softcap's Tanh before the
    mask; the sink's exp in each denominator), or standalone without sinks opset-24 Attention with its softcap
    attribute; the reference's result at every query, padded ones and those that see no key included."""
    feeds = _attention_feeds(s, starts, lens, sinks=sinks)
    text = _plain_attention_text(op, "1" if s == 1 else "S", window, causal, softcap, sinks)
    ops, got, want = _lower_and_run(text, {k: v for k, v in feeds.items() if f"%{k}:" in text}, contrib=contrib)
    standard = not contrib and not sinks  # opset-24 Attention has no sinks input
    assert ops.count("Attention") == standard and ("Tanh" in ops) == (bool(softcap) and not standard)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    if lens[-1] == 0:
        assert not got[0][-1].any()


@pytest.mark.parametrize("sink_dtype", ["f16", "f32"])
def test_group_query_attention_takes_sinks_in_the_activations_dtype(sink_dtype):
    """GroupQueryAttention's head_sink shares q's type: an f16 layer's f16 sinks go in as they are; f32 sinks (the
    reference reads them in f32) keep it out (rounding them to f16 would differ), so the composition computes them;
    both give the reference's result to f16 rounding (2e-3: two f16 ulps at 1; the softmax is f32 in both)."""
    text = _attention_text("rope_cached_attention", "1", softcap=1.5, sinks=True).replace("f32", "f16")
    text = text.replace("%sinks: f16", f"%sinks: {sink_dtype}")
    feeds = {k: v.half() if v.is_floating_point() else v for k, v in _attention_feeds(1, [3, 6], [4, 7]).items()}
    feeds["sinks"] = torch.tensor([0.8, -0.3], dtype=torch.float16 if sink_dtype == "f16" else torch.float32)
    ops, got, want = _lower_and_run(text, feeds)
    assert ops.count("GroupQueryAttention") == (sink_dtype == "f16")
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype,sink_dtype,fused", [("f32", "f32", True), ("f16", "f16", True),
                                                    ("f16", "f32", False)])
def test_gqa_fusion_takes_softcap_and_sinks_in_the_activations_dtype(dtype, sink_dtype, fused):
    """fuse_gqa_attention (the ONNX tail) fuses a decode chain with softcap and sinks into one
    rope_cached_attention that keeps both, unless the sinks' dtype is not the activations' (GroupQueryAttention's
    head_sink is q's type): then the chain is left as it is."""
    import dataclasses

    import lowerlm.ir as ir
    from lowerlm.passes.backend import fuse_gqa_attention

    inv_freq = ",".join(repr(10.0 ** -i) for i in range(8))
    t = dtype
    text = (f"graph decode(%q: {t}[B,1,32], %k: {t}[B,1,16], %v: {t}[B,1,16], %positions: i64[B,1], "
            f"%seq_lens: i32[B], %sinks: {sink_dtype}[2])\n"
            f"    state(%kc: {t}[B,1,T,16] kv @layer0, %vc: {t}[B,1,T,16] kv @layer0) {{\n"
            f"  %qr, %kr = rope(%q, %k, %positions) {{heads=[2,1], inv_freq=[{inv_freq}]}} : {t}[B,1,32], {t}[B,1,16]\n"
            f"  %kc1 = kv_cache_write(%kc, %kr, %positions) : {t}[B,1,T,16]\n"
            f"  %vc1 = kv_cache_write(%vc, %v, %positions) : {t}[B,1,T,16]\n"
            f"  %o = cached_attention(%qr, %kc1, %vc1, %positions, %seq_lens, sinks=%sinks) {{scale=0.25, softcap=1.5}}"
            f" : {t}[B,1,32]\n  return %o state(%kc1, %vc1)\n}}\n")
    m = ir.verify_module(ir.parse_module(text))
    g, count = fuse_gqa_attention.apply(m.graphs[0])
    ir.verify_module(dataclasses.replace(m, graphs=(g,)))
    assert count == fused
    if fused:
        (node,) = g.nodes
        assert node.op is ir.Op.ROPE_CACHED_ATTENTION and node.inputs[9] == "sinks" and node.attr("softcap") == 1.5


def test_rope_cache_write_lowers_as_its_composition():
    """rope (partial: 6 of 16 dims rotate) and both cache writes: the reference's rotated q and whole caches."""
    feeds = _attention_feeds(3, [0, 2], [3, 5])
    ops, got, want = _lower_and_run(_attention_text("rope_cache_write", "S", freqs=3), feeds)
    assert ops.count("TensorScatter") == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("freqs", [8, 3])  # every dim rotates; 6 of 16
@pytest.mark.parametrize("op", ["rope_cache_write", "rope_cached_attention"])
def test_interleaved_rope_lowers(op, freqs):
    """The interleaved layout (even dims rotate against odd ones: GPT-J, Cohere) lowers too, through the fused
    ops' compositions (GroupQueryAttention takes the half layout only): the reference's results."""
    feeds = _attention_feeds(3, [0, 2], [3, 5])
    ops, got, want = _lower_and_run(_attention_text(op, "S", layout="interleaved", freqs=freqs), feeds)
    assert "GroupQueryAttention" not in ops
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


ROUTE_NORM = """\
graph g(%x: f32[B,S,8], %w: f32[8], %r: f32[{e},8]{bias_input}) {{
  %n, %ids, %wts = rms_norm_moe_route(%x, %w, %r{bias}) {{{attrs}, eps=1e-05}} : f32[B,S,8], i32[B,S,2], f32[B,S,2]
  return %n, %ids, %wts
}}
"""


@pytest.mark.parametrize("router", ["softmax", "topk_softmax", "sigmoid"])
def test_rms_norm_moe_route_lowers_as_its_composition(router):
    """The norm, then the route of the normed rows (softmax top-k; top-k of the logits then their softmax; sigmoid
    with a bias, groups and scaling): the reference's normed x, and per token the same experts with the same weights
    (ids compared as sets: the reference's sigmoid top-k is unsorted)."""
    gen = torch.Generator().manual_seed(7)
    e = 8 if router == "sigmoid" else 4
    feeds = {"x": torch.randn(2, 3, 8, generator=gen), "w": torch.rand(8, generator=gen) + 0.5,
             "r": torch.randn(e, 8, generator=gen)}
    if router != "sigmoid":
        text = ROUTE_NORM.format(e=e, bias_input="", bias="", attrs=f"router={router}, top_k=2")
    else:
        feeds["bias"] = torch.randn(e, generator=gen) * 0.1
        text = ROUTE_NORM.format(e=e, bias_input=", %bias: f32[8]", bias=", %bias",
                                 attrs="router=sigmoid, top_k=2, n_group=2, topk_group=1, scaling=2.5")
    _, got, want = _lower_and_run(text, feeds)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    (got_ids, got_w), (want_ids, want_w) = (_by_expert(*got[1:]), _by_expert(*want[1:]))
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def _by_expert(ids, weights):
    order = ids.argsort(-1)
    return ids.gather(-1, order), weights.gather(-1, order)


def test_ew_chain_lowers_each_step():
    """Every element-wise op in one body, an operand broadcast and one read twice, an f16 rounding point: each step
    through its own lowering gives the reference's result."""
    body = ("add(mul(silu(%0), rsqrt(%1)), sub(div(exp(neg(%0)), %1), mul(tanh(sigmoid(cos(sin(%2)))), "
            "cast[dtype=f32](cast[dtype=f16](gelu[approximate=tanh](pow[exponent=2.0](%0)))))))")
    text = (f"graph g(%x: f32[B,S,8], %y: f32[B,S,8], %z: f32[8]) {{\n"
            f"  %c = ew_chain(%x, %y, %z) {{body={body}}} : f32[B,S,8]\n  return %c\n}}\n")
    gen = torch.Generator().manual_seed(3)
    feeds = {"x": torch.randn(2, 3, 8, generator=gen), "y": torch.rand(2, 3, 8, generator=gen) + 0.5,
             "z": torch.randn(8, generator=gen)}
    ops, got, want = _lower_and_run(text, feeds)
    assert {"Cast", "Gelu", "Pow", "Reciprocal", "Sqrt", "Sigmoid", "Tanh", "Cos", "Sin", "Exp", "Neg"} <= set(ops)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_unsupported_answers_from_the_table():
    """``unsupported`` on the test models: a Llama's graphs lower whole, with either RoPE layout; in bf16 every node
    but params and weights is refused; the unfused moe block has no lowering."""
    import dataclasses

    from lowerlm.codegen.onnx.lower import BF16_REFUSED, unsupported
    from lowerlm.ir import Op

    def reasons(module):
        out = {}
        for g in module.graphs:
            reason = unsupported(g)
            out |= {n.op: reason(n) for n in g.nodes if reason(n) is not None}
        return out

    llama = lowerlm.compile_model(tiny_model("llama"), backend="reference", max_seq_len=64).ir
    assert reasons(llama) == {}
    interleaved = dataclasses.replace(llama, graphs=tuple(
        g.with_(nodes=tuple(n.with_(attrs=type(n.attrs)(dict(n.attrs, layout="interleaved"))) if n.op is Op.ROPE
                            else n for n in g.nodes)) for g in llama.graphs))
    assert reasons(interleaved) == {}
    bf16 = lowerlm.compile_model(tiny_model("llama").to(torch.bfloat16), backend="reference", dtype=torch.bfloat16,
                                 max_seq_len=64).ir
    assert set(reasons(bf16).values()) == {BF16_REFUSED}
    assert {n.op for g in bf16.graphs for n in g.nodes} - set(reasons(bf16)) == {Op.PARAM, Op.WEIGHT}
    moe = lowerlm.compile_model(tiny_model("mixtral"), backend="reference", passes=["canonicalize"]).ir
    assert reasons(moe) == {Op.EXPERTS: "the ONNX backend has no lowering for experts"}


_ISSUE_21_NODES = [
    "softplus(%x) {beta=2.0, threshold=1.0} : f32[B,S,8]", "softplus(%x) : f32[B,S,8]", "expm1(%x) : f32[B,S,8]",
    "log(%p) : f32[B,S,8]", "floor(%x) : f32[B,S,8]", "abs(%x) : f32[B,S,8]", "minimum(%x, %y) : f32[B,S,8]",
    "maximum(%x, %y) : f32[B,S,8]", *(f"compare(%x, %y) {{pred={p}}} : bool[B,S,8]" for p in COMPARISONS),
    "where(%m, %x, %y) : f32[B,S,8]", "where(%m, %m, %n) : bool[B,S,8]",
    "arange() {start=1, end=S+1, dtype=f32} : f32[S]", "arange() {end=7, step=3, dtype=i64} : i64[3]",
]


_ISSUE_21_TYPES = {"x": "f32[B,S,8]", "y": "f32[8]", "p": "f32[B,S,8]", "m": "bool[B,S,8]", "n": "bool[8]"}


@pytest.mark.parametrize("line", _ISSUE_21_NODES)
def test_issue_21_ops_lower_as_their_reference(line):
    """Each op issue 21 added, lowered alone, gives its reference implementation's result: softplus on both sides
    of its threshold, expm1 near 0 (a Taylor series there) and far from it, each comparison on ties, where on
    floats and on bools (ONNX Runtime's Where has no bool kernel), arange with a symbolic end."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, generator=gen) * 3
    x[0, 0] = torch.tensor([1e-5, -1e-4, 3e-3, -0.009, 0.011, 25.0, 0.5, -0.0])  # expm1's branch, softplus's
    feeds = {"x": x, "y": x[1, 2].clone(), "p": x.abs() + 1e-3,  # y: ties with x's last row
             "m": torch.rand(2, 3, 8, generator=gen) > 0.5, "n": torch.rand(8, generator=gen) > 0.5}
    reads = [v for v in feeds if f"%{v}" in line] or ["x"]  # an arange reads nothing: S comes from x
    text = ("graph g(" + ", ".join(f"%{v}: {_ISSUE_21_TYPES[v]}" for v in reads) + f") {{\n  %r = {line}\n"
            "  return %r\n}\n")
    _, got, want = _lower_and_run(text, {v: feeds[v] for v in reads})
    assert got[0].dtype == want[0].dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7, equal_nan=True)
