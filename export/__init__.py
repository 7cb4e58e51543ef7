"""Export backbones to ONNX (and TensorRT). Needs the ``export`` extra (torch, open_clip, onnx)."""
