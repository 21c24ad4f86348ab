"""Runtime: weights on the device, state buffers, sampler and the autoregressive loop (built by the runtime
issue on top of ``lowerlm.codegen``)."""
