"""backend="auto" at op level (codegen/partition.py, codegen/auto.py): nodes the preferred backend lacks run on
the reference backend, grouped into as few partitions as the dependencies (and in-place state) allow; the
partitioned program computes what the reference backend computes, state updated in place; copies between
devices are counted."""

from __future__ import annotations

import pytest
import torch

import lowerlm
import lowerlm.ir as ir
from lowerlm.codegen.auto import AutoProgram
from lowerlm.codegen.partition import assign, build, describe
from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.ir import Op
from lowerlm.ir.errors import CompileError

from .conftest import tiny_model

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, auto prefers Triton, which runs all")


def rope_off(node):
    """Keeps every RoPE off the preferred backend (``AutoProgram``'s ``exclude``): a node it could run, placed on
    the reference backend as one it lacks would be."""
    return "kept off ONNX for the test" if node.op is Op.ROPE else None


@pytest.fixture(scope="module")
def llama():
    cm = lowerlm.compile_model(tiny_model("llama"), backend="reference", max_batch=3, max_seq_len=64)
    return cm, cm.ir


def test_unsupported_ops_fall_back_one_partition_each(llama):
    cm, module = llama
    program = AutoProgram(module, cm.weights, exclude=rope_off)
    lines = program.describe()
    assert lines[0] == "preferred backend: onnx on cpu"
    decode = lines[lines.index("decode: 5 partitions, 0 cross-device copies per run"):]
    assert decode[1].startswith("  decode.p0: onnx on cpu, 3 nodes (%embed_tokens .. %L0.vcache1); in 3, out 3")
    assert decode[2] == ("  decode.p1: reference on cpu, 1 node (%L0.self_attn.q_rope); in 3, out 2; fallback for "
                         "rope: kept off ONNX for the test")
    assert [p.backend for p in program.plan()["decode"].parts] == ["onnx", "reference"] * 2 + ["onnx"]
    rope_part = program.plan()["decode"].parts[1].graph
    assert [v.name for v in rope_part.inputs] == ["L0.q_proj", "L0.k_proj", "positions"]
    assert rope_part.outputs == ("L0.self_attn.q_rope", "L0.self_attn.k_rope") and rope_part.state == ()
    # the cache writes stay on ONNX and update the state there: declared state of the partition writing them
    states = [s.name for p in program.plan()["decode"].parts for s in p.graph.state]
    assert states == ["L0.vcache", "L0.kcache", "L1.vcache", "L1.kcache"]
    for part in program.plan()["decode"].parts:  # each partition is a graph the verifier accepts
        ir.verify_graph(part.graph, dict(module.params))


def test_partitioned_program_equals_the_reference_backend(llama):
    cm, module = llama
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    prompts = [[5, 7, 9, 11, 3], [8, 1, 4], [2, 9, 9, 9, 9, 9, 30]]
    results = {}
    for name, program in (("auto", AutoProgram(module, cm.weights, exclude=rope_off)),
                          ("reference", ReferenceProgram(module, cm.weights))):
        cm.program, cm._generator = program, None  # the same compiled model, run by each program
        with torch.no_grad():
            results[name] = (cm(ids), cm(ids, attention_mask=mask),
                             [s[0] for s in cm.generate_ids(prompts[:1], 32)], list(cm.generate_ids(prompts, 16)))
    auto, ref = results["auto"], results["reference"]
    for got, want in zip(auto[:2], ref[:2]):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert auto[2] == ref[2] and auto[3] == ref[3]


STATE_IR = """params {
  "w": f32[4,4]
}
graph g(%x: f32[B,1,4], %positions: i64[B,1], %seq_lens: i32[B]) state(%kc0: f32[B,1,T,4] @layer0) {
  %w = param "w" : f32[4,4]
  %a = linear(%x, %w) : f32[B,1,4]
  %r = cached_attention(%a, %kc0, %kc0, %positions, %seq_lens) {scale=0.5} : f32[B,1,4]
  %kc1 = kv_cache_write(%kc0, %x, %positions) : f32[B,1,T,4]
  %o = cached_attention(%r, %kc1, %kc1, %positions, %seq_lens) {scale=0.5} : f32[B,1,4]
  return %o state(%kc1)
}
"""


def test_a_state_write_waits_for_every_reader_of_the_version_it_overwrites():
    module = ir.parse_module(STATE_IR)
    ir.verify_module(module)
    g = module.graph("g")
    only_r = lambda node: "kept off for the test" if node.name == "r" else None  # noqa: E731
    plan = assign(g, ["onnx", "reference"], lambda b, node: only_r(node))
    # by data dependencies alone the write could join %a's partition — and overwrite %kc0 before %r reads it
    assert [[n.name for n in p.nodes] for p in plan.parts] == [["a"], ["r"], ["kc1", "o"]]
    weights = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(0))}
    program = AutoProgram(module, weights, exclude=only_r)
    assert [p.backend for p in program.plan()["g"].parts] == ["onnx", "reference", "onnx"]
    gen = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(2, 1, 4, generator=gen), "positions": torch.tensor([[3], [1]]),
              "seq_lens": torch.tensor([4, 2], dtype=torch.int32)}
    cache = torch.randn(2, 1, 8, 4, generator=gen)
    (want,), want_state = ReferenceProgram(module, weights).run("g", inputs, {"kc0": cache})
    buffer = cache.clone()
    (got,), got_state = program.run("g", inputs, {"kc0": buffer}, inplace=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buffer, want_state["kc0"])  # updated in place
    assert got_state["kc0"].data_ptr() == buffer.data_ptr()


def test_cross_device_copies_are_counted():
    module = lowerlm.compile_model(tiny_model("llama"), backend="reference").ir
    from lowerlm.codegen.onnx.lower import unsupported

    g = module.graph("decode")
    reason = unsupported(g)
    plan = build(assign(g, ["onnx", "reference"], lambda b, node: rope_off(node) or reason(node)),
                 {"": "cpu", "onnx": "cpu", "reference": "meta"})
    # per layer: q, k and positions to the rope's device, the rotated q and k back
    assert len(plan.copies) == 10
    lines = describe(plan)
    assert lines[0] == "decode: 5 partitions, 10 cross-device copies per run"
    assert "  copy %L0.q_proj f32[B,1,32]: cpu -> meta" in lines
    assert "  copy %L0.self_attn.q_rope f32[B,1,32]: meta -> cpu" in lines
    # a partition that writes state must stay with the state buffers
    everything = lambda b, node: "kept off for the test" if node.op is Op.KV_CACHE_WRITE else None  # noqa: E731
    with pytest.raises(CompileError, match="would update state on meta, but the state buffers live on cpu"):
        build(assign(g, ["onnx", "reference"], everything), {"": "cpu", "onnx": "cpu", "reference": "meta"})


def test_the_onnx_backend_alone_names_what_it_lacks_and_points_to_auto():
    """When the program is built (compile_model), not at a graph's first run."""
    from lowerlm.codegen.onnx.program import OnnxProgram

    cm = lowerlm.compile_model(tiny_model("mixtral"), backend="reference", passes=["canonicalize"])
    with pytest.raises(CompileError, match=r"no lowering for experts \(graph 'forward'\); backend='auto'"):
        OnnxProgram(cm.ir, cm.weights)
    with pytest.raises(CompileError, match=r"no lowering for experts \(graph 'forward'\); backend='auto'"):
        lowerlm.compile_model(tiny_model("mixtral"), backend="onnx", passes=["canonicalize"])
