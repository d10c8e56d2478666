"""Train a lowercase WordPiece tokenizer (BERT-style [CLS] ... [SEP]) on a bounded sample of the
shard captions and on VQA questions; `vlp.pipeline.data.tokenizer.load_tokenizer` loads it.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from vlp.pipeline.data.errors import BadData, UserError, warn
from vlp.pipeline.data.tar import SkipCounter, iter_shard, list_shards
from vlp.pipeline.data.tokenizer import SPECIAL_TOKENS
from vlp.pipeline.data.transforms import decode_caption
from vlp.pipeline.progress import tracked

SAMPLE_SIZE = 1_000_000  # captions the tokenizer is trained on, at most
READ_FACTOR = 4  # the sample is drawn from the first READ_FACTOR x SAMPLE_SIZE captions read


def _shard_captions(tar: Path, counts: Counter) -> Iterator[str]:
    """The usable captions of one shard; count the rest (and a damaged tar) in `counts`."""
    skipped = SkipCounter()  # repeated keys, skipped as the loader skips them
    try:
        for _, members in iter_shard(tar, skipped):
            try:
                caption = decode_caption(members.get("txt"))
            except BadData as bad:
                counts[bad.kind] += 1
                continue
            counts["captions"] += 1
            yield caption
    except BadData:  # a damaged shard; the captions before the damage were used
        counts["corrupt_shards"] += 1
    counts.update(skipped.counts)


def sample_shard_captions(shard_dir, sample_size: int = SAMPLE_SIZE, counts: Counter | None = None,
                          seed: int = 0) -> list[str]:
    """A uniform sample of up to `sample_size` usable captions (reservoir sampling) of the
    shards, read in a seeded random order until READ_FACTOR x `sample_size` captions have been
    read: memory and reading are bounded by the sample, not the dataset. Counts go to `counts`
    ("captions": read, "sampled": kept, and the skipped ones by kind)."""
    counts = Counter() if counts is None else counts
    rng = random.Random(seed)
    shards = list_shards(shard_dir)
    rng.shuffle(shards)
    sample: list[str] = []
    for tar in tracked(shards, "sample captions", "shard"):
        for caption in _shard_captions(tar, counts):
            seen = counts["captions"]  # this caption is the seen-th
            if len(sample) < sample_size:
                sample.append(caption)
            elif (slot := rng.randrange(seen)) < sample_size:
                sample[slot] = caption
        if counts["captions"] >= READ_FACTOR * sample_size:
            break
    counts["sampled"] = len(sample)
    return sample


def iter_vqa_questions(questions_json) -> Iterator[str]:
    """The question texts of a VQAv2 questions file."""
    with open(questions_json) as f:
        for record in json.load(f)["questions"]:
            yield record["question"]


def train_tokenizer(texts: Iterable[str], out_dir, vocab_size: int) -> Path:
    """Train WordPiece on `texts`; save tokenizer.json and the transformers config files in
    `out_dir`; return the tokenizer.json path. [PAD] is id 0, then [UNK] [CLS] [SEP] [MASK].
    A vocabulary under half the size asked for is warned about: the texts held no more.
    """
    read = Counter()

    def counted(texts):
        for text in texts:
            read["texts"] += 1
            yield text

    tokenizer = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False
    )
    tokenizer.train_from_iterator(counted(texts), trainer=trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise UserError("no text to train the tokenizer on")
    if tokenizer.get_vocab_size() < vocab_size / 2:
        warn(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, not the {vocab_size} "
             f"asked for: its {read['texts']} training texts hold no more distinct words "
             "and word pieces (a small corpus, or one of few distinct words); words it never saw "
             "become [UNK]")
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
