"""Frontend: torch.export capture of a model and import into the IR.

``trace_model(model)`` exports (``export.py``), raises RMSNorm / RoPE / attention and imports the rest op by op
(``importer.py``, ``raise_*.py``, ``aten.py``), caching the result (``trace.py``). Blocks that tracing would unroll
are swapped for custom ops first (``capture.py``).
"""
