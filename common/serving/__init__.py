"""Serving: the Ranker on every backend, ONNX export and int8."""
