"""The caption tokenizer: trained on shard captions, loadable by transformers, BERT-style."""
from __future__ import annotations

import copy
import json
import re
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlp.data_prep.tokenizer import sample_shard_captions, train_tokenizer
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.tokenizer import (
    load_tokenizer,
    masking_spec,
    tokenize,
    unknown_token_words,
)
from vlp.pipeline.data.transforms import MaskingSpec


def test_tokenizer_loads_with_transformers_and_wraps_text_in_cls_sep(tokenizer_dir):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id] == [0, 1]
    assert tokenizer.convert_ids_to_tokens([2, 3, 4]) == ["[CLS]", "[SEP]", "[MASK]"]
    tokens = tokenizer.tokenize("A BIG Red Circle in the top left")
    assert tokens == ["a", "big", "red", "circle", "in", "the", "top", "left"]
    ids = tokenizer("how many shapes are there?")["input_ids"]  # a VQA question word too
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("which", ["directory", "tokenizer.json"])
def test_load_tokenizer_sets_every_special_token(tokenizer_dir, which):
    path = tokenizer_dir if which == "directory" else tokenizer_dir / "tokenizer.json"
    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.mask_token == "[MASK]"
    assert tokenizer("a red square")["input_ids"][0] == tokenizer.cls_token_id


def test_load_tokenizer_accepts_a_bert_vocabulary_directory(tokenizer_dir, tmp_path):
    vocab = load_tokenizer(tokenizer_dir).get_vocab()
    (tmp_path / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    bert = load_tokenizer(tmp_path)
    ours = load_tokenizer(tokenizer_dir)
    assert bert("A red square")["input_ids"] == ours("a red square")["input_ids"]


def test_a_tokenizer_without_special_tokens_is_refused(tmp_path):
    train_tokenizer(["a red square"], tmp_path, 50)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "mask_token": None}))
    with pytest.raises(ValueError, match="mask_token"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name, content", [
    ("tokenizer.json", "a caption, not JSON"),
    ("tokenizer.json", json.dumps({"model": {"type": "WordPiece"}})),  # JSON, not a tokenizer
    ("captions.txt", "a red square\n"),
])
@pytest.mark.parametrize("as_dir", [False, True])
def test_a_file_that_is_not_a_tokenizer_is_one_line(tmp_path, name, content, as_dir):
    """The tokenizers library raised a bare Exception (or transformers a KeyError) from deep
    inside: a traceback from `vlp train --dry-run` instead of the file named."""
    (tmp_path / name).write_text(content)
    given = tmp_path if as_dir else tmp_path / name
    with pytest.raises(UserError, match=rf"^{re.escape(str(given))} is not a tokenizer \(.+\): "
                                        "give the directory or tokenizer.json"):
        load_tokenizer(given)


def test_the_reason_is_the_first_line_of_the_error_or_its_type(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("not JSON")
    with pytest.raises(UserError) as refused:
        load_tokenizer(tmp_path / "tokenizer.json")
    assert str(refused.value) == (f"{tmp_path / 'tokenizer.json'} is not a tokenizer (expected "
                                  "ident at line 1 column 2): give the directory or "
                                  "tokenizer.json that `vlp data tokenizer` wrote")

    def fail(*args, **kwargs):
        raise ValueError()  # an error without a message

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path))} is not a tokenizer "
                                        r"\(ValueError\): "):
        load_tokenizer(tmp_path)


def test_a_slow_tokenizer_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: object())
    with pytest.raises(UserError) as refused:
        load_tokenizer(tmp_path)
    assert str(refused.value) == (f"{tmp_path} holds a slow tokenizer; a fast (tokenizer.json) "
                                  "one is needed")


def test_training_on_no_text_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([], tmp_path, 100)


def test_a_sample_larger_than_the_shards_holds_every_caption(shard_dir):
    counts = Counter()
    captions = sample_shard_captions(shard_dir, 1000, counts)
    assert len(captions) == len(set(captions)) == counts["captions"] == 160
    assert set(counts) == {"captions", "sampled"}


def test_a_small_sample_reads_a_bounded_number_of_shards(shard_dir):
    """10 captions are drawn from the first 40 read: two of the five 32-caption shards."""
    counts = Counter()
    sample = sample_shard_captions(shard_dir, 10, counts, seed=1)
    assert counts["captions"] == 64 and len(sample) == counts["sampled"] == 10
    assert set(sample) <= set(sample_shard_captions(shard_dir, 1000))
    assert sample == sample_shard_captions(shard_dir, 10, seed=1)
    assert sample != sample_shard_captions(shard_dir, 10, seed=2)


def test_tokenizer_command(world_dir, shard_dir, tmp_path, capsys, vlp_data):
    questions = world_dir / "vqa/v2_OpenEnded_synth_train_questions.json"
    vlp_data(
        "tokenizer", "--shards", shard_dir, "--out", tmp_path, "--vocab-size", 300,
        "--extra-text", questions,
    )  # fmt: skip
    assert "captions: 160" in capsys.readouterr().out
    assert load_tokenizer(tmp_path).tokenize("what colour is the diamond?")[-1] == "?"


def test_a_vocabulary_much_smaller_than_asked_for_is_one_warning(tmp_path, capsys):
    texts = ["a red square", "a blue circle above a red square"] * 10
    train_tokenizer(texts, tmp_path / "asked_8000", 8000)
    size = len(load_tokenizer(tmp_path / "asked_8000"))
    assert capsys.readouterr().err == (
        f"warning: the tokenizer has {size} tokens, not the 8000 asked for: its 20 training "
        "texts hold no more distinct words and word pieces (a small corpus, or one of few "
        "distinct words); words it never saw become [UNK]\n")
    train_tokenizer(texts, tmp_path / "asked_what_it_holds", size)
    assert len(load_tokenizer(tmp_path / "asked_what_it_holds")) == size
    assert capsys.readouterr().err == ""


def test_unknown_token_words_names_what_becomes_unk(tmp_path):
    """Trained on words without p, h, o, t, f, z: a zero-shot prompt loses all but its article."""
    train_tokenizer(["a red square", "a blue circle"], tmp_path, 100)
    tokenizer = load_tokenizer(tmp_path)
    prompts = ["a photo of a zebra.", "A RED square", "a photo of a circle."]
    assert unknown_token_words(tokenizer, prompts) == ["photo", "of", "zebra", "."]
    assert tokenizer.tokenize(prompts[0]) == ["a"] + ["[UNK]"] * 2 + ["a"] + ["[UNK]"] * 2
    assert unknown_token_words(tokenizer, ["a blue square", ""]) == []


TEXTS = ["a red square", "a big blue circle left of a small red square", "", "red"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Ours ([PAD] = 0), and a BERT vocabulary directory of the same words whose [PAD] is last."""
    path = tmp_path_factory.mktemp("small")
    train_tokenizer(["a big blue circle left of a small red square"] * 3, path / "ours", 60)
    ours = load_tokenizer(path / "ours")
    vocab = ours.get_vocab()
    words = [w for w in sorted(vocab, key=vocab.get) if w != "[PAD]"] + ["[PAD]"]
    (path / "bert").mkdir()
    (path / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    (path / "bert" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    bert = load_tokenizer(path / "bert")
    assert ours.pad_token_id == 0 and bert.pad_token_id == len(words) - 1
    return {"ours": ours, "bert": bert}


@pytest.mark.parametrize("which", ["ours", "bert"])
@pytest.mark.parametrize("padding_side, truncation_side", [("right", "right"), ("left", "left")])
@pytest.mark.parametrize("max_len", [3, 12])
def test_fixed_length_ids_are_what_transformers_pads_and_truncates_to(
        small, which, padding_side, truncation_side, max_len):
    tokenizer = copy.deepcopy(small[which])
    tokenizer.padding_side, tokenizer.truncation_side = padding_side, truncation_side
    ids, mask = tokenize(tokenizer, TEXTS, max_len)
    expected = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=max_len,
                         return_tensors="pt")
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (len(TEXTS), max_len)
    assert torch.equal(ids, expected["input_ids"])
    assert torch.equal(mask, expected["attention_mask"].bool())


def test_one_tokenizer_gives_each_length_asked_for(small):
    tokenizer = small["ours"]
    for max_len in (4, 7, 4):
        ids, mask = tokenize(tokenizer, TEXTS, max_len)
        assert ids.shape == (4, max_len) and ids[0, 0] == tokenizer.cls_token_id
        assert mask.sum(dim=1).tolist() == [min(n, max_len) for n in (5, 11, 2, 3)]


class Unreferenceable:
    """A tokenizer wrapper that cannot be weakly referenced (or hides its Rust backend)."""

    __slots__ = ("_tokenizer", "_hide_backend")

    def __init__(self, tokenizer, hide_backend=False):
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_hide_backend", hide_backend)

    def __getattr__(self, name):
        if name == "backend_tokenizer" and self._hide_backend:
            raise AttributeError(name)
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


@pytest.mark.parametrize("hide_backend", [False, True])
def test_tokenizers_without_a_weak_reference_or_a_backend_tokenize_alike(small, hide_backend):
    tokenizer = small["bert"]
    ids, mask = tokenize(Unreferenceable(tokenizer, hide_backend), TEXTS, 6)
    expected_ids, expected_mask = tokenize(tokenizer, TEXTS, 6)
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    assert ids.dtype == torch.long and mask.dtype == torch.bool


def test_masking_spec_comes_from_the_tokenizer(small):
    tokenizer = small["bert"]
    spec = masking_spec(tokenizer, 0.25)
    assert spec == MaskingSpec(mask_token_id=tokenizer.convert_tokens_to_ids("[MASK]"),
                               vocab_size=len(tokenizer), probability=0.25,
                               special_ids=tuple(sorted(tokenizer.all_special_ids)))
    assert len(spec.special_ids) == 5 and tokenizer.pad_token_id in spec.special_ids


@pytest.mark.parametrize("token", ["mask_token", "pad_token"])
def test_mlm_needs_mask_and_pad_tokens(small, token):
    tokenizer = copy.deepcopy(small["ours"])
    setattr(tokenizer, token, None)
    with pytest.raises(UserError) as refused:
        masking_spec(tokenizer, 0.15)
    assert str(refused.value) == ("the tokenizer needs [MASK] and [PAD] tokens for MLM; train it "
                                  "with `vlp data tokenizer`")


def test_without_an_unknown_token_no_word_is_unknown(small):
    tokenizer = copy.deepcopy(small["ours"])
    assert unknown_token_words(tokenizer, ["a zebra"]) == ["zebra"]
    tokenizer.unk_token = None
    assert unknown_token_words(tokenizer, ["a zebra"]) == []


def test_a_missing_tokenizer_says_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match=rf"^no tokenizer at {tmp_path / 'nope'}: train one "
                                        "with `vlp data tokenizer`$"):
        load_tokenizer(tmp_path / "nope")
