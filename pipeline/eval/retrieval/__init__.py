"""Zero-shot image-text retrieval: test sets (data), recall@k (recall), the job (job)."""
