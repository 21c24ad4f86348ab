"""The ONNX backend: IR graphs lowered to ONNX models (``lower.py``) run by ONNX Runtime (``program.py``)."""
