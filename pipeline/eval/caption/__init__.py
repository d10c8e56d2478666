"""Image captioning: Karpathy splits (data), the COCO caption metrics (metric), the captioning
fine-tune and decoding (captioner), the baselines (baselines), the job (job)."""
