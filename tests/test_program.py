"""The program protocol and the backend registry (codegen/program.py): every program class is a ``Program`` with
exactly the protocol's members, ``build_program`` builds each backend's program and refuses what a backend does not
take, the runtime drives any of them through the protocol alone, and the module imports no torch (the CLI reads
it)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

import lowerlm
from lowerlm.codegen.auto import AutoProgram
from lowerlm.codegen.onnx.program import OnnxProgram
from lowerlm.codegen.program import BACKENDS, DEFAULT_MAX_SEQ_LEN, Program, build_program, preferred
from lowerlm.codegen.reference import ReferenceProgram
from lowerlm.codegen.triton.program import TritonProgram, available
from lowerlm.errors import CompileError
from lowerlm.runtime.generate import Generator

from .conftest import ROOT, tiny_model

MEMBERS = {"module", "device", "device_sampling", "run", "prefill_chunk", "prepare"}
METHODS = ("run", "prefill_chunk", "prepare")
CLASSES = {"reference": ReferenceProgram, "onnx": OnnxProgram, "triton": TritonProgram, "auto": AutoProgram}


@pytest.fixture(scope="module")
def compiled():
    return lowerlm.compile_model(tiny_model("llama"), backend="reference", max_batch=2, max_seq_len=32,
                                 tokenizer=False)


def _protocol_members() -> set:
    return set(Program.__annotations__) | {n for n, v in vars(Program).items()
                                           if callable(v) and not n.startswith("_")}


def test_the_protocol_states_what_the_runtime_and_the_cli_call():
    assert _protocol_members() == MEMBERS
    assert set(BACKENDS) == set(CLASSES) and BACKENDS[0] == "auto"  # the order the CLI shows: the default first


@pytest.mark.parametrize("backend", list(CLASSES))
def test_every_program_class_defines_the_protocol_members(backend):
    """Statically: each method with the protocol's parameters, ``device_sampling`` a bool on the class (auto sets
    its own per instance too)."""
    cls = CLASSES[backend]
    for name in METHODS:
        assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"
        assert list(inspect.signature(getattr(cls, name)).parameters) == \
            list(inspect.signature(getattr(Program, name)).parameters), f"{cls.__name__}.{name}"
    assert isinstance(cls.device_sampling, bool)
    assert cls.device_sampling is (backend == "triton")


@pytest.mark.parametrize("backend", list(CLASSES))
def test_each_backend_builds_a_program(compiled, backend):
    if backend == "triton" and not available(TritonProgram.resolve_device()):
        pytest.skip("no GPU and no Triton interpreter")
    if backend == "auto" and torch.cuda.is_available():
        pytest.skip("with a GPU, auto prefers Triton")
    program = build_program(backend, compiled.ir, compiled.weights)
    assert type(program) is CLASSES[backend] and isinstance(program, Program)
    assert program.module is compiled.ir and isinstance(program.device, torch.device)
    assert program.prepare() is None
    assert program.prefill_chunk(8) is None  # a short prompt is prefilled whole everywhere
    if backend == "auto":  # on a CPU: ONNX for every graph, sampling on the host
        assert program.backend == "onnx" and program.device_sampling is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, auto prefers Triton")
def test_the_runtime_drives_every_cpu_program_through_the_protocol(compiled):
    """The same greedy tokens from the runtime's Generator over each CPU backend's program."""
    prompts = [[5, 7, 9, 11], [8, 1]]
    tokens = {}
    for backend in ("reference", "onnx", "auto"):
        program = build_program(backend, compiled.ir, compiled.weights)
        generator = Generator(program, compiled.ir, 32, 2, compiled.vocab_size)
        tokens[backend] = list(generator.generate(prompts, 6, stop_ids=()))
    assert tokens["onnx"] == tokens["reference"] == tokens["auto"]


def test_the_registry_refuses_what_a_backend_does_not_take(compiled):
    with pytest.raises(CompileError, match=r"^unknown backend 'tvm'; available: auto, onnx, triton, reference$"):
        build_program("tvm", compiled.ir, compiled.weights)
    for backend in ("reference", "triton"):
        with pytest.raises(CompileError, match=f"weight_bits quantizes weights for the ONNX backend; backend "
                                               f"'{backend}' runs the model's own precision"):
            build_program(backend, compiled.ir, compiled.weights, weight_bits=4)
    with pytest.raises(CompileError, match="unknown backend 'tvm'; available: auto, onnx, triton, reference"):
        lowerlm.compile_model(tiny_model("llama"), backend="tvm")  # before tracing
    with pytest.raises(CompileError, match="weight_bits must be 4 or 8"):
        build_program("onnx", compiled.ir, compiled.weights, weight_bits=3)


def test_preferred_backend():
    assert preferred("cpu") == "onnx" and preferred("cuda") == preferred(torch.device("cuda", 0)) == "triton"
    assert lowerlm.compile.BACKENDS is BACKENDS and lowerlm.compile.DEFAULT_MAX_SEQ_LEN == DEFAULT_MAX_SEQ_LEN


def test_the_registry_and_the_cli_import_no_torch():
    code = ("import sys, lowerlm.codegen.program, lowerlm.cli; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'triton', 'lowerlm.codegen.reference') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
