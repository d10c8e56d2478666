"""VQA: VQAv2 files (data), the official accuracy (metric), answer vocabulary and fine-tune (finetune), the job (job)."""
