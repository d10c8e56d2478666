"""Tokenizers: load ours (a WordPiece tokenizer.json from `vlp data tokenizer`) or any local HF
fast tokenizer, and turn texts into fixed-length ids: [CLS] first, a boolean mask (True = real
token), padded or truncated to the model's `max_text_len`.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.transforms import MaskingSpec

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def load_tokenizer(path) -> PreTrainedTokenizerFast:
    """Load our tokenizer (its directory or tokenizer.json) or a local HF tokenizer directory
    (e.g. bert-base-uncased's); pad/unk/cls/sep/mask tokens must all be defined.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"no tokenizer at {path}: train one with `vlp data tokenizer`")
    try:
        if path.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), **SPECIAL_TOKENS)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # the Rust `tokenizers` raises a bare Exception for a foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path} is not a tokenizer ({reason:.200}): give the directory or "
                        "tokenizer.json that `vlp data tokenizer` wrote") from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise UserError(f"{path} holds a slow tokenizer; a fast (tokenizer.json) one is needed")
    missing = [name for name in SPECIAL_TOKENS if getattr(tokenizer, name) is None]
    if missing:
        raise UserError(f"tokenizer at {path} does not define {missing}")
    return tokenizer


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (ids long (B, L), mask bool (B, L)); [CLS] first, padded/truncated to `max_len`."""
    backend = _fixed_length_backend(tokenizer, max_len)
    if backend is None:
        encoded = tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        return encoded["input_ids"].long(), encoded["attention_mask"].bool()
    encodings = backend.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).view(len(texts), max_len)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
    return ids, mask.view(len(texts), max_len)


# Fast tokenizer -> {max_len: Rust tokenizer that truncates and pads to max_len}.
_FIXED_LENGTH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fixed_length_backend(tokenizer, max_len: int):
    """A private copy of a fast tokenizer's Rust backend, set up as `tokenizer(texts,
    padding="max_length", truncation=True, max_length=max_len)` sets it up, minus transformers'
    per-call Python overhead (most of the cost for short captions). None for slow tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None:
        return None
    try:
        cache = _FIXED_LENGTH.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: build each time
        cache = {}
    if max_len not in cache:
        fixed = Tokenizer.from_str(backend.to_str())
        fixed.enable_truncation(max_length=max_len, stride=0, strategy="longest_first",
                                direction=tokenizer.truncation_side)
        fixed.enable_padding(length=max_len, pad_id=tokenizer.pad_token_id,
                             pad_type_id=tokenizer.pad_token_type_id,
                             pad_token=tokenizer.pad_token, direction=tokenizer.padding_side)
        cache[max_len] = fixed
    return cache[max_len]


def masking_spec(tokenizer, probability: float) -> MaskingSpec:
    """BERT masking parameters from a HF tokenizer with [MASK], [CLS], [SEP], [PAD]."""
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise UserError("the tokenizer needs [MASK] and [PAD] tokens for MLM; train it with "
                        "`vlp data tokenizer`")
    return MaskingSpec(mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                       special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
                       probability=probability)


def unknown_token_words(tokenizer, texts: list[str]) -> list[str]:
    """The words (and punctuation) of `texts` that `tokenizer` maps to its unknown token, each
    once, in order of appearance. WordPiece turns a word it cannot build from its pieces (one
    with a character its training texts never held, say) into a single [UNK], so a class name
    in a prompt can vanish without an error."""
    if tokenizer.unk_token_id is None:
        return []
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    unknown = {}  # an ordered set
    for text, encoding in zip(texts, encodings):
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if token_id == tokenizer.unk_token_id:
                unknown.setdefault(text[start:end], None)
    return list(unknown)
