"""The Triton backend: one tutorial-style kernel per fused op (one file each) and ``TritonProgram``, which runs a
module's graphs by launching them; views and the few ops with no kernel run as torch ops on the same device.

Kernels run on a CUDA GPU, or on the CPU under ``TRITON_INTERPRET=1`` (slow: tests use tiny shapes).
"""

import functools

import torch
import triton

_RECORDING_FOR_GPU = [False]  # set by aot.Recorder(execute=False): launches are recorded as a GPU run makes them


def interpreted(device) -> bool:
    """Whether kernels on ``device`` run in Triton's interpreter; launchers then choose its variants (f32 dots,
    which it computes correctly, and small tiles, which it runs fast). False while launches are recorded for a
    GPU compile (codegen/triton/aot.py), so the recorded launches are the GPU's."""
    return torch.device(device).type == "cpu" and not _RECORDING_FOR_GPU[0]


@functools.lru_cache(maxsize=None)
def sm_count(device) -> int:
    """Streaming multiprocessors on ``device``: launchers size grids to keep them all busy. 132 (an H100) where
    no GPU is asked: the interpreter, or launches recorded for an H100."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., K] as a [M, K] matrix with a contiguous last dimension (a view when it can be)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def tile_for_sms(units: int, device, lo: int, hi: int = 64) -> int:
    """A power-of-two tile of ``units`` (rows of W, output columns...) in [lo, hi], cut until the launch has two
    programs per SM: a decode projection is bound by reading W, which takes every SM streaming."""
    return min(hi, max(lo, triton.next_power_of_2(triton.cdiv(units, 2 * sm_count(device)))))
