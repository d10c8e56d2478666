"""Evaluation jobs: zero-shot retrieval, VQA, nightly benchmark."""
