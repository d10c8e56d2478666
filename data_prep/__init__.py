"""Data preparation: synthetic world, img2dataset download, shard index, tokenizer."""
