"""Codegen: turns the graphs of a module into a program: the reference backend (plain torch, the oracle), ONNX
Runtime (``onnx/``), Triton (``triton/``) and ``auto``, which partitions each graph between the device's preferred
backend and the reference one (docs/backends.md)."""
