"""Runtime: state buffers allocated once, prefill and decode, the sampler, streaming generation, the on-device
decode loop and CUDA graphs, over a program from ``lowerlm.codegen`` (docs/runtime.md)."""
