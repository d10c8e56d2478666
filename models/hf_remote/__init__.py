"""Modelling code that a vlp export carries for `transformers` (copied into every float export by
vlp.models.interop). It imports torch and transformers only, so it runs where vlp is not
installed: `AutoModel.from_pretrained(export_dir, trust_remote_code=True)`."""
