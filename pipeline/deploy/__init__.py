"""Deployment: exports of a checkpoint for serving (`vlp export`) and compressed ones (`vlp
deploy quantize|prune|distill|onnx`) that the eval jobs load unchanged."""
