"""Codegen: turns the specialised graphs of a module into a Program. The reference backend (plain torch, the
oracle) is here now; the Triton and ONNX backends come with their issues."""
