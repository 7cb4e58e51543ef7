"""Lean runtime: numpy, OpenCV and ONNX Runtime or TensorRT. Never imports torch."""
