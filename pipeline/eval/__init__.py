"""Evaluation jobs (`vlp eval ...`), each a function the CLI (cli.py) and the nightly suite wrap,
called with a checkpoint and the job's typed config (configs.py):

    retrieval.job.evaluate_retrieval(checkpoint, RetrievalConfig(...), out=, device=) -> dict
    vqa.job.evaluate_vqa(checkpoint, VQAConfig(...), out=, results_out=, device=) -> dict
    caption.job.evaluate_caption(checkpoint, CaptionConfig(...), out=, results_out=, device=)
    classification.zeroshot.evaluate_zeroshot(checkpoint, ZeroShotConfig(...), out=, device=)
    classification.probe.evaluate_linear_probe(checkpoint, LinearProbeConfig(...), out=, device=)
    compositionality.job.evaluate_compositionality(checkpoint, CompositionalityConfig(...), ...)
    nightly.runner.run_nightly(runs_dir, suite=, out_dir=) -> summary dict

Each job reads and checks its data before it loads a checkpoint path, writes its result through
results.write_result, and shows each long step's progress on stderr (vlp.pipeline.progress).
Shared by the jobs: images (image references and decoding) and encode (batched embeddings).
openclip is an OpenCLIP-compatible view of a checkpoint, for CLIP_benchmark's own functions.
Checkpoints are loaded with vlp.pipeline.data.model_loading.load_model.
"""
