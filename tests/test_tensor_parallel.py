"""Tensor parallelism (passes/tensor_parallel.py): golden IR of the sharding and of fuse_allreduce_norm, the cases
where they must not fire (a head count that does not divide: attention replicated, only the MLP sharded), and two
ranks over gloo on this CPU giving the single-rank logits and greedy tokens."""

from __future__ import annotations

import os

import pytest
import torch

import lowerlm
import lowerlm.ir as ir
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
    assert record.rewrites == 2  # the attention and the MLP
    assert _lines(record.module, "= weight ", "allreduce(", "attention(", "rope(") == [
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
        "%d = allreduce(%d.partial) {world=2} : f32[B,S,16]  # model.layers.0.mlp.down_proj"]
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
    assert record.rewrites == 1
    assert _lines(record.module, "attention(", "allreduce(") == [
        "%o = attention(%qr, %kr, %v, %positions, %seq_lens) {heads=[4,1], scale=0.5} : f32[B,S,16]  "
        "# model.layers.0.self_attn",
        "%d = allreduce(%d.partial) {world=2} : f32[B,S,16]  # model.layers.0.mlp.down_proj"]
    assert _lines(record.module, "= weight ") == [
        '%wg.shard = weight slice[0,0,16](param "model.layers.0.mlp.gate_proj.weight") : f32[16,16]',
        '%wu.shard = weight slice[0,0,16](param "model.layers.0.mlp.up_proj.weight") : f32[16,16]',
        '%wd.shard = weight slice[1,0,16](param "model.layers.0.mlp.down_proj.weight") : f32[16,16]']
    before, three = _sharded(0, 3)
    assert three.rewrites == 0 and three.module == before
    assert run_pass("fuse_allreduce_norm", fuse_allreduce_norm, before).rewrites == 0  # no allreduce: no fusion


def test_one_rank_is_the_identity():
    before, record = _sharded(0, 1)
    assert record.rewrites == 0 and record.module == before


# ---- two ranks over gloo ---------------------------------------------------------------------------------------
def _rank(rank: int, world: int, family: str, backend: str, out: str):
    """One rank under runtime/distributed.py's ``launch`` (its gloo group already joined)."""
    model = tiny_model(family)
    cm = lowerlm.compile_model(model, backend=backend, max_batch=2, max_seq_len=64, tp=world, tokenizer=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = cm(ids)
    tokens = [s[0] for s in cm.generate_ids([[5, 7, 9, 11, 3]], 32, stop_ids=[])]
    ops = sorted({n.op.value for g in cm.ir.graphs for n in g.nodes})
    plan = cm.program.plan() if hasattr(cm.program, "plan") else {}
    parts = {g: [p.backend for p in pl.parts] for g, pl in plan.items()}
    torch.save({"logits": logits, "tokens": tokens, "ops": ops, "parts": parts}, f"{out}.{rank}")


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_two_ranks_give_the_single_rank_logits_and_tokens(family, backend, tmp_path):
    model = tiny_model(family)
    single = lowerlm.compile_model(model, backend=backend, max_batch=2, max_seq_len=64, tokenizer=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    want = single(ids)
    want_tokens = [s[0] for s in single.generate_ids([[5, 7, 9, 11, 3]], 32, stop_ids=[])]
    out = str(tmp_path / "rank")
    launch(_rank, 2, family, backend, out)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    for r in results:
        assert "allreduce_add_rms_norm" in r["ops"]
        if backend == "auto":  # ONNX sessions, the collectives between them on the reference backend
            assert r["parts"]["decode"][:3] == ["onnx", "reference", "onnx"], r["parts"]
        # the partial sums are added in another order than one rank's GEMM: equal within f32 rounding
        assert (r["logits"] - want).abs().max() <= 1e-5 * want.abs().max()
        assert r["tokens"] == want_tokens
    assert torch.equal(results[0]["logits"], results[1]["logits"])  # every rank computes the same logits


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


def test_generate_tp_2_gives_the_single_rank_tokens(tmp_path):
    from .test_cli import lowerlm as cli

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    args = ("generate", "--model", str(tmp_path / "tiny"), "--token-ids", "--max-new-tokens", "16", "--backend",
            "reference", "5,7,9")
    one, two = cli(*args), cli(*args, "--tp", "2")
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout.splitlines()[0] == one.stdout.splitlines()[0]  # the tokens, written once (by rank 0)
    assert two.stdout.count("[0]") == 1


def test_a_partial_value_read_elsewhere_keeps_its_block_whole():
    """Must not fire on the MLP when its gate projection is read outside it (a shard would be read whole there):
    only the attention is sharded."""
    act = "  %act = silu(%g) : f32[B,S,32]  # model.layers.0.mlp.act_fn\n"
    text = example_text().replace(act, act + "  %seen = neg(%g) : f32[B,S,32]\n")
    text = text.replace("return %logits", "return %logits, %seen")
    _, record = _sharded(0, 2, text)
    assert record.rewrites == 1
    assert [line.split(" =")[0] for line in _lines(record.module, "= weight ")] == [
        "%wq.shard", "%wk.shard", "%wv.shard", "%wo.shard"]
