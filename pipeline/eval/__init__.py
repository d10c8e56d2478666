"""Evaluation jobs (`vlp eval ...`), each a function the CLI (cli.py) wraps:

    retrieval.job.evaluate_retrieval(checkpoint, karpathy_json=|shards=, ...) -> dict
    vqa.job.evaluate_vqa(checkpoint, vqa_dir=, ...) -> dict
    classification.zeroshot.evaluate_zeroshot(checkpoint, dataset=, ...) -> dict
    classification.probe.evaluate_linear_probe(checkpoint, dataset=, ...) -> dict
    nightly.runner.run_nightly(runs_dir, suite=, out_dir=) -> summary dict

Shared by the jobs: images (image references and decoding) and encode (batched embeddings).
openclip is an OpenCLIP-compatible view of a checkpoint, for CLIP_benchmark's own functions.
Checkpoints are loaded with vlp.pipeline.data.checkpoints.load_model.
"""
