"""Evaluation jobs: zero-shot retrieval, VQA, nightly benchmark (`vlp eval ...`).

Entry points (importable; the CLI in cli.py wraps them):
    retrieval.evaluate_retrieval(checkpoint, karpathy_json=|shards=, ...) -> dict
    vqa.evaluate_vqa(checkpoint, vqa_dir=, ...) -> dict
    nightly.run_nightly(runs_dir, suite=, out_dir=) -> summary dict
    checkpoint.load_model_for_eval(path) -> (model, tokenizer, info)
    recall.retrieval_recalls(image_emb, text_emb, text_to_image) -> recall@k dict

One concern per module: checkpoint (loading), retrieval_data / vqa_data (test sets), images and
encode (model inputs and embeddings), recall and vqa_metric (the metrics), vqa_finetune (answer
vocabulary and training), suite / nightly / report (the nightly job), files (errors and atomic
writes).
"""
