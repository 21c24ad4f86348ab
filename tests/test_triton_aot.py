"""The GPU's view of the Triton backend, checked on the CPU: every kernel a model launches compiles with Triton's
real compiler for an H100 (sm_90), and a decode step is safe to capture in a CUDA graph (the same launches
whatever the position, no host synchronisation) within the decode launch budget (docs/backends.md).

Triton's interpreter runs kernels as numpy programs and accepts code the compiler rejects, so the kernel tests in
test_triton.py alone cannot tell whether the GPU would compile them. The launches are recorded without running
them (the launchers' control flow does not read device data), then compiled in a process without the interpreter.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

import lowerlm
from lowerlm.codegen.triton.aot import Recorder, TorchOps, compile_launches, decode_step_launches, unique
from lowerlm.runtime.generate import decode_one, prefill

from .conftest import calibration_ids, tiny_model

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real (test_triton)")


def _has_ptxas() -> bool:
    spec = importlib.util.find_spec("triton.backends.nvidia")
    return spec is not None and (Path(spec.submodule_search_locations[0]) / "bin" / "ptxas").exists()


def _models():
    from lowerlm.calibrate import calibrate

    llama = tiny_model("llama")
    yield "llama", llama, {}
    yield "llama-bf16", tiny_model("llama").to(torch.bfloat16), {}
    yield "mistral-window", tiny_model("mistral", sliding_window=4), {}
    yield "qwen2-bias", tiny_model("qwen2"), {}
    yield "mixtral", tiny_model("mixtral"), {}
    yield "qwen3-moe-bf16", tiny_model("qwen3_moe").to(torch.bfloat16), {}
    yield "arm", llama, {"arm": calibrate(llama, token_ids=calibration_ids(3, 32), sparsity=0.5)}


def _record_workload(rec_models) -> list:
    """Launches of prefill (the rows kernel's rows and the prefill path's), decode at batch 1 and 2, sampling."""
    from lowerlm.codegen.triton import decode_attention, rope
    from lowerlm.codegen.triton.sampling import sample

    launches = []
    for _, model, kw in rec_models:
        cm = lowerlm.compile_model(model, backend="triton", max_batch=2, max_seq_len=64, **kw)
        state = cm.generator.state
        with Recorder(execute=False) as rec:
            for s in (7, 40):  # 14 rows take the rows GEMM kernel, 80 the prefill path
                prefill(cm.program, state, torch.randint(0, 64, (2, s)), torch.tensor([s, s - 2]))
            for b in (1, 2):
                decode_one(cm.program, state, torch.zeros(b, dtype=torch.long), torch.full((b,), 9))
            seed, positions = torch.zeros(1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64)
            ids, lens = torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, dtype=torch.int32)
            for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.2, 8, 0.9), (0.7, 0, 0.5), (1.0, 5, 1.0)):
                sample(torch.randn(2, 64), temperature, top_k, top_p, seed, positions[:, 0])
                sample(torch.randn(2, 1, 64).to(torch.bfloat16)[:, 0], temperature, top_k, top_p, seed,
                       positions[:, 0], out=ids[:, 0], seq_lens=lens, limit=63)  # the decode loop's step
            for temperature in (0.0, 0.8):  # a vocabulary of 3 chunks: split over 3 programs on a GPU
                sample(torch.randn(2, 3000), temperature, 0, 1.0, seed, positions[:, 0], out=ids[:, 0],
                       seq_lens=lens, limit=63)
        launches += rec.launches
    with Recorder(execute=False) as rec:  # the launchers' unfused forms, which the Triton tail fuses away
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(2, 1, w).to(dtype) for w in (64, 32, 32))
            kc, vc = torch.zeros(2, 2, 40, 16, dtype=dtype), torch.zeros(2, 2, 40, 16, dtype=dtype)
            pos, lens = torch.tensor([[3], [20]]), torch.tensor([4, 21], dtype=torch.int32)
            for layout in ("half", "interleaved"):
                rope.rope(q, k, pos, (4, 2), torch.ones(8), 1.0, layout)
            rope.kv_cache_write(vc, v, pos)
            decode_attention.decode_attention(q, kc, vc, pos, lens, 0.25, True, 0)
    return launches + rec.launches


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton has no NVIDIA backend with ptxas to compile for sm_90")
def test_every_kernel_a_model_launches_compiles_for_sm90():
    launches = unique(_record_workload(list(_models())))
    names = Counter(launch.name for launch in launches)
    for kernel in ("embedding_kernel", "gemv_kernel", "rows_gemm_kernel", "rope_kernel", "rope_cache_write_kernel",
                   "attention_kernel", "decode_attention_kernel", "rms_norm_kernel", "arm_up_kernel", "arm_down_kernel",
                   "sample_kernel", "route_kernel", "grouped_gemm_kernel", "combine_kernel", "swiglu_kernel"):
        assert names[kernel] > 0, f"no workload launches {kernel}: {sorted(names)}"
    results = compile_launches(launches)
    assert len(results) == len(launches)
    failed = [(launch.name, launch.constexprs, r["error"]) for launch, r in zip(launches, results) if not r["ok"]]
    assert not failed, failed
    for launch, r in zip(launches, results):
        assert r["shared"] <= 227 * 1024, (launch.name, launch.constexprs, r["shared"])  # H100's per-block limit
        assert r["spills"] == 0, (launch.name, launch.constexprs, r)  # no kernel runs out of registers


# The decode launch budget (docs/backends.md), per layer: 5 launches for a dense layer (qkv with the norm,
# attention with rope and the cache writes, o with the residual, gate/up with the norm and SwiGLU, down with the
# residual); an MoE layer has route (with the norm), sort, two grouped GEMMs and the combine in place of the last two
# of the dense MLP's; with DeepSeek-V3's shared expert, 3 more (its gate|up, SwiGLU, down with the routed residual)
BUDGET = {"llama": 5, "mixtral": 8, "qwen3_moe": 8, "deepseek_v3_moe": 11}  # Qwen3's q/k norms: in the attention


def _budget_model(family):
    if family != "deepseek_v3_moe":
        return tiny_model(family)
    from .test_moe import _deepseek_block

    model = tiny_model("llama")  # its MLPs swapped for DeepSeek-V3 MoE blocks: traced router, groups, shared expert
    for i, layer in enumerate(model.model.layers):
        layer.mlp = _deepseek_block(True, seed=i)
    return model


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen3_moe", "deepseek_v3_moe"])
def test_a_decode_step_is_capturable_and_within_the_launch_budget(family):
    cm = lowerlm.compile_model(_budget_model(family), backend="triton", max_batch=32, max_seq_len=64)
    for batch in (1, 4, 32):  # the GEMV at 1, the rows GEMM beyond
        early, torch_ops = decode_step_launches(cm, batch, 3)
        late, _ = decode_step_launches(cm, batch, 50)
        # a captured graph freezes grids and scalar arguments: they must not depend on the position
        assert [(x.name, x.grid, x.scalars, x.constexprs) for x in early] == \
               [(x.name, x.grid, x.scalars, x.constexprs) for x in late]
        assert torch_ops == [], torch_ops  # every launch of the step is one of ours
        assert len(early) == 2 + BUDGET[family] * 2, Counter(x.name for x in early)  # + embedding, lm_head


def test_prefill_launches_fuse_the_elementwise_work():
    """A prefill (more than 64 rows: cuBLAS for the GEMMs) of a tiny 2-layer Llama at 100 tokens: the residual adds
    ride in the norm launches and in cuBLAS (addmm), SwiGLU is one launch; no add, silu or mul torch op is left.
    The lm_head runs on the last row only (select_logits): one GEMV with the final norm in its prologue."""
    cm = lowerlm.compile_model(tiny_model("llama"), backend="triton", max_batch=1, max_seq_len=128)
    ids, lens = torch.randint(0, 64, (1, 100)), torch.tensor([100])
    prefill(cm.program, cm.generator.state, ids, lens)  # one-time allocations happen here
    with Recorder(execute=False) as rec, TorchOps() as ops:
        prefill(cm.program, cm.generator.state, ids, lens)
    kernels, torch_ops = Counter(x.name for x in rec.launches), Counter(ops.launches)
    assert kernels == {"embedding_kernel": 1, "rms_norm_kernel": 4, "rope_cache_write_kernel": 2,
                       "attention_kernel": 2, "swiglu_kernel": 2, "gemv_kernel": 1}, kernels
    assert {op: torch_ops[op] for op in ("mm", "addmm", "gather", "add", "silu", "mul")} == \
           {"mm": 4, "addmm": 4, "gather": 1, "add": 0, "silu": 0, "mul": 0}, torch_ops
    assert sum(torch_ops.values()) == 13, torch_ops  # + 4 of the runtime's (positions, the last rows' index)


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton has no NVIDIA backend with ptxas to compile for sm_90")
def test_generated_kernels_kept_in_memory_compile_for_sm90(monkeypatch):
    """Without a compile cache a generated chain kernel has no file; compile_launches hands its source over."""
    from lowerlm.codegen.triton import elementwise
    from lowerlm.codegen.triton.program import TritonProgram

    from .test_triton import CHAIN, triton_tail

    monkeypatch.setattr(elementwise, "_LOADED", {})
    m = triton_tail(lowerlm.ir.verify_module(lowerlm.ir.parse_module(CHAIN)))
    program = TritonProgram(m, {"w": torch.randn(6)}, "cpu", cache=False)
    with Recorder(execute=False) as rec:
        program.run("forward", {"x": torch.randn(2, 3, 6), "y": torch.randn(2, 1, 6)})
    chains = [launch for launch in rec.launches if launch.name == "chain_kernel"]
    assert len(chains) == 4 and not any(os.path.exists(launch.file) for launch in chains)
    results = compile_launches(chains)
    assert all(r["ok"] for r in results), results
