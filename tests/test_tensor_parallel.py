"""Tensor parallelism (passes/tensor_parallel.py): golden IR of the sharding and of fuse_allreduce_norm, the cases
where they must not fire (a head count that does not divide: attention replicated, only the MLP sharded), and two
ranks over gloo on this CPU giving the single-rank logits and greedy tokens."""

from __future__ import annotations

import os

import pytest
import torch

import lowerlm
import lowerlm.ir as ir
from lowerlm.ir.ops import COLLECTIVES
from lowerlm.passes import PASSES, run_pass
from lowerlm.passes.tensor_parallel import fuse_allreduce_norm, tensor_parallel
from lowerlm.runtime.distributed import launch

from .conftest import example_text, tiny_model


def _sharded(rank: int, world: int, text: str | None = None):
    m = ir.parse_module(text or example_text())
    m = run_pass("canonicalize", PASSES["canonicalize"], m).module
    return m, run_pass("tensor_parallel", tensor_parallel(rank, world), m)


def _lines(m, *words) -> list:
    return [line.strip() for line in ir.print_module(m).splitlines()
            if line.startswith("  %") and any(w in line for w in words)]


def test_sharding_golden_rank_1_of_2():
    _, record = _sharded(1, 2)
    assert record.rewrites == 3  # the attention, the MLP, the lm_head
    assert _lines(record.module, "= weight ", "allreduce(", "attention(", "rope(", "lm_head") == [
        '%wq.shard = weight slice[0,8,16](param "model.layers.0.self_attn.q_proj.weight") : f32[8,16]',
        '%wk.shard = weight slice[0,4,8](param "model.layers.0.self_attn.k_proj.weight") : f32[4,16]',
        '%wv.shard = weight slice[0,4,8](param "model.layers.0.self_attn.v_proj.weight") : f32[4,16]',
        "%qr, %kr = rope(%q, %k, %positions) {heads=[2,1], inv_freq=[1.0,0.1]} : f32[B,S,8], f32[B,S,4]  "
        "# model.layers.0.self_attn",
        "%o = attention(%qr, %kr, %v, %positions, %seq_lens) {heads=[2,1], scale=0.5} : f32[B,S,8]  "
        "# model.layers.0.self_attn",
        '%wo.shard = weight slice[1,8,16](param "model.layers.0.self_attn.o_proj.weight") : f32[16,8]',
        "%a = allreduce(%a.partial) {world=2} : f32[B,S,16]  # model.layers.0.self_attn.o_proj",
        '%wg.shard = weight slice[0,16,32](param "model.layers.0.mlp.gate_proj.weight") : f32[16,16]',
        '%wu.shard = weight slice[0,16,32](param "model.layers.0.mlp.up_proj.weight") : f32[16,16]',
        '%wd.shard = weight slice[1,16,32](param "model.layers.0.mlp.down_proj.weight") : f32[16,16]',
        "%d = allreduce(%d.partial) {world=2} : f32[B,S,16]  # model.layers.0.mlp.down_proj",
        '%embed.shard = weight slice[0,32,64](param "model.embed_tokens.weight") : f32[32,16]',
        "%logits.part = linear(%hf, %embed.shard) : f32[B,S,32]  # lm_head",
        "%logits = allgather(%logits.part) {world=2} : f32[B,S,64]  # lm_head"]
    assert ir.parse_module(ir.print_module(record.module)) == record.module


def test_fuse_allreduce_norm_golden():
    _, record = _sharded(0, 2)
    fused = run_pass("fuse_allreduce_norm", fuse_allreduce_norm, record.module)
    assert fused.rewrites == 2
    assert _lines(fused.module, "allreduce") == [
        "%h2, %r1 = allreduce_add_rms_norm(%a.partial, %x, %ln1) {world=2, eps=1e-05} : f32[B,S,16], f32[B,S,16]  "
        "# model.layers.0.self_attn.o_proj, model.layers.0, model.layers.0.post_attention_layernorm",
        "%hf, %r2 = allreduce_add_rms_norm(%d.partial, %r1, %lnf) {world=2, eps=1e-05} : f32[B,S,16], f32[B,S,16]  "
        "# model.layers.0.mlp.down_proj, model.layers.0, model.norm"]


def _one_kv_head() -> str:
    """The example layer with 4 query heads and 1 kv head."""
    text = example_text()
    for a, b in (("k_proj.weight\": f32[8,16]", "k_proj.weight\": f32[4,16]"),
                 ("v_proj.weight\": f32[8,16]", "v_proj.weight\": f32[4,16]"),
                 ("k_proj.weight\" : f32[8,16]", "k_proj.weight\" : f32[4,16]"),
                 ("v_proj.weight\" : f32[8,16]", "v_proj.weight\" : f32[4,16]"),
                 ("%k = linear(%h, %wk) : f32[B,S,8]", "%k = linear(%h, %wk) : f32[B,S,4]"),
                 ("%v = linear(%h, %wv) : f32[B,S,8]", "%v = linear(%h, %wv) : f32[B,S,4]"),
                 ("{heads=[4,2], inv_freq=[1.0,0.1], scaling=1.0} : f32[B,S,16], f32[B,S,8]",
                  "{heads=[4,1], inv_freq=[1.0,0.1], scaling=1.0} : f32[B,S,16], f32[B,S,4]"),
                 ("{heads=[4,2], scale=0.5}", "{heads=[4,1], scale=0.5}")):
        assert a in text, a
        text = text.replace(a, b)
    return text


def test_heads_that_do_not_divide_keep_the_attention_whole():
    """Must not fire on an attention whose kv heads do not divide (one kv head over 2 ranks): it stays whole
    (replicated on both) and only the MLP is sharded; over 3 ranks nothing divides (nor the MLP's 32 rows)."""
    before, record = _sharded(0, 2, _one_kv_head())
    assert record.rewrites == 2  # the MLP and the lm_head
    assert _lines(record.module, "attention(", "allreduce(") == [
        "%o = attention(%qr, %kr, %v, %positions, %seq_lens) {heads=[4,1], scale=0.5} : f32[B,S,16]  "
        "# model.layers.0.self_attn",
        "%d = allreduce(%d.partial) {world=2} : f32[B,S,16]  # model.layers.0.mlp.down_proj"]
    assert _lines(record.module, "= weight ") == [
        '%wg.shard = weight slice[0,0,16](param "model.layers.0.mlp.gate_proj.weight") : f32[16,16]',
        '%wu.shard = weight slice[0,0,16](param "model.layers.0.mlp.up_proj.weight") : f32[16,16]',
        '%wd.shard = weight slice[1,0,16](param "model.layers.0.mlp.down_proj.weight") : f32[16,16]',
        '%embed.shard = weight slice[0,0,32](param "model.embed_tokens.weight") : f32[32,16]']
    before, three = _sharded(0, 3)
    assert three.rewrites == 0 and three.module == before
    assert run_pass("fuse_allreduce_norm", fuse_allreduce_norm, before).rewrites == 0  # no allreduce: no fusion


def test_one_rank_is_the_identity():
    before, record = _sharded(0, 1)
    assert record.rewrites == 0 and record.module == before


# ---- two ranks over gloo ---------------------------------------------------------------------------------------
FAMILIES = ["llama", "qwen3", "mixtral", "kimi"]
# a decode step's reductions (fused with the next norm) and the lm_head's allgather: two per layer (attention, MLP
# or experts), Kimi's KDA layer none (replicated) and its MoE one (routed and shared experts reduced together)
REDUCTIONS = {"llama": 4, "qwen3": 4, "mixtral": 4, "kimi": 3}


def _family(family: str):
    if family == "kimi":  # KDA then MLA layers; a dense MLP, then MoE with a shared expert
        from .test_kda import kimi

        return kimi(layer_types=("linear_attention", "full_attention"), mlp_types=("dense", "sparse"))
    return tiny_model(family)


def _run(cm, tokens: int) -> dict:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    plan = cm.program.plan() if hasattr(cm.program, "plan") else {}
    return {"logits": cm(ids).cpu(), "tokens": [s[0] for s in cm.generate_ids([[5, 7, 9, 11, 3]], tokens, stop_ids=[])],
            "sampled": [s[0] for s in cm.generate_ids([[5, 7, 9]], 16, temperature=1.0, top_p=0.9, seed=7,
                                                      stop_ids=[])],
            "ops": sorted({n.op.value for g in cm.ir.graphs for n in g.nodes}),
            "collectives": sorted(n.op.value for n in cm.ir.graph("decode").nodes if n.op in COLLECTIVES),
            "parts": {g: [p.backend for p in pl.parts] for g, pl in plan.items()}}


def _rank(rank: int, world: int, backend: str, families: list, tokens: int, out: str):
    """One rank under runtime/distributed.py's ``launch`` (its gloo group already joined): each family compiled
    whole (tp=1, on rank 0) and as this rank's shard (tp=2)."""
    results = {}
    for family in families:
        model = _family(family)
        opts = dict(backend=backend, max_batch=2, max_seq_len=64, tokenizer=False)
        results[family] = {"tp": _run(lowerlm.compile_model(model, tp=world, **opts), tokens)}
        if rank == 0:  # Triton's single rank is the reference backend's (tests/test_triton.py): half the interpreter
            opts["backend"] = "reference" if backend == "triton" else backend
            results[family]["one"] = _run(lowerlm.compile_model(model, **opts), tokens)
    torch.save(results, f"{out}.{rank}")


# Triton runs in its interpreter here (the collectives as torch ops between its kernels): one family, 8 tokens,
# against the reference backend's single rank
@pytest.mark.parametrize("backend, families, tokens", [("reference", FAMILIES, 32), ("onnx", FAMILIES, 32),
                                                       ("triton", ["llama"], 8)])
def test_two_ranks_give_the_single_rank_logits_and_tokens(backend, families, tokens, tmp_path):
    """Tiny Llama, Qwen3, Mixtral and Kimi Linear over two gloo ranks: the single-rank logits within 1e-5 of their
    largest magnitude, and the same greedy tokens (32; Triton's interpreter 8); every rank computes the same logits
    and samples the same tokens."""
    out = str(tmp_path / "rank")
    launch(_rank, 2, backend, families, tokens, out)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    for family in families:
        want = results[0][family]["one"]
        for rank, r in enumerate(results):
            got = r[family]["tp"]
            assert "allreduce_add_rms_norm" in got["ops"], family
            assert got["collectives"] == ["allgather"] + ["allreduce_add_rms_norm"] * REDUCTIONS[family], family
            if backend == "onnx":  # ONNX sessions, the collectives between them on the reference backend
                assert got["parts"]["decode"][:3] == ["onnx", "reference", "onnx"], (family, got["parts"])
            # the partial sums are added in another order than one rank's GEMM: equal within f32 rounding
            err = (got["logits"] - want["logits"]).abs().max() / want["logits"].abs().max()
            assert err <= 1e-5, (family, rank, float(err))
            print(f"{backend} {family} rank {rank}: max abs error / max |logit| = {float(err):.2e}")
            assert got["tokens"] == want["tokens"], (family, rank)
        assert torch.equal(results[0][family]["tp"]["logits"], results[1][family]["tp"]["logits"]), family
        # sampling draws from the same seed on the same logits: every rank samples the same tokens
        assert results[0][family]["tp"]["sampled"] == results[1][family]["tp"]["sampled"], family


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL between Triton programs)")
def test_two_gpus_nccl_with_triton_and_cuda_graphs(tmp_path):
    """Two GPUs, one rank each over NCCL: Triton's kernels with the collectives between them, decode replayed in
    CUDA graphs (generate_ids captures them on a GPU; NCCL's all_reduce is captured with the step): the single-rank
    logits and 32 greedy tokens for Llama, Mixtral and Kimi Linear."""
    out = str(tmp_path / "rank")
    launch(_rank, 2, "triton", ["llama", "mixtral", "kimi"], 32, out)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    for family in ("llama", "mixtral", "kimi"):
        want = results[0][family]["one"]
        for r in results:
            got = r[family]["tp"]
            assert (got["logits"] - want["logits"]).abs().max() <= 1e-3 * want["logits"].abs().max(), family
            assert got["tokens"] == want["tokens"], family


def test_dump_ir_shows_one_ranks_shard_and_refuses_a_rank_outside_the_world():
    from .test_cli import lowerlm as cli

    out = cli("dump-ir", "--ir", "examples/tiny_llama.ir", "--tp", "2", "--rank", "1", "--after", "fuse_allreduce_norm")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("// after fuse_allreduce_norm (2 rewrites)\n")
    assert 'weight slice[0,8,16](param "model.layers.0.self_attn.q_proj.weight")' in out.stdout
    assert out.stdout.count("= allreduce_add_rms_norm(") == 2
    bad = cli("dump-ir", "--ir", "examples/tiny_llama.ir", "--tp", "2", "--rank", "2")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "lowerlm: error: --rank 2 is not one of the 2 ranks of --tp 2; give --rank 0 to 1")


def test_compile_with_tp_outside_a_process_group_is_one_clear_error():
    with pytest.raises(lowerlm.errors.CompileError, match=r"tp=2 needs torch.distributed initialized with 2 ranks "
                                                          r"\(here: none\): run the script under `torchrun"):
        lowerlm.compile_model(tiny_model("llama"), backend="reference", tp=2)


# ---- faults: every rank ends, with an error, in bounded time -----------------------------------------------------
def _rank_that_fails(rank: int, world: int, how: str) -> None:
    import signal

    import torch.distributed as dist

    if rank == 1:
        if how == "raise":
            raise RuntimeError("rank 1 broke on purpose")
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(4))  # rank 0 waits for a peer that never comes


@pytest.mark.parametrize("how, message", [("raise", "rank 1 of 2 failed: RuntimeError: rank 1 broke on purpose"),
                                          ("kill", "rank 1 of 2 exited with code -9")])
def test_a_rank_that_raises_or_is_killed_ends_every_rank(how, message, monkeypatch):
    import time

    from lowerlm.errors import LowerlmError

    monkeypatch.setenv("LOWERLM_TP_TIMEOUT", "60")
    start = time.perf_counter()
    with pytest.raises(LowerlmError) as e:
        launch(_rank_that_fails, 2, how)
    seconds = time.perf_counter() - start
    assert str(e.value).startswith(message) and "the other ranks were stopped" in str(e.value)
    assert seconds < 60, f"{seconds:.1f} s"
    print(f"{how}: every rank ended in {seconds:.1f} s")


@pytest.mark.slow
def test_generate_tp_2_of_the_default_model_answers_paris_with_eagers_tokens():
    """SmolLM2-135M-Instruct's real weights over two ranks (its 9 heads do not divide: the attention replicated,
    the MLPs and the lm_head split): the answer and the same tokens as transformers eager, which the single-rank
    compile also gives (tests/test_cli.py's demo test)."""
    from .test_cli import lowerlm as cli

    out = cli("generate", "--tp", "2", "--backend", "reference", "--compare-eager", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "identical tokens" in out.stdout, out.stdout
    assert out.stdout.count("(lowerlm, reference backend)") == 1  # rank 0 alone writes


def test_a_partial_value_read_elsewhere_keeps_its_block_whole():
    """Must not fire on the MLP when its gate projection is read outside it (a shard would be read whole there):
    only the attention (and the lm_head) is sharded."""
    act = "  %act = silu(%g) : f32[B,S,32]  # model.layers.0.mlp.act_fn\n"
    text = example_text().replace(act, act + "  %seen = neg(%g) : f32[B,S,32]\n")
    text = text.replace("return %logits", "return %logits, %seen")
    _, record = _sharded(0, 2, text)
    assert record.rewrites == 2
    assert [line.split(" =")[0] for line in _lines(record.module, "= weight ")] == [
        "%wq.shard", "%wk.shard", "%wv.shard", "%wo.shard", "%embed.shard"]


def _moe_text() -> str:
    """The example layer with a MoE MLP: a router, 4 experts of 8 units, and its MLP as a shared expert scaled by a
    sigmoid gate (Qwen2-MoE's form), added to the routed experts."""
    text = example_text().replace(".mlp.gate_proj", ".mlp.shared_expert.gate_proj").replace(
        ".mlp.up_proj", ".mlp.shared_expert.up_proj").replace(".mlp.down_proj", ".mlp.shared_expert.down_proj")
    params = ('  "model.layers.0.mlp.gate.weight": f32[4,16]\n'
              '  "model.layers.0.mlp.experts.gate_up_proj": f32[4,16,16]\n'
              '  "model.layers.0.mlp.experts.down_proj": f32[4,16,8]\n'
              '  "model.layers.0.mlp.shared_expert_gate.weight": f32[1,16]\n')
    text = text.replace('  "model.norm.weight"', params + '  "model.norm.weight"')
    routed = """  %flat = reshape(%h2) {shape=[B*S,16]} : f32[B*S,16]  # model.layers.0.mlp
  %router = param "model.layers.0.mlp.gate.weight" : f32[4,16]
  %ids, %rw = moe_route(%flat, %router) {top_k=2} : i32[B*S,2], f32[B*S,2]  # model.layers.0.mlp.gate
  %egu = param "model.layers.0.mlp.experts.gate_up_proj" : f32[4,16,16]
  %edn = param "model.layers.0.mlp.experts.down_proj" : f32[4,16,8]
  %e = experts(%flat, %ids, %rw, %egu, %edn) : f32[B*S,16]  # model.layers.0.mlp.experts
  %e3 = reshape(%e) {shape=[B,S,16]} : f32[B,S,16]  # model.layers.0.mlp
"""
    shared_gate = """  %wsg = param "model.layers.0.mlp.shared_expert_gate.weight" : f32[1,16]
  %sg = linear(%h2, %wsg) : f32[B,S,1]  # model.layers.0.mlp.shared_expert_gate
  %sgs = sigmoid(%sg) : f32[B,S,1]  # model.layers.0.mlp
  %ds = mul(%d, %sgs) : f32[B,S,16]  # model.layers.0.mlp
  %m = add(%e3, %ds) : f32[B,S,16]  # model.layers.0.mlp
  %r2 = add(%r1, %m) : f32[B,S,16]  # model.layers.0
"""
    old = "  %r2 = add(%r1, %d) : f32[B,S,16]  # model.layers.0\n"
    assert old in text
    text = text.replace(old, shared_gate)
    first = "  %wg = param"
    return text.replace(first, routed + first)


def test_moe_sharding_golden_one_reduction_after_routed_and_shared():
    """Experts tensor-parallel: each expert's units split (gate and up halves alike), the router whole; the shared
    expert split like an MLP; its gate's scaling and the add of the two moved before one reduction."""
    _, record = _sharded(1, 2, _moe_text())
    assert record.rewrites == 4  # the attention, the experts, the shared expert's MLP, the lm_head
    fused = run_pass("fuse_allreduce_norm", fuse_allreduce_norm, record.module).module
    assert _lines(fused, "experts", "allreduce_add_rms_norm(%m", "moe_route", "%e3", "%ds", "%m ",
                  "%wg.shard =", "%wu.shard =", "%wd.shard =") == [
        "%ids, %rw = moe_route(%flat, %router) {top_k=2} : i32[B*S,2], f32[B*S,2]  # model.layers.0.mlp.gate",
        '%egu.shard = weight concat[1](slice[1,4,8](param "model.layers.0.mlp.experts.gate_up_proj"), '
        'slice[1,12,16](param "model.layers.0.mlp.experts.gate_up_proj")) : f32[4,8,16]',
        '%edn.shard = weight slice[2,4,8](param "model.layers.0.mlp.experts.down_proj") : f32[4,16,4]',
        "%e.partial = experts(%flat, %ids, %rw, %egu.shard, %edn.shard) : f32[B*S,16]  # model.layers.0.mlp.experts",
        "%e3.partial = reshape(%e.partial) {shape=[B,S,16]} : f32[B,S,16]  # model.layers.0.mlp",
        '%wg.shard = weight slice[0,16,32](param "model.layers.0.mlp.shared_expert.gate_proj.weight") : f32[16,16]',
        '%wu.shard = weight slice[0,16,32](param "model.layers.0.mlp.shared_expert.up_proj.weight") : f32[16,16]',
        '%wd.shard = weight slice[1,16,32](param "model.layers.0.mlp.shared_expert.down_proj.weight") : f32[16,16]',
        "%ds.partial = mul(%d.partial, %sgs) : f32[B,S,16]  # model.layers.0.mlp",
        "%m.partial = add(%e3.partial, %ds.partial) : f32[B,S,16]  # model.layers.0.mlp",
        "%hf, %r2 = allreduce_add_rms_norm(%m.partial, %r1, %lnf) {world=2, eps=1e-05} : f32[B,S,16], f32[B,S,16]  "
        "# model.layers.0.mlp.experts, model.layers.0.mlp.shared_expert.down_proj, model.layers.0, model.norm"]
    assert sum(line.count("allreduce") for line in _lines(fused, "allreduce")) == 2  # attention, then the MLP


def test_experts_whose_units_do_not_divide_stay_whole_and_a_down_bias_is_rank_0s():
    """Must not fire on experts of 8 units over 3 ranks (nor on anything else of the layer: 4 heads, 32 units).
    Over 2 ranks an experts' down bias (inside the routing-weighted sum) is rank 0's alone; its gate_up bias is
    split like the rows."""
    before, three = _sharded(0, 3, _moe_text())
    assert three.rewrites == 0 and three.module == before
    text = _moe_text().replace(
        '  "model.layers.0.mlp.gate.weight": f32[4,16]\n',
        '  "model.layers.0.mlp.gate.weight": f32[4,16]\n  "model.layers.0.mlp.experts.gate_up_proj_bias": f32[4,16]\n'
        '  "model.layers.0.mlp.experts.down_proj_bias": f32[4,16]\n').replace(
        "  %e = experts(%flat, %ids, %rw, %egu, %edn)",
        '  %egub = param "model.layers.0.mlp.experts.gate_up_proj_bias" : f32[4,16]\n'
        '  %ednb = param "model.layers.0.mlp.experts.down_proj_bias" : f32[4,16]\n'
        "  %e = experts(%flat, %ids, %rw, %egu, %edn, %egub, %ednb)")
    for rank, bias in ((0, ", down_bias=%ednb)"), (1, ")")):
        _, record = _sharded(rank, 2, text)
        lo, hi = (0, 4) if rank == 0 else (4, 8)
        assert _lines(record.module, "%egub.shard", "%e.partial = ") == [
            f'%egub.shard = weight concat[1](slice[1,{lo},{hi}](param "model.layers.0.mlp.experts.gate_up_proj_bias"), '
            f'slice[1,{lo + 8},{hi + 8}](param "model.layers.0.mlp.experts.gate_up_proj_bias")) : f32[4,8]',
            f"%e.partial = experts(%flat, %ids, %rw, %egu.shard, %edn.shard, gate_up_bias=%egub.shard{bias} : "
            "f32[B*S,16]  "
            "# model.layers.0.mlp.experts"]


def _rank_given_other_things(rank: int, world: int, out: str) -> None:
    """Compile calls with another max_seq_len, then other weights, on rank 1: each refused on both ranks."""
    from lowerlm.errors import CompileError

    said = []
    for model, seq in ((tiny_model("llama"), 64 + 16 * rank), (tiny_model("llama", seed=rank), 64)):
        try:
            lowerlm.compile_model(model, backend="reference", max_seq_len=seq, tp=world, tokenizer=False)
        except CompileError as e:
            said.append(str(e))
    torch.save(said, f"{out}.{rank}")


def test_ranks_given_different_models_or_options_refuse_to_start(tmp_path):
    out = str(tmp_path / "said")
    launch(_rank_given_other_things, 2, out)
    for rank in range(2):
        assert torch.load(f"{out}.{rank}") == [
            f"rank 1 of 2 got different {what} from rank 0: every rank of tp=2 must compile the same model with the "
            "same options" for what in ("compile options", "weights")]


def test_select_logits_gathers_rows_before_a_vocab_parallel_lm_head():
    """select_logits looks through the allgather of a vocab-parallel lm_head: the rows are picked before the
    rank's slice of the projection, and the gathered logits are [B, L, V]."""
    _, record = _sharded(0, 2)
    m = record.module
    for name in ("insert_state", "specialize", "select_logits"):
        m = run_pass(name, PASSES[name], m).module
    prefill = ir.print_module(m).split("graph decode")[0]
    assert [line.strip() for line in prefill.splitlines() if "# lm_head" in line][2:] == [
        "%hf.picked = gather(%hf, %logit_index.rows) {dim=1} : f32[B,L,16]  # lm_head",
        "%logits.part = linear(%hf.picked, %embed.shard) : f32[B,L,32]  # lm_head",
        "%logits = allgather(%logits.part) {world=2} : f32[B,L,64]  # lm_head"]


MLA_LAYER = """\
params {
  "q_proj.weight": f32[12,16]
  "kv_b.weight": f32[14,8]
  "o_proj.weight": f32[16,6]
}

graph forward(%x: f32[B,S,16], %c: f32[B,S,8], %k_pe: f32[B,S,2], %positions: i64[B,S], %seq_lens: i32[B]) {
  %wq = param "q_proj.weight" : f32[12,16]
  %q = linear(%x, %wq) : f32[B,S,12]  # model.layers.0.self_attn.q_proj
  %w = param "kv_b.weight" : f32[14,8]
  %o = mla_attention(%q, %c, %k_pe, %w, %positions, %seq_lens) {heads=2, nope=4, scale=0.4} : f32[B,S,6]
  %wo = param "o_proj.weight" : f32[16,6]
  %a = linear(%o, %wo) : f32[B,S,16]  # model.layers.0.self_attn.o_proj
  return %a
}
"""


def test_mla_sharding_golden_by_head():
    """MLA by head (latent 8, rotary 2, 2 heads of nope 4 and values 3): q's rows and kv_b's rows of the rank's
    head, o_proj's columns, then allreduce; the latent inputs stay whole. Must not fire over 3 ranks."""
    record = run_pass("tensor_parallel", tensor_parallel(1, 2), ir.parse_module(MLA_LAYER))
    assert record.rewrites == 1
    assert _lines(record.module, "") == [
        '%wq.shard = weight slice[0,6,12](param "q_proj.weight") : f32[6,16]',
        "%q = linear(%x, %wq.shard) : f32[B,S,6]  # model.layers.0.self_attn.q_proj",
        '%w.shard = weight slice[0,7,14](param "kv_b.weight") : f32[7,8]',
        "%o = mla_attention(%q, %c, %k_pe, %w.shard, %positions, %seq_lens) {heads=1, nope=4, scale=0.4} : "
        "f32[B,S,3]",
        '%wo.shard = weight slice[1,3,6](param "o_proj.weight") : f32[16,3]',
        "%a.partial = linear(%o, %wo.shard) : f32[B,S,16]  # model.layers.0.self_attn.o_proj",
        "%a = allreduce(%a.partial) {world=2} : f32[B,S,16]  # model.layers.0.self_attn.o_proj"]
    three = run_pass("tensor_parallel", tensor_parallel(0, 3), ir.parse_module(MLA_LAYER))
    assert three.rewrites == 0


TORCHRUN_SCRIPT = """\
import sys

import torch

import lowerlm
from tests.conftest import tiny_model

torch.set_num_threads(1)
cm = lowerlm.compile_model(tiny_model("llama"), backend="reference", max_batch=1, max_seq_len=64, tp=2,
                           tokenizer=False)  # the group comes from torchrun's variables (init_from_env)
tokens = [s[0] for s in cm.generate_ids([[5, 7, 9]], 8, stop_ids=[])]
import torch.distributed as dist
with open(f"{sys.argv[1]}.{dist.get_rank()}", "w") as f:  # one file per rank: their prints would interleave
    f.write(f"rank {dist.get_rank()} of {dist.get_world_size()}: {tokens}")
"""


def test_a_users_script_under_torchrun(tmp_path):
    """``torchrun --standalone --nproc-per-node 2`` on a script calling compile_model(tp=2) with no group of its
    own: each rank joins from torchrun's variables and generates the single-rank tokens."""
    import subprocess
    import sys

    from .conftest import ROOT

    script = tmp_path / "user.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path / "said")], capture_output=True, text=True, timeout=180, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    single = lowerlm.compile_model(tiny_model("llama"), backend="reference", max_batch=1, max_seq_len=64,
                                   tokenizer=False)
    want = [s[0] for s in single.generate_ids([[5, 7, 9]], 8, stop_ids=[])]
    assert [(tmp_path / f"said.{r}").read_text() for r in range(2)] == [f"rank {r} of 2: {want}" for r in range(2)]
