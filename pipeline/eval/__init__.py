"""Evaluation jobs (`vlp eval ...`), each a function the CLI (cli.py) wraps:

    retrieval.job.evaluate_retrieval(checkpoint, karpathy_json=|shards=, ...) -> dict
    vqa.job.evaluate_vqa(checkpoint, vqa_dir=, ...) -> dict
    nightly.runner.run_nightly(runs_dir, suite=, out_dir=) -> summary dict

Shared by the jobs: images (image references and decoding) and encode (batched embeddings).
Checkpoints are loaded with vlp.pipeline.data.checkpoints.load_model.
"""
