"""Pretraining with DeepSpeed ZeRO-3, one concern per module (torchtitan's split):

    config        typed recipe + overrides          launch       `vlp train` -> deepspeed launcher
    trainer       set-up and the loop               step         accumulation + finite check
    checkpointer  save interval, publish, prune     metrics      logging window, TensorBoard, MFU
    optim         AdamW groups + warmup/cosine      faults       fault injection for the tests
    rng           RNG states as JSON

Process-group and device set-up, shared with evaluation, is vlp.pipeline.distributed.
`python -m vlp.pipeline.train --recipe R --set k=v ...` (what the launcher starts on every rank).
"""
