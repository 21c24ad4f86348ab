"""The Triton backend: one tutorial-style kernel per fused op (one file each) and ``TritonProgram``, which runs a
module's graphs by launching them; views and the few ops with no kernel run as torch ops on the same device.

Kernels run on a CUDA GPU, or on the CPU under ``TRITON_INTERPRET=1`` (slow: tests use tiny shapes).
"""
