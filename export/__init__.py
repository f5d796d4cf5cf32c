"""Exporters: ONNX (always validated in ONNX Runtime) and TensorRT engines."""
