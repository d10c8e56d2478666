"""Image classification: datasets in ImageFolder and CLIP_benchmark webdataset layouts (data),
metrics with CLIP_benchmark's keys (metrics), zero-shot (zeroshot) and linear-probe (probe) jobs."""
