"""The neutral data layer: what lives on disk and how it is read, shared by every stage.

    errors         UserError (bad input: one line, exit 2), StageFailed, BadData (skipped and
                   counted), warn
    files          JSON inputs read with errors naming the field; files written whole or not at all
    tar            webdataset tar shards -> raw samples, damage detected and counted
    sources        shard URLs (local, file://, http(s)://, fsspec stores): expand, check, open
    object_store   fsspec object storage (s3://, gs://): streamed and ranged reads
    manifest       manifest.json / sizes.json beside the shards: counts, names, patterns
    transforms     image decode/resize/normalise, caption decoding, MLM masking
    tokenizer      load a tokenizer and turn texts into fixed-length ids
    negatives      edited captions (the world's lexicon) as hard negatives
    loader         the training loader (stream.py: one worker's stream) with an exact position
    checkpoints    training tags on disk: layout, find, validate, fingerprint, safe unpickling
    model_loading  any checkpoint (export, ONNX export, DeepSpeed tag) loaded as a model

It imports only `vlp.models` below it; data_prep, training, evaluation and deployment build on it.
"""
