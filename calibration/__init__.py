"""INT8 calibration from line images with ONNX Runtime static quantization, and its report."""
