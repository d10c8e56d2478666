"""Train a lowercase WordPiece tokenizer (BERT-style [CLS] ... [SEP]) on shard captions, and load
it, or any local HF tokenizer directory, as a transformers PreTrainedTokenizerFast.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_prep.shards import ShardReadError, iter_samples, list_shards
from pipeline.data_tar import SkipCounter
from pipeline.transforms import BadSample, decode_caption

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def iter_shard_captions(shard_dir, counts: Counter | None = None) -> Iterator[str]:
    """Yield every usable caption in the shards; count the rest (and damaged tars) in `counts`."""
    counts = Counter() if counts is None else counts
    for tar in tqdm(list_shards(shard_dir), desc="read captions", unit="shard"):
        skipped = SkipCounter()  # repeated keys, skipped as the loader skips them
        try:
            for _, members in iter_samples(tar, skipped):
                try:
                    yield decode_caption(members.get("txt"))
                    counts["captions"] += 1
                except BadSample as bad:
                    counts[bad.kind] += 1
        except ShardReadError:
            counts["corrupt_shards"] += 1
        counts.update(skipped.counts)


def iter_vqa_questions(questions_json) -> Iterator[str]:
    """The question texts of a VQAv2 questions file."""
    with open(questions_json) as f:
        for record in json.load(f)["questions"]:
            yield record["question"]


def train_tokenizer(texts: Iterable[str], out_dir, vocab_size: int) -> Path:
    """Train WordPiece on `texts`; save tokenizer.json and the transformers config files in
    `out_dir`; return the tokenizer.json path. [PAD] is id 0, then [UNK] [CLS] [SEP] [MASK].
    """
    tokenizer = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise ValueError("no text to train the tokenizer on")
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS).save_pretrained(out)
    return out / "tokenizer.json"


def load_tokenizer(path) -> PreTrainedTokenizerFast:
    """Load our tokenizer (its directory or tokenizer.json) or a local HF tokenizer directory
    (e.g. bert-base-uncased's); pad/unk/cls/sep/mask tokens must all be defined.
    """
    path = Path(path)
    if path.is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), **SPECIAL_TOKENS)
    elif path.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    else:
        raise FileNotFoundError(f"no tokenizer at {path}")
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"{path} holds a slow tokenizer; a fast (tokenizer.json) one is needed")
    missing = [name for name in SPECIAL_TOKENS if getattr(tokenizer, name) is None]
    if missing:
        raise ValueError(f"tokenizer at {path} does not define {missing}")
    return tokenizer
