"""ONNX export, model-file safety checks and ONNX Runtime scoring."""
