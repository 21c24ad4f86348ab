"""Triton kernels against the reference backend on awkward small shapes (odd sizes exercise every mask), and
tiny models end to end through the Triton backend. Without a GPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest), so shapes stay tiny; the GPU-marked tests repeat the model checks in
bf16 on CUDA."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections import Counter

import pytest
import torch

import lowerlm
from lowerlm.codegen.triton import arm_mlp, attention, decode_attention, embedding, gemv, rms_norm, rope, swiglu
from lowerlm.ir import compute as ref  # each op's reference implementation
from lowerlm.ir.ops import Op

from .conftest import calibration_ids, tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def triton_tail(m):
    """``m`` after the Triton tail (passes/backend.py), as ``compile_model(backend="triton")`` leaves its graphs."""
    from lowerlm.passes import TAILS, run_pass

    for name, fn in TAILS["triton"]:
        m = run_pass(name, fn, m).module
    return m


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def close(got, want, tol=1e-5):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


def test_embedding_and_rms_norm():
    table, ids = rand(37, 19), torch.randint(0, 37, (2, 5), device=DEV)
    assert torch.equal(embedding.embedding(table, ids), table[ids])
    x, w = rand(5, 37, seed=1), rand(37, seed=2)
    close(rms_norm.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    res = rand(5, 37, seed=3)
    normed, r = rms_norm.rms_norm(x, w, 1e-5, res)  # prefill's residual add in the same launch
    close(r, x + res)
    close(normed, ref.rms_norm(x + res, w, 1e-5))
    y = rand(4, 2 * 19, seed=4)  # [gate | up] rows, as the fused projection returns them
    close(swiglu.swiglu_halves(y, "silu"), ref.activation(y[:, :19], "silu") * y[:, 19:])


@pytest.mark.parametrize("rows", [1, 3, 17, gemv.DOT_MAX_ROWS + 1])  # the GEMV, the rows GEMM, torch's matmul
@pytest.mark.parametrize("tiles", ["interpreter", "gpu", "small"])
def test_linear_and_rms_norm_linear(rows, tiles, monkeypatch):
    if tiles == "gpu":  # the GPU's tile choice, run by the interpreter: 4 rows of W per GEMV program, 16 per dot tile
        monkeypatch.setattr(gemv, "interpreted", lambda device: False)
        assert gemv.blocks(50, 37, DEV)[0] == 4
        assert gemv.dot_blocks(rows, 50, 37, DEV) == (max(16, min(64, 1 << (rows - 1).bit_length())), 16, 64)
    if tiles == "small":  # several row blocks, column blocks and K steps, each with a ragged edge
        monkeypatch.setattr(gemv, "dot_blocks", lambda m, n, k, device: (16, 16, 16))
    x, r, nw = rand(rows, 37), rand(rows, 37, seed=1), rand(37, seed=2).abs() + 0.5
    w, b = rand(50, 37, seed=3), rand(50, seed=4)
    close(gemv.linear(x, w), x @ w.T)
    close(gemv.linear(x, w, b, rand(rows, 50, seed=5)), x @ w.T + b + rand(rows, 50, seed=5))
    got = gemv.rms_norm_linear(x, nw, w, b, r, 1e-5, [20, 30])
    want = ref.rms_norm_linear(x, nw, w, b, r, 1e-5, [20, 30], "none")
    assert len(got) == 3
    for a, c in zip(got, want):
        close(a, c)
    w2 = rand(46, 37, seed=6)
    for act in ("silu", "gelu", "gelu_tanh"):
        (got,) = gemv.rms_norm_linear(x, nw, w2, None, None, 1e-5, [23, 23], act)
        close(got, ref.rms_norm_linear(x, nw, w2, None, None, 1e-5, [23, 23], act)[0])


def test_swiglu_and_arm_mlp():
    g, u = rand(2, 3, 33), rand(2, 3, 33, seed=1)
    close(swiglu.swiglu(g, u, "gelu_tanh"), ref.activation(g, "gelu_tanh") * u)
    for h, i in ((20, 36), (150, 36)):  # the up kernel's own norm over one K block and over two
        x, nw = rand(3, h), rand(h, seed=1).abs() + 0.5
        wgm, wu, wd = rand(i + h, h, seed=2), rand(i, h, seed=3), rand(h, i, seed=4)
        mu, scale, res = rand(i, seed=5) * 0.1, rand(i, seed=6).abs() + 0.5, rand(3, h, seed=7)
        for tau in (0.0, 0.7):
            close(arm_mlp.arm_mlp(x, nw, wgm, wu, wd, mu, scale, res, 1e-6, tau),
                  ref.arm_mlp(x, nw, wgm, wu, wd, mu, scale, res, 1e-6, tau, "silu"))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("inv_freq", [[1.0, 0.5, 0.1, 0.01, 0.001], [1.0, 0.3]])  # full and partial rotary
def test_rope_and_fused_cache_write(layout, inv_freq):
    b, s, hq, hk, d, t = 2, 3, 4, 2, 10, 12
    q, k, v = rand(b, s, hq * d), rand(b, s, hk * d, seed=1), rand(b, s, hk * d, seed=2)
    pos = torch.tensor([[0, 1, 2], [7, 8, 9]], device=DEV)
    inv = torch.tensor(inv_freq, device=DEV)
    want_q, want_k = ref.rope(q, k, pos, (hq, hk), inv_freq, 0.8, layout)
    got_q, got_k = rope.rope(q, k, pos, (hq, hk), inv, 0.8, layout)
    close(got_q, want_q)
    close(got_k, want_k)
    kc, vc = torch.zeros(b, hk, t, d, device=DEV), torch.zeros(b, hk, t, d, device=DEV)
    close(rope.rope_cache_write(q, k, v, pos, (hq, hk), inv, kc, vc, 0.8, layout), want_q)
    close(kc, ref.kv_cache_write(torch.zeros_like(kc), want_k, pos))
    close(vc, ref.kv_cache_write(torch.zeros_like(vc), v, pos))


def test_kv_cache_write_skips_slots_past_the_end():
    v = rand(2, 3, 20)
    pos = torch.tensor([[1, 2, 3], [3, 4, 5]], device=DEV)
    cache = torch.zeros(2, 2, 4, 10, device=DEV)
    rope.kv_cache_write(cache, v, pos)
    assert torch.equal(cache, ref.kv_cache_write(torch.zeros_like(cache), v, pos))


@pytest.mark.parametrize("causal, window", [(True, 0), (False, 0), (True, 3)])
def test_attention(causal, window):
    b, s, hq, hk, d = 2, 7, 4, 2, 12
    q, k, v = rand(b, s, hq * d), rand(b, s, hk * d, seed=1), rand(b, s, hk * 10, seed=2)
    pos = torch.arange(s, device=DEV).repeat(b, 1)
    lens = torch.tensor([7, 4], dtype=torch.int32, device=DEV)
    close(attention.attention(q, k, v, pos, lens, (hq, hk), 0.3, causal, window),
          ref.attention(q, k, v, pos, lens, None, (hq, hk), 0.3, causal, window))
    empty = attention.attention(q, k, v, pos, torch.tensor([0, 3], dtype=torch.int32, device=DEV), (hq, hk), 0.3,
                                True, 0)
    assert empty[0].abs().max() == 0


def test_cached_attention_decode_and_prefill():
    b, hq, hk, d, t = 2, 4, 2, 12, 20
    kc, vc = rand(b, hk, t, d), rand(b, hk, t, 10, seed=1)
    q1 = rand(b, 1, hq * d, seed=2)
    pos1, lens1 = torch.tensor([[9], [15]], device=DEV), torch.tensor([10, 16], dtype=torch.int32, device=DEV)
    close(attention.cached_attention(q1, kc, vc, pos1, lens1, 0.3, True, 0),
          ref.cached_attention(q1, kc, vc, pos1, lens1, None, 0.3, True, 0))
    q = rand(b, 7, hq * d, seed=3)
    pos, lens = torch.arange(7, device=DEV).repeat(b, 1), torch.tensor([7, 4], dtype=torch.int32, device=DEV)
    close(attention.cached_attention(q, kc, vc, pos, lens, 0.3, True, 5),
          ref.cached_attention(q, kc, vc, pos, lens, None, 0.3, True, 5))


@pytest.mark.parametrize("causal, window", [(True, 0), (True, 5), (True, 40), (False, 0)])
@pytest.mark.parametrize("gpu_tiles", [False, True])
def test_prefill_attention_skips_and_unmasks_whole_blocks(causal, window, gpu_tiles, monkeypatch):
    """A chunk of 37 queries continuing at position 100 over a 160-slot cache: key blocks before the window or past
    the last query are skipped, blocks every query sees run without masks, the rest (the diagonal, the window's
    edge, the valid length's edge: the second sequence's 120 keys end inside the chunk) with them."""
    if gpu_tiles:  # 64 queries and 64 keys per block, as on a GPU
        monkeypatch.setattr(attention, "interpreted", lambda device: False)
    b, hq, hk, d, t, s = 2, 4, 2, 12, 160, 37
    kc, vc, q = rand(b, hk, t, d), rand(b, hk, t, 10, seed=1), rand(b, s, hq * d, seed=2)
    pos = torch.arange(100, 100 + s, device=DEV).repeat(b, 1)
    lens = torch.tensor([137, 120], dtype=torch.int32, device=DEV)
    close(attention.cached_attention(q, kc, vc, pos, lens, 0.3, causal, window),
          ref.cached_attention(q, kc, vc, pos, lens, None, 0.3, causal, window))


@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("causal, window", [(True, 0), (True, 5), (False, 0)])
def test_split_k_decode_attention(splits, causal, window):
    b, hq, hk, d, t = 2, 6, 2, 12, 50  # GQA groups of 3; chunks past the valid length are empty
    kc, vc, q = rand(b, hk, t, d), rand(b, hk, t, 10, seed=1), rand(b, 1, hq * d, seed=2)
    pos, lens = torch.tensor([[9], [41]], device=DEV), torch.tensor([10, 42], dtype=torch.int32, device=DEV)
    close(decode_attention.decode_attention(q, kc, vc, pos, lens, 0.3, causal, window, splits),
          ref.cached_attention(q, kc, vc, pos, lens, None, 0.3, causal, window))
    empty = decode_attention.decode_attention(q, kc, vc, pos, torch.tensor([0, 3], dtype=torch.int32, device=DEV),
                                              0.3, causal, window, splits)
    assert empty[0].abs().max() == 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tiny_models_through_the_triton_backend(family):
    model = tiny_model(family, sliding_window=4) if family == "mistral" else tiny_model(family)
    cm = lowerlm.compile_model(model, backend="triton", max_batch=2, max_seq_len=64)
    for b, s in ((2, 7), (2, 40)):  # 14 rows go through the rows GEMM kernel, 80 through the prefill path
        ids = torch.randint(0, 64, (b, s), generator=torch.Generator().manual_seed(s))
        with torch.no_grad():
            want = model(ids).logits
        close(cm(ids).cpu(), want, tol=1e-4)
    prompts, n = [[5, 7, 9, 11, 3], [8, 1, 60]], (32 if family == "llama" else 8)
    hf = []
    for prompt in prompts:
        with torch.no_grad():
            hf.append(model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):])
    assert [s[0] for s in cm.generate_ids(prompts[:1], n)] == hf[0].tolist()  # batch-1 decode: the GEMV
    steps = list(cm.generate_ids(prompts, 8))  # batch 2: the rows GEMM, two prompt lengths
    assert [[s[i] for s in steps] for i in range(2)] == [h[:8].tolist() for h in hf]


def test_a_bf16_model_computed_in_f32_through_the_triton_backend():
    """``dtype=torch.float32`` on a bf16 model: the upcast graph's load-time casts are evaluated on the program's
    device, and the kernels compute what ``model.float()`` computes eagerly (logits, greedy tokens)."""
    import copy

    model = tiny_model("llama").to(torch.bfloat16)
    cm = lowerlm.compile_model(model, backend="triton", dtype=torch.float32, max_batch=1, max_seq_len=64)
    f32_model = copy.deepcopy(model).float()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    prompt = [5, 7, 9, 11, 3]
    with torch.no_grad():
        want = f32_model(ids).logits
        hf = f32_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
    got = cm(ids).cpu()
    assert got.dtype == torch.float32
    close(got, want, tol=1e-4)
    assert [s[0] for s in cm.generate_ids([prompt], 8)] == hf.tolist()


class _EagerGraphs:
    """GraphedDecode's interface with runs in place of CUDA graphs (which need a GPU): a bucket's "graph" runs the
    decode step on its static inputs into its static logits; a capture is the function itself."""

    def __init__(self, program, state, max_batch, vocab):
        from lowerlm.runtime.cuda_graph import buckets

        self.graphs, self.captures = {}, 0
        for b in buckets(max_batch):
            inputs = {"input_ids": torch.zeros(b, 1, dtype=torch.long),
                      "positions": torch.zeros(b, 1, dtype=torch.long), "seq_lens": torch.ones(b, dtype=torch.int32)}
            logits = torch.zeros(b, 1, vocab)
            self.graphs[b] = (self._Replay(program, inputs, {n: buf[:b] for n, buf in state.items()}, logits),
                              inputs, logits)

    class _Replay:
        def __init__(self, program, inputs, rows, logits):
            self.program, self.inputs, self.rows, self.logits = program, inputs, rows, logits

        def replay(self):
            (out,), _ = self.program.run("decode", self.inputs, self.rows, inplace=True)
            self.logits.copy_(out)

    def capture(self, fn):
        from types import SimpleNamespace

        self.captures += 1
        fn()
        return SimpleNamespace(replay=fn)


@pytest.mark.skipif(DEV == "cuda", reason="the GPU runs the real graphs")
def test_decode_loop_over_graph_buckets_matches_the_plain_loop():
    """The device decode loop as the GPU runs it (bucket inputs, a captured sampling step per setting, the host a
    step behind) gives the tokens of the plain loop: greedy and sampled, 3 sequences in the bucket of 4, one of
    them filling the cache (max_seq_len 22) and one stopping at a stop token."""
    cm = lowerlm.compile_model(tiny_model("llama"), backend="triton", max_batch=4, max_seq_len=22)
    gen = cm.generator
    prompts = [[5, 7, 9, 11, 3], [8, 1, 60], list(range(1, 17))]

    def run(graphed, stop_ids=(), **kw):
        gen.graphed, gen.loop = (_EagerGraphs(gen.program, gen.state, 4, 64) if graphed else None), None
        return list(cm.generate_ids(prompts, 8, stop_ids=stop_ids, **kw))

    greedy = run(False)
    assert [s[2] for s in greedy][7:] == [None]  # the third one's cache (22 slots) was full after its 7th token
    stop = greedy[4][1]  # the second sequence stops at its 5th token
    assert run(True) == greedy
    expected, done = [], [False] * 3  # the greedy tokens, each sequence ending at its first stop token
    for step in greedy:
        if all(done):
            break
        expected.append([None if d else t for d, t in zip(done, step)])
        done = [d or t is None or t == stop for d, t in zip(done, step)]
    assert run(True, [stop]) == expected != greedy
    sampled = dict(temperature=0.9, seed=5)  # (the top-k/top-p bisection: test_device_sampling)
    assert run(True, **sampled) == run(False, **sampled) != greedy


def test_auto_on_a_gpu_is_the_triton_backend(monkeypatch):
    """The default backend where a GPU is preferred (here: auto told to prefer Triton, whose kernels run in the
    interpreter): every graph whole on Triton, sampling on the device, eager logits and greedy tokens."""
    import lowerlm.codegen.auto as auto

    monkeypatch.setattr(auto, "preferred", lambda device=None: "triton")
    model = tiny_model("llama")
    cm = lowerlm.compile_model(model, max_seq_len=32, max_batch=2)
    assert isinstance(cm.program, auto.AutoProgram) and cm.program.device_sampling
    assert all(plan.whole and plan.parts[0].backend == "triton" for plan in cm.program.plan().values())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(cm(ids).cpu(), model(ids).logits, tol=1e-4)
        hf = model.generate(torch.tensor([[5, 7, 9]]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert [s[0] for s in cm.generate_ids([[5, 7, 9]], 6, stop_ids=[])] == hf[0, 3:].tolist()


def test_seeded_sampling_through_the_triton_backend():
    cm = lowerlm.compile_model(tiny_model("llama"), backend="triton", max_seq_len=32)
    kw = dict(temperature=1.2, top_k=8, top_p=0.9)
    first = [s[0] for s in cm.generate_ids([[5, 7, 9]], 6, seed=3, stop_ids=[], **kw)]
    assert first == [s[0] for s in cm.generate_ids([[5, 7, 9]], 6, seed=3, stop_ids=[], **kw)]
    assert first != [s[0] for s in cm.generate_ids([[5, 7, 9]], 6, seed=4, stop_ids=[], **kw)]


def _ops(graph) -> Counter:
    return Counter(n.op.value for n in graph.nodes)


def test_rope_cache_writes_and_decode_attention_fuse():
    """The Triton tail, in the IR: in prefill rope + both cache writes are one rope_cache_write per layer; in decode
    all of it and the cached attention are one rope_cached_attention (Qwen3's per-head q/k norms folded in)."""
    cm = lowerlm.compile_model(tiny_model("llama"), backend="triton")
    prefill, decode = (_ops(cm.ir.graph(name)) for name in ("prefill", "decode"))
    assert prefill["rope_cache_write"] == 2 and prefill["cached_attention"] == 2
    assert decode["rope_cached_attention"] == 2
    for ops in (prefill, decode):
        assert ops["rope"] == ops["kv_cache_write"] == 0
    assert decode["cached_attention"] == decode["rope_cache_write"] == 0
    qwen3 = lowerlm.compile_model(tiny_model("qwen3_moe"), backend="triton")  # q/k norms go in as well
    decode = qwen3.ir.graph("decode")
    fused = [n for n in decode.nodes if n.op is Op.ROPE_CACHED_ATTENTION]
    assert len(fused) == 2 and all(n.inputs[7] and n.inputs[8] for n in fused)
    assert _ops(decode)["rms_norm"] == 0 and _ops(qwen3.ir.graph("prefill"))["rms_norm"] == 4  # heads: q, k


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_fused_launches_respect_a_run_that_is_not_in_place(graph):
    from lowerlm.codegen.reference import ReferenceProgram

    cm = lowerlm.compile_model(tiny_model("llama"), backend="triton", max_seq_len=16)
    s = 3 if graph == "prefill" else 1
    inputs = {"input_ids": torch.tensor([[5, 9, 2][:s]]), "positions": torch.tensor([[4, 5, 6][:s]]),
              "seq_lens": torch.tensor([4 + s], dtype=torch.int32)}
    if graph == "prefill":  # rows 0 and 2 (select_logits)
        inputs["logit_index"] = torch.tensor([[0, 2]])
    state = {name: torch.randn(buf[:1].shape, generator=torch.Generator().manual_seed(1))
             for name, buf in cm.generator.state.items()}
    before = {name: buf.clone() for name, buf in state.items()}
    (want,), want_state = ReferenceProgram(cm.ir, cm.weights).run(graph, inputs, state)
    (got,), got_state = cm.program.run(graph, {k: v.to(DEV) for k, v in inputs.items()},
                                       {k: v.to(DEV) for k, v in state.items()} if DEV != "cpu" else state)
    close(got.cpu(), want, tol=1e-4)
    for name in state:
        close(got_state[name].cpu(), want_state[name])
        assert torch.equal(state[name], before[name])  # the given buffers are untouched


def test_split_counters_outlive_a_larger_need():
    """A captured CUDA graph keeps the counter buffer it was captured with, so a later, larger need (a prefill's
    tokens in the router) must not free it."""
    from lowerlm.codegen.triton import splits

    small = splits.counters(8, DEV)
    big = splits.counters(small.numel() + 1, DEV)
    assert big.numel() > small.numel() and any(t is small for t in splits._COUNTERS[torch.device(DEV)])
    assert splits.counters(4, DEV) is big and not big.any()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_decode_attention_rotates_appends_and_attends(qk_norm):
    b, hq, hk, d, t = 3, 6, 2, 12, 40
    kc, vc = rand(b, hk, t, d), rand(b, hk, t, d, seed=1)
    q, k, v = rand(b, 1, hq * d, seed=2), rand(b, 1, hk * d, seed=3), rand(b, 1, hk * d, seed=4)
    pos = torch.tensor([[0], [17], [39]], device=DEV)
    lens = (pos[:, 0] + 1).to(torch.int32)
    inv = [1.0, 0.4, 0.1, 0.01, 0.001]
    norms = (rand(d, seed=5), rand(d, seed=6), 1e-5) if qk_norm else None
    for splits, window in ((1, 0), (5, 0), (16, 7)):
        qn, kn = q, k
        if qk_norm:  # Qwen3: per-head RMSNorm before RoPE
            qn = ref.rms_norm(q.reshape(b, 1, hq, d), norms[0], 1e-5).reshape(q.shape)
            kn = ref.rms_norm(k.reshape(b, 1, hk, d), norms[1], 1e-5).reshape(k.shape)
        want_q, want_k = ref.rope(qn, kn, pos, (hq, hk), inv, 0.9, "half")
        want_kc, want_vc = ref.kv_cache_write(kc, want_k, pos), ref.kv_cache_write(vc, v, pos)
        want = ref.cached_attention(want_q, want_kc, want_vc, pos, lens, None, 0.3, True, window)
        got_kc, got_vc = kc.clone(), vc.clone()
        got = decode_attention.decode_attention(q, got_kc, got_vc, pos, lens, 0.3, True, window, splits, new_k=k,
                                                new_v=v, inv_freq=torch.tensor(inv, device=DEV), scaling=0.9,
                                                qk_norm=norms)
        close(got, want)
        close(got_kc, want_kc)
        close(got_vc, want_vc)


def test_triton_backend_needs_a_gpu_or_the_interpreter(monkeypatch):
    from lowerlm.codegen.triton.program import TritonProgram

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(lowerlm.errors.CompileError, match="needs a CUDA GPU"):
        TritonProgram(lowerlm.ir.Module.of([]), {}, "cpu")


# Triton's interpreter converts f32 to bf16 by truncation (checked: its stores equal the bits masked to the top
# 16, up to 2x the error of round-to-nearest), which flips MoE routing decisions that are near ties; on a GPU the
# conversion rounds to nearest as torch does.
_MOE_BF16 = pytest.param("mixtral", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="interpreter "
                                                              "truncates f32 -> bf16; routing flips"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", _MOE_BF16])
def test_bf16_teacher_forced_logits(family):
    """bf16 (tensor cores on a GPU, the interpreter here): logits within 2% of the largest logit of the f32 eager
    model (bf16 keeps 8 bits of mantissa, ~0.4% per rounding, and a 2-layer model compounds a few), and greedy
    tokens equal wherever the f32 top-1/top-2 margin exceeds twice that bound."""
    model = tiny_model(family)
    bf16 = tiny_model(family).to(torch.bfloat16)
    cm = lowerlm.compile_model(bf16, backend="triton", device=DEV)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    got = cm(ids).float().cpu()
    bound = 0.02 * want.abs().max().item()
    assert (got - want).abs().max().item() <= bound
    top2 = want.topk(2, -1).values
    sure = (top2[..., 0] - top2[..., 1]) > 2 * bound
    assert torch.equal(got.argmax(-1)[sure], want.argmax(-1)[sure])


def test_device_sampling(monkeypatch):
    from lowerlm.codegen.triton import sampling
    from lowerlm.codegen.triton.sampling import sample
    from lowerlm.runtime.sampler import filter_logits

    x = rand(3, 37) * 2
    assert torch.equal(sample(x), x.argmax(-1))
    assert torch.equal(sample(x.to(torch.bfloat16)), x.to(torch.bfloat16).argmax(-1))  # any float dtype
    seed = torch.tensor([1234], device=DEV)
    # top-k then top-p over what it kept: draws never leave the set runtime/sampler.py keeps
    for top_k, top_p in ((5, 0.8), (5, 1.0), (0, 0.5)):  # both filters, each alone
        kept = filter_logits(x.cpu() / 0.7, top_k=top_k, top_p=top_p) > float("-inf")
        for pos in range(3):
            s = sample(x, 0.7, top_k, top_p, seed, torch.full((3,), pos, device=DEV)).cpu()
            assert kept[torch.arange(3), s].all()
    # near-ties at the set's edge (gaps of 1e-3 in a range of 8): over many draws every token the filters keep is
    # drawn and no other, and (counted in the interpreter) the bisections stop early: 13-14 passes over the row
    # where all 32 steps of each would take 32, 33 and 65
    near = torch.full((256,), -8.0)
    near[:12] = torch.arange(12) * 1e-3
    near[100] = 0.0105  # the largest, away from the others' indices
    n = 1200 if DEV == "cuda" else 120
    rows = near.to(DEV).repeat(n, 1).contiguous()
    passes = []
    if DEV != "cuda":  # the interpreter calls the jit helper through the module: count its calls
        count_and_mass = sampling._count_and_mass
        monkeypatch.setattr(sampling, "_count_and_mass", lambda *a: passes.append(1) or count_and_mass.fn(*a))
    for top_k, top_p in ((6, 1.0), (0, 0.5), (9, 0.6)):
        kept = (filter_logits(near[None], top_k=top_k, top_p=top_p) > float("-inf"))[0].nonzero()[:, 0]
        drawn = sample(rows, 1.0, top_k, top_p, seed, torch.arange(n, device=DEV)).cpu()
        assert set(drawn.tolist()) == set(kept.tolist()), (top_k, top_p)
        if DEV != "cuda":  # one row alone
            passes.clear()
            sample(near[None].contiguous(), 1.0, top_k, top_p, seed, torch.zeros(1, dtype=torch.long))
            assert len(passes) <= 16, (top_k, top_p, len(passes))
    # plain temperature sampling follows softmax(l / T): n rows of one distribution at n positions, one launch
    n = 4000 if DEV == "cuda" else 500
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], device=DEV).repeat(n, 1).contiguous()
    positions = torch.arange(n, device=DEV)
    draws = sample(logits, 0.9, 0, 1.0, seed, positions).cpu()
    freq = torch.bincount(draws, minlength=6).float() / n
    want = torch.softmax(logits[0].cpu() / 0.9, -1)
    assert (freq - want).abs().max() < 4 * (want * (1 - want) / n).sqrt().max()  # four standard errors
    # a draw depends on the seed and the position only, not on the row or the batch around it
    assert torch.equal(draws[10:60], sample(logits[:50], 0.9, 0, 1.0, seed, positions[10:60]).cpu())
    assert not torch.equal(draws[:50], sample(logits[:50], 0.9, 0, 1.0, seed, positions[:50] + 1).cpu())
    assert not torch.equal(draws[:50], sample(logits[:50], 0.9, 0, 1.0, seed + 1, positions[:50]).cpu())
    with pytest.raises(ValueError, match="positions must be a vector of 50"):  # not read past its end
        sample(logits[:50], 0.9, 0, 1.0, seed, positions[:1])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sampling_split_over_the_vocabulary_draws_the_same_tokens(temperature, monkeypatch):
    """The GPU's launch for unfiltered rows: each row's vocabulary (3000 here: 3 chunks of 1024) in several
    programs, the last to finish taking the best; the draws are the ones a single program makes."""
    from lowerlm.codegen.triton import sampling
    from lowerlm.codegen.triton.aot import Recorder

    logits = rand(2, 3000, seed=3) * 3
    logits[1, 2500] = logits[1, 100] = 50.0  # a tie across chunks: the first index wins, as argmax
    seed, positions = torch.tensor([11], device=DEV), torch.tensor([4, 9], device=DEV)
    one = sampling.sample(logits, temperature, 0, 1.0, seed, positions)
    monkeypatch.setattr(sampling, "interpreted", lambda device: False)
    ids = torch.full((2, 1), -1, dtype=torch.long, device=DEV)
    lens = torch.zeros(2, dtype=torch.int32, device=DEV)
    record = Recorder() if DEV == "cpu" else contextlib.nullcontext()  # (a GPU runs no interpreter to record)
    with record:
        split = sampling.sample(logits, temperature, 0, 1.0, seed, positions.clone())
        sampling.sample(logits, temperature, 0, 1.0, seed, positions, out=ids[:, 0], seq_lens=lens, limit=100)
    if DEV == "cpu":
        assert [launch.grid for launch in record.launches] == [[2, 3], [2, 3]]
    assert torch.equal(split, one) and torch.equal(ids[:, 0], one)
    if temperature == 0.0:
        assert one[1].item() == 100
    assert positions.tolist() == [5, 10] and lens.tolist() == [6, 11]  # advanced once, by the last program


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sampling_advances_the_decode_loop_in_place(temperature):
    from lowerlm.codegen.triton.sampling import sample

    logits = rand(3, 37) * 2
    ids = torch.full((3, 1), -1, dtype=torch.long, device=DEV)  # the next decode step's [B, 1] inputs
    positions = torch.tensor([[4], [9], [15]], device=DEV)
    seq_lens = torch.zeros(3, dtype=torch.int32, device=DEV)
    seed = torch.tensor([7], device=DEV)
    want = sample(logits, temperature, 0, 1.0, seed, positions[:, 0].clone())
    got = sample(logits, temperature, 0, 1.0, seed, positions[:, 0], out=ids[:, 0], seq_lens=seq_lens, limit=15)
    assert torch.equal(got, want) and torch.equal(ids[:, 0], want)
    assert positions[:, 0].tolist() == [5, 10, 15]  # the last slot (15) holds
    assert seq_lens.tolist() == [6, 11, 16]


CHAIN = """params {
  "w": f32[6]
}

graph forward(%x: f32[B,S,6], %y: f32[B,1,6]) {
  %w = param "w" : f32[6]
  %one = constant {value=1.0, dtype=f32} : f32[]
  %w1 = add(%w, %one) : f32[6]
  %a = mul(%x, %w1) : f32[B,S,6]
  %b = gelu(%a) {approximate=tanh} : f32[B,S,6]
  %c = sub(%b, %y) : f32[B,S,6]
  %d = pow(%c) {exponent=2.0} : f32[B,S,6]
  %e = exp(%d) : f32[B,S,6]
  %f = add(%d, %e) : f32[B,S,6]
  %g = rsqrt(%e) : f32[B,S,6]
  %h = cast(%g) {dtype=bf16} : bf16[B,S,6]
  return %f, %h
}
"""


def test_generated_elementwise_chains_and_the_compile_cache(tmp_path, monkeypatch):
    from lowerlm.codegen.reference import ReferenceProgram
    from lowerlm.codegen.triton import elementwise
    from lowerlm.codegen.triton.program import TritonProgram

    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path))
    # a fresh process's state: kernels other tests generated (the same chain sources) are already loaded
    monkeypatch.setattr(elementwise, "_LOADED", {})
    m = lowerlm.ir.verify_module(lowerlm.ir.parse_module(CHAIN))
    weights = {"w": torch.randn(6)}
    inputs = {"x": torch.randn(2, 3, 6), "y": torch.randn(2, 1, 6)}
    want = ReferenceProgram(m, weights).run("forward", inputs)[0]
    m = triton_tail(m)
    chains = {n.name: list(n.inputs) for n in m.graphs[0].nodes if n.op is Op.EW_CHAIN}
    # w1·a·b·c·d is one kernel reading w, the constant, x and y once; d's two users start their own chains
    assert chains == {"d": ["w", "one", "x", "y"], "e": ["d"], "f": ["d", "e"], "h": ["e"]}
    program = TritonProgram(m, weights, DEV)
    got = program.run("forward", {k: v.to(DEV) for k, v in inputs.items()})[0]
    for a, b in zip(got, want):
        close(a.cpu(), b, tol=1e-2 if b.dtype == torch.bfloat16 else 1e-5)
    files = sorted((tmp_path / "triton").glob("chain_*.py"))
    assert len(files) == 4
    stamps = [f.stat().st_mtime_ns for f in files]
    TritonProgram(m, weights, DEV).prepare()  # a warm compile reuses the cached sources
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # no compile cache (use_cache=False) or one that cannot be written (a file where its folder should be): the
    # kernels from memory, nothing written anywhere (no folder left in the temp directory), the same results
    temp = tempfile.gettempdir()
    before = set(os.listdir(temp))
    monkeypatch.setattr(elementwise, "_LOADED", {})
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="cannot write the Triton kernel cache"):
        again = TritonProgram(m, weights, DEV).run("forward", {k: v.to(DEV) for k, v in inputs.items()})[0]
    monkeypatch.setattr(elementwise, "_LOADED", {})
    monkeypatch.setenv("LOWERLM_CACHE_DIR", str(tmp_path / "unused"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        uncached = TritonProgram(m, weights, DEV, cache=False).run(
            "forward", {k: v.to(DEV) for k, v in inputs.items()})[0]
    assert not [w for w in seen if "lowerlm" in str(w.message)]
    for a, b, c in zip(again, uncached, got):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert not (tmp_path / "unused").exists()
    assert not {f for f in set(os.listdir(temp)) - before if f.startswith("lowerlm")}


def test_arm_model_through_the_triton_backend():
    """ARM's weight expressions (data leaves made on the host) land on the program's device."""
    from lowerlm.calibrate import calibrate

    model = tiny_model("llama")
    cal = calibrate(model, token_ids=calibration_ids(3, 32), sparsity=0.5)
    want = lowerlm.compile_model(model, backend="reference", arm=cal)
    got = lowerlm.compile_model(model, arm=cal, backend="triton")
    x = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(9))
    close(got(x).cpu(), want(x), tol=1e-4)
    prompt = [5, 7, 9, 11, 3]
    assert [s[0] for s in got.generate_ids([prompt], 6)] == [s[0] for s in want.generate_ids([prompt], 6)]


# ---- MoE ------------------------------------------------------------------------------------------------------
ROUTERS = [
    dict(router_kind="softmax", top_k=2, n_group=1, topk_group=1, renormalize=True, scaling=1.0, router_f32=False,
         weights_f32=True),
    dict(router_kind="softmax", top_k=3, n_group=1, topk_group=1, renormalize=False, scaling=1.0, router_f32=False,
         weights_f32=False),
    dict(router_kind="sigmoid", top_k=2, n_group=4, topk_group=2, renormalize=True, scaling=2.446, router_f32=True,
         weights_f32=True),
    dict(router_kind="sigmoid", top_k=3, n_group=1, topk_group=1, renormalize=False, scaling=1.5, router_f32=True,
         weights_f32=True),
    dict(router_kind="topk_softmax", top_k=3, n_group=1, topk_group=1, renormalize=False, scaling=1.0,
         router_f32=False, weights_f32=False),
    dict(router_kind="sigmoid", top_k=2, n_group=1, topk_group=1, renormalize=True, scaling=1.0, router_f32=True,
         weights_f32=True, renorm_eps=0.0),
]


@pytest.mark.parametrize("gpu_split", [False, True])
@pytest.mark.parametrize("attrs", ROUTERS, ids=["mixtral", "qwen3-norenorm", "deepseek-groups", "sigmoid-flat",
                                                "granite-topk-softmax", "laguna-no-eps"])
def test_moe_router_kernel(attrs, gpu_split, monkeypatch):
    from lowerlm.codegen.triton import moe
    from lowerlm.codegen.triton.aot import Recorder

    if gpu_split:  # the GPU's launch: each token's router rows read by several programs, the last one routes
        monkeypatch.setattr(moe, "interpreted", lambda device: False)
    x, w = rand(2, 5, 300, seed=1), rand(8, 300, seed=2) * 0.2  # 3 tiles of H: 3 programs per token on a GPU
    bias = rand(8, seed=3) * 0.3 if attrs["router_kind"] == "sigmoid" else None
    if DEV == "cpu":
        with Recorder() as rec:
            got_ids, got_w = moe.moe_route(x, w, bias, **attrs)
        assert rec.launches[0].grid == [10, 3 if gpu_split else 1]
    else:
        got_ids, got_w = moe.moe_route(x, w, bias, **attrs)
    ref_attrs = {"router" if k == "router_kind" else k: v for k, v in attrs.items()}  # the row's attribute names
    want_ids, want_w = ref.moe_route(x.cpu(), w.cpu(), bias.cpu() if bias is not None else None, **ref_attrs)
    assert got_ids.dtype == torch.int32 and got_w.dtype == want_w.dtype
    # the same experts with the same weights; the order within a token's top k may differ
    gi, gp = got_ids.cpu().long().sort(-1)
    wi, wp = want_ids.long().sort(-1)
    assert torch.equal(gi, wi)
    close(got_w.cpu().gather(-1, gp), want_w.gather(-1, wp), tol=1e-6)
    # with the layer's RMSNorm inside: every program stores its slice of the normalised rows
    nw = rand(300, seed=4).abs() + 0.5
    normed, ids, weights = moe.moe_route(x * 3, w, bias, **attrs, norm=(nw, 1e-6))
    want_x = ref.rms_norm(x.cpu() * 3, nw.cpu(), 1e-6)
    close(normed.cpu(), want_x, tol=1e-6)
    want_ids, want_w = ref.moe_route(want_x, w.cpu(), bias.cpu() if bias is not None else None, **ref_attrs)
    gi, gp = ids.cpu().long().sort(-1)
    wi, wp = want_ids.long().sort(-1)
    assert torch.equal(gi, wi)
    close(weights.cpu().gather(-1, gp), want_w.gather(-1, wp), tol=1e-6)


ROUTE_NORM = """params {
  "nw": f32[40]
  "router": f32[6,40]
}

graph forward(%x: f32[B,S,40]) {
  %nw = param "nw" : f32[40]
  %router = param "router" : f32[6,40]
  %n = rms_norm(%x, %nw) {eps=1e-06} : f32[B,S,40]
  %before = mul(%n, %x) : f32[B,S,40]
  %ids, %wts = moe_route(%n, %router) {top_k=2, weights_f32=false} : i32[B,S,2], f32[B,S,2]
  %after = add(%n, %x) : f32[B,S,40]
  return %ids, %wts, %after
}
"""


@pytest.mark.parametrize("first_user", ["route", "other"])
def test_the_route_launch_computes_the_norm_it_routes(first_user):
    """The Triton tail folds the norm into the route (rms_norm_moe_route) when the route is the norm's first user
    (later users read the normed value it yields); not when another node reads the norm first."""
    from lowerlm.codegen.reference import ReferenceProgram
    from lowerlm.codegen.triton.program import TritonProgram

    text = ROUTE_NORM if first_user == "other" else ROUTE_NORM.replace(
        "  %before = mul(%n, %x) : f32[B,S,40]\n", "")
    m = lowerlm.ir.verify_module(lowerlm.ir.parse_module(text))
    weights = {"nw": torch.rand(40) + 0.5, "router": torch.randn(6, 40)}
    x = torch.randn(2, 3, 40)
    want = ReferenceProgram(m, weights).run("forward", {"x": x})[0]
    m = triton_tail(m)
    ops = _ops(m.graphs[0])
    if first_user == "route":
        assert ops == {"param": 2, "rms_norm_moe_route": 1, "ew_chain": 1}
    else:
        assert ops == {"param": 2, "rms_norm": 1, "moe_route": 1, "ew_chain": 2}
    got = TritonProgram(m, weights, DEV).run("forward", {"x": x.to(DEV)})[0]
    gi, gp = got[0].cpu().long().sort(-1)  # the same experts and weights (the order within a top k may differ)
    wi, wp = want[0].long().sort(-1)
    assert torch.equal(gi, wi)
    close(got[1].cpu().gather(-1, gp), want[1].gather(-1, wp))
    close(got[2].cpu(), want[2])


@pytest.mark.parametrize("rows, experts", [(8, 128), (203, 6), (1030, 5)])  # one block, many, torch's path
def test_moe_sort_is_stable_by_expert(rows, experts):
    from lowerlm.codegen.triton import moe

    gen = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, max(1, experts - 2), (rows,), generator=gen).to(torch.int32).to(DEV)  # 2 empty experts
    order, offsets, inverse = moe.moe_sort(ids, experts)
    want_order, want_offsets = ref.moe_sort(ids.cpu(), experts)
    assert torch.equal(order.cpu(), want_order) and torch.equal(offsets.cpu(), want_offsets)
    assert torch.equal(inverse.cpu()[want_order.long()], torch.arange(rows, dtype=torch.int32))


@pytest.mark.parametrize("act, gather", [("silu", 2), ("none", 0)])
@pytest.mark.parametrize("tiles", ["interpreter", "gpu", "wide"])
def test_grouped_gemm_and_combine_with_empty_experts(act, gather, tiles, monkeypatch):
    from lowerlm.codegen.triton import moe

    if tiles == "gpu":  # the GPU's tiles, run by the interpreter: 22 rows over 6 experts, 2 + 6 row blocks
        monkeypatch.setattr(moe, "interpreted", lambda device: False)
        assert moe.gemm_blocks(22, 24, 40, 6, DEV) == (16, 16, 64, 8)
    if tiles == "wide":  # row blocks of 32 (prefill's tiles), K and N in several ragged steps
        monkeypatch.setattr(moe, "gemm_blocks",
                            lambda rows, n, k, e, device: (32, 16, 16, -(-rows // 32) + min(e, rows)))

    tokens, k, e, hidden, inter = 11, 2, 6, 40, 24
    gen = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(4, generator=gen)[:k] for _ in range(tokens)]).to(torch.int32)  # 4, 5 empty
    ids = ids.reshape(1, tokens, k).to(DEV)
    order, offsets, inverse = moe.moe_sort(ids, e)
    want_order, want_offsets = ref.moe_sort(ids.cpu(), e)
    assert torch.equal(order.cpu(), want_order) and torch.equal(offsets.cpu(), want_offsets)
    assert torch.equal(order.cpu()[inverse.cpu().long()], torch.arange(tokens * k, dtype=torch.int32))
    assert offsets.diff().cpu().tolist()[4:] == [0, 0]
    rows = tokens * k
    x = rand(1, tokens, hidden, seed=6) if gather else rand(rows, hidden, seed=6)
    n_w = 2 * inter if act != "none" else inter
    w = rand(e, n_w, hidden, seed=7) * 0.2
    scale = rand(1, tokens, k, seed=8).abs()
    got = moe.grouped_gemm(x, w, order, offsets, scale, None, gather, act)
    want = ref.grouped_gemm(x.cpu(), w.cpu(), order.cpu(), offsets.cpu(), scale.cpu(), None, gather, act)
    close(got.cpu(), want, tol=1e-5)
    like = torch.empty(1, tokens, got.shape[1])
    for inv in (inverse, None):
        close(moe.moe_combine(got, order, like, k, inv).cpu(), ref.moe_combine(want, order.cpu(), like, k), tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unit", [{"limit": 1.0}, {"limit": 1.0, "clamp": "act"},
                                  {"limit": 1.0, "alpha": 1.702, "up_shift": 1.0}, {"alpha": 0.5}],
                         ids=["clamp-gate", "clamp-act", "gpt-oss", "alpha"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_gemm_gated_units(unit, dtype, with_bias):
    """The gate|up GEMM's epilogue computes ir/compute.py's glu: clamps, alpha, up shift, rounded as it is; with
    per-expert biases (gpt-oss) added to both halves first."""

    def cpu(t):
        return None if t is None else t.cpu()

    from lowerlm.codegen.triton import moe

    tokens, k, e, hidden, inter = 7, 2, 4, 32, 16
    gen = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(tokens)]).to(torch.int32).to(DEV)
    order, offsets, _ = moe.moe_sort(ids, e)
    x = rand(tokens, hidden, seed=1).to(dtype)
    w = (rand(e, 2 * inter, hidden, seed=2) * 0.5).to(dtype)
    bias = (rand(e, 2 * inter, seed=4) * 0.2).to(dtype) if with_bias else None
    got = moe.grouped_gemm(x, w, order, offsets, None, bias, k, "silu", **unit)
    want = ref.grouped_gemm(x.cpu(), w.cpu(), order.cpu(), offsets.cpu(), None, cpu(bias), k, "silu", **unit)
    plain = ref.grouped_gemm(x.cpu(), w.cpu(), order.cpu(), offsets.cpu(), None, cpu(bias), k, "silu")
    assert not torch.equal(want, plain)  # the unit's clamps, alpha or shift change the result
    # bf16: the CPU reference rounds its products otherwise than the kernel's f32 accumulation (a few ulps of ~25)
    close(got.cpu().float(), want.float(), tol=1e-5 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_tiny_moe_models_through_the_triton_backend(family):
    model = tiny_model(family)
    cm = lowerlm.compile_model(model, backend="triton", max_batch=2, max_seq_len=64)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(ids).logits
    close(cm(ids).cpu(), want, tol=1e-4)
    prompt = [5, 7, 9, 11, 3]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert [s[0] for s in cm.generate_ids([prompt], 32)] == hf


# ---- the launcher table: every op with a kernel against its reference implementation -------------------------------
def test_every_elementwise_op_has_a_chain_expression():
    from lowerlm.codegen.triton.elementwise import EXPRS

    assert set(EXPRS) == lowerlm.ir.ops.ELEMENTWISE


def _differential(text: str, symbols: dict, inplace: bool, inputs: dict | None = None, tol: float = 1e-5):
    """``text``'s one graph on Triton and on the reference backend (ir/compute.py) with random weights, inputs
    and state: the same outputs and new state; in place the given buffers hold the new state, else they are
    untouched. Returns the Triton outputs and the reference's."""
    from lowerlm.codegen.reference import ReferenceProgram
    from lowerlm.codegen.triton.program import TritonProgram

    m = lowerlm.ir.verify_module(lowerlm.ir.parse_module(text))
    g = m.graphs[0]
    gen = torch.Generator().manual_seed(0)

    def tensor(t):
        shape = [lowerlm.ir.evaluate(d, symbols) for d in t.shape]
        return torch.randn(shape, generator=gen).to(t.dtype.to_torch())

    weights = {name: tensor(t).abs() + 0.5 for name, t in m.params}
    inputs = {v.name: (inputs or {}).get(v.name, None) for v in g.inputs}
    inputs = {k: v if v is not None else tensor(g.type_of(k)) for k, v in inputs.items()}
    state = {s.name: tensor(s.type) for s in g.state}
    want, want_state = ReferenceProgram(m, weights).run(g.name, inputs, state)
    given = {k: v.clone().to(DEV) for k, v in state.items()}
    got, got_state = TritonProgram(m, weights, DEV).run(g.name, {k: v.to(DEV) for k, v in inputs.items()}, given,
                                                        inplace=inplace)
    for name, new in got_state.items():
        close(new.cpu(), want_state[name], tol)
        if inplace:
            assert new is given[name] or g.state_outputs[[s.name for s in g.state].index(name)] == name
        else:
            assert torch.equal(given[name].cpu(), state[name])  # the given buffers are untouched
    return [t.cpu() for t in got], want


_NORM_PARAMS = ('params {\n  "qn": f32[8]\n  "kn": f32[8]\n}\n\n',
                '  %qn = param "qn" : f32[8]\n  %kn = param "kn" : f32[8]\n')  # Qwen3's q/k norms: table, nodes


def _attention_op(op: str, s: int, norms: bool, layout: str = "half", window: int = 0) -> str:
    """One layer's fused cache op: 4 query heads, 2 kv heads of 8, a cache of 12 slots, S = s."""
    params, weights = _NORM_PARAMS if norms else ("", "")
    rope = f"heads=[4,2], inv_freq=[1.0,0.1,0.01], scaling=0.9, layout={layout}"
    if op == "rope_cache_write":
        line = (f"%o, %kc1, %vc1 = rope_cache_write(%q, %k, %v, %positions, %kc, %vc) {{{rope}}} : "
                f"f32[B,{s},32], f32[B,2,12,8], f32[B,2,12,8]")
    else:
        norm_inputs = ", q_norm=%qn, k_norm=%kn" if norms else ""
        line = (f"%o, %kc1, %vc1 = rope_cached_attention(%q, %k, %v, %positions, %seq_lens, %kc, %vc{norm_inputs}) "
                f"{{{rope}, scale=0.3, window={window}, eps=1e-06}} : f32[B,{s},32], f32[B,2,12,8], f32[B,2,12,8]")
    return (f"{params}graph g(%q: f32[B,{s},32], %k: f32[B,{s},16], %v: f32[B,{s},16], %positions: i64[B,{s}], "
            f"%seq_lens: i32[B])\n    state(%kc: f32[B,2,12,8] @layers.0.attn, %vc: f32[B,2,12,8] @layers.0.attn) {{\n"
            f"{weights}  {line}\n  return %o state(%kc1, %vc1)\n}}\n")


def _assert_rope_cached_attention_launches(rec, s: int, norms: bool) -> None:
    """Decode: one launch; S > 1: the head norms (if any), rope_cache_write, the prefill attention."""
    launches = [launch.name for launch in rec.launches]
    if s == 1:
        assert launches == ["decode_attention_kernel"]
    else:
        assert launches == ["rms_norm_kernel"] * (2 * norms) + ["rope_cache_write_kernel", "attention_kernel"]


def _positions(s: int) -> dict:
    """Two sequences: decode at slots 5 and 11 (the cache's last), or a chunk of s continuing at 4 and starting
    at 0."""
    if s == 1:
        pos = torch.tensor([[5], [11]])
        return {"positions": pos, "seq_lens": (pos[:, 0] + 1).to(torch.int32)}
    pos = torch.stack([torch.arange(4, 4 + s), torch.arange(s)])
    return {"positions": pos, "seq_lens": torch.tensor([4 + s, s], dtype=torch.int32)}


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("s", [1, 3])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_cache_write_launcher(layout, s, inplace):
    got, want = _differential(_attention_op("rope_cache_write", s, False, layout), {"B": 2}, inplace, _positions(s))
    close(got[0], want[0])


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("norms", [False, True])
@pytest.mark.parametrize("s, window", [(1, 0), (1, 4), (3, 0)])  # decode: one launch; S > 1: three or five
def test_rope_cached_attention_launcher(s, window, norms, inplace):
    from lowerlm.codegen.triton.aot import Recorder

    text = _attention_op("rope_cached_attention", s, norms, window=window)
    with Recorder() as rec:
        got, want = _differential(text, {"B": 2}, inplace, _positions(s))
    close(got[0], want[0])
    _assert_rope_cached_attention_launches(rec, s, norms)


ROUTE = """params {
  "nw": f32[40]
  "router": f32[8,40]
  "bias": f32[8]
}

graph g(%x: f32[B,S,40]) {
  %nw = param "nw" : f32[40]
  %router = param "router" : f32[8,40]
  %bias = param "bias" : f32[8]
  %n, %ids, %wts = rms_norm_moe_route(%x, %nw, %router, bias=%bias) {ATTRS} : f32[B,S,40], i32[B,S,K], f32[B,S,K]
  return %n, %ids, %wts
}
"""


@pytest.mark.parametrize("attrs", ["eps=1e-06, top_k=2", "eps=1e-05, router=sigmoid, top_k=3, n_group=4, "
                                   "topk_group=2, scaling=2.5, router_f32=true"])
def test_rms_norm_moe_route_launcher(attrs):
    from lowerlm.codegen.triton.aot import Recorder

    k = attrs.split("top_k=")[1].split(",")[0]
    text = ROUTE.replace("{ATTRS}", "{" + attrs + "}").replace(",K]", f",{k}]")
    if "sigmoid" not in attrs:  # softmax routers take no bias
        text = text.replace(", bias=%bias", "")
    with Recorder() as rec:
        got, want = _differential(text, {"B": 2, "S": 3}, True)
    assert [launch.name for launch in rec.launches] == ["route_kernel"]  # the norm inside the route launch
    close(got[0], want[0])
    gi, gp = got[1].long().sort(-1)  # the same experts and weights (the order within a top k may differ)
    wi, wp = want[1].long().sort(-1)
    assert torch.equal(gi, wi)
    close(got[2].gather(-1, gp), want[2].gather(-1, wp))


def _chain_line(op, dtype: str) -> str:
    """An ew_chain over %x [B, 5] and %y [5] around one application of ``op``."""
    other = "f32" if dtype == "bf16" else "bf16"
    if op in lowerlm.ir.ops.BINARY:
        return f"  %{op.value} = ew_chain(%x, %y) {{body={op.value}(%0, %1)}} : {dtype}[B,5]"
    if op is Op.CAST:  # to the other float type, after a step rounded to this one
        return f"  %cast = ew_chain(%x, %y) {{body=cast[dtype={other}](add(%0, %1))}} : {other}[B,5]"
    step = {Op.POW: "pow[exponent=1.5](%0)", Op.GELU: "gelu[approximate=tanh](%0)"}.get(op, f"{op.value}(%0)")
    return f"  %{op.value} = ew_chain(%x, %y) {{body=mul({step}, %1)}} : {dtype}[B,5]"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes masked lanes too: 0 / 0, log(0)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_ew_chain_launcher_computes_every_elementwise_op(dtype):
    """Each element-wise op in a chain (operands positive: rsqrt, pow), every step rounded to its dtype, a row
    broadcast; gelu both exact and approximated; a body reading an operand twice."""
    from lowerlm.codegen.triton.elementwise import EXPRS

    ops = sorted(EXPRS, key=str)
    lines = [_chain_line(op, dtype) for op in ops]
    lines.append(f"  %twice = ew_chain(%x) {{body=mul(gelu(%0), sub(%0, pow[exponent=2.0](%0)))}} : {dtype}[B,5]")
    outs = ", ".join(f"%{op.value}" for op in ops) + ", %twice"
    text = f"graph g(%x: {dtype}[B,5], %y: {dtype}[5]) {{\n" + "\n".join(lines) + f"\n  return {outs}\n}}\n"
    torch_dtype = torch.float32 if dtype == "f32" else torch.bfloat16
    x, y = (torch.rand(3, 5) + 0.5).to(torch_dtype), (torch.rand(5) + 0.5).to(torch_dtype)
    got, want = _differential(text, {"B": 3}, True, {"x": x, "y": y})
    for a, b in zip(got, want):  # bf16: up to 2^-7 per rounding step (the interpreter truncates), 4 steps at most
        assert a.dtype == b.dtype
        close(a, b, 1e-5 if b.dtype == torch.float32 and dtype == "f32" else 4 * 2 ** -7)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_ew_chain_branches_of_issue_21_ops():
    """The chain expressions with a branch: expm1 near 0 (its Taylor series) and far from it, softplus on both
    sides of its threshold, minimum and maximum propagating NaN as torch does, floor of negatives."""
    text = ("graph g(%x: f32[B,8], %y: f32[8]) {\n"
            "  %a = ew_chain(%x) {body=add(expm1(%0), softplus[beta=2.0, threshold=1.0](%0))} : f32[B,8]\n"
            "  %b = ew_chain(%x, %y) {body=add(minimum(%0, %1), maximum(%1, %0))} : f32[B,8]\n"
            "  %c = ew_chain(%x) {body=floor(%0)} : f32[B,8]\n"
            "  return %a, %b, %c\n}\n")
    x = torch.tensor([[1e-5, -1e-4, 3e-3, -0.009, 0.011, 25.0, 0.6, -2.5]] * 2)
    y = torch.tensor([0.0, float("nan"), 1.0, -1.0, 0.011, 3.0, float("nan"), -3.0])
    got, want = _differential(text, {"B": 2}, True, {"x": x, "y": y})
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)


# ---- attention with soft-capped scores and sinks (Gemma-2, gpt-oss) -------------------------------------------------
def _capped_attention_op(op: str, s: int, softcap: float, sinks: str | None, window: int = 0,
                         norms: bool = False) -> str:
    """One attention node of 4 query heads and 2 kv heads of 8 (caches of 40 slots: 3 splits at decode), S = s,
    with ``softcap`` and, when ``sinks`` names a dtype, the input %sinks [4] of it."""
    params, weights = _NORM_PARAMS if norms else ("", "")
    sink_input = f", %sinks: {sinks}[4]" if sinks else ""
    sink_operand = ", sinks=%sinks" if sinks else ""
    attrs = f"scale=0.3, window={window}, softcap={softcap}"
    cache = "f32[B,2,40,8]"
    if op == "attention":
        inputs, state = f"%k: f32[B,{s},16], %v: f32[B,{s},16]", ""
        line = (f"%o = attention(%q, %k, %v, %positions, %seq_lens{sink_operand}) {{heads=[4,2], {attrs}}} : "
                f"f32[B,{s},32]")
        ret = "%o"
    elif op == "cached_attention":
        inputs, state = f"%kc: {cache}, %vc: {cache}", ""
        line = f"%o = cached_attention(%q, %kc, %vc, %positions, %seq_lens{sink_operand}) {{{attrs}}} : f32[B,{s},32]"
        ret = "%o"
    else:
        inputs = f"%k: f32[B,{s},16], %v: f32[B,{s},16]"
        state = f"\n    state(%kc: {cache} kv @layers.0.attn, %vc: {cache} kv @layers.0.attn)"
        norm_operands = ", q_norm=%qn, k_norm=%kn" if norms else ""
        line = (f"%o, %kc1, %vc1 = rope_cached_attention(%q, %k, %v, %positions, %seq_lens, %kc, %vc{norm_operands}"
                f"{sink_operand}) {{heads=[4,2], inv_freq=[1.0,0.1,0.01], scaling=0.9, layout=half, {attrs}, "
                f"eps=1e-06}} : f32[B,{s},32], {cache}, {cache}")
        ret = "%o state(%kc1, %vc1)"
    return (f"{params}graph g(%q: f32[B,{s},32], {inputs}, %positions: i64[B,{s}], %seq_lens: i32[B]{sink_input})"
            f"{state} {{\n{weights}  {line}\n  return {ret}\n}}\n")


def _capped_inputs(op: str, s: int, sinks: str | None) -> dict:
    """Three sequences, right-padded: the last sees no key. ``attention``: 5 tokens, 5, 3 and 0 of them valid.
    Over a cache, decode at slots 5 and 39 (the cache's last: the last split), or a chunk of s continuing at 4, one
    starting at 0 with fewer valid keys than queries, the third with no valid key."""
    if op == "attention":
        pos, lens = torch.arange(s).repeat(3, 1), [s, 3, 0]
    elif s == 1:
        pos, lens = torch.tensor([[5], [39], [3]]), [6, 40, 0]
    else:
        pos, lens = torch.stack([torch.arange(4, 4 + s), torch.arange(s), torch.arange(20, 20 + s)]), [4 + s, s - 1, 0]
    inputs = {"positions": pos, "seq_lens": torch.tensor(lens, dtype=torch.int32)}
    if sinks:  # logits of the size of the scores, one per query head
        inputs["sinks"] = torch.tensor([2.5, -1.0, 0.5, 3.0]).to({"f32": torch.float32, "bf16": torch.bfloat16}[sinks])
    return inputs


CAPS_AND_SINKS = [(1.5, None), (0.0, "f32"), (2.0, "bf16")]  # softcap only, sinks only, both (bf16 sinks)


@pytest.mark.parametrize("softcap, sinks", CAPS_AND_SINKS)
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("op, s", [("attention", 5), ("cached_attention", 3), ("cached_attention", 1)])
def test_attention_launchers_softcap_and_sinks(op, s, window, softcap, sinks):
    """The prefill kernel (attention; cached_attention at S > 1) and the split-K decode kernel (S = 1: the sink
    counted once, in the merge of 3 splits) against the reference: soft-capped scores, a sink per head, both."""
    text = _capped_attention_op(op, s, softcap, sinks, window)
    got, want = _differential(text, {"B": 3}, True, _capped_inputs(op, s, sinks))
    close(got[0], want[0])
    assert got[0][2].abs().max() == 0  # the query that sees no key: zeros, sink or not


@pytest.mark.parametrize("softcap, sinks", CAPS_AND_SINKS)
@pytest.mark.parametrize("s, window, norms", [(1, 0, False), (1, 3, False), (1, 0, True), (3, 0, True)])
def test_rope_cached_attention_launcher_softcap_and_sinks(s, window, norms, softcap, sinks):
    """The fused decode launch (the step's own key from registers, soft-capped too; with and without Qwen3's q/k
    norms) and the prefill path, with soft-capping and sinks, against the reference."""
    from lowerlm.codegen.triton.aot import Recorder

    text = _capped_attention_op("rope_cached_attention", s, softcap, sinks, window, norms)
    with Recorder() as rec:
        got, want = _differential(text, {"B": 3}, True, _capped_inputs("rope_cached_attention", s, sinks))
    close(got[0], want[0])
    _assert_rope_cached_attention_launches(rec, s, norms)
