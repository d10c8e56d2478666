"""Edited-caption hard negatives: the editor changes exactly one thing, never to a synonym, and the
loader hands each caption's edit to the model beside it."""
import json
import random

import pytest
import torch
from test_loader import build_tokenizer, loader_for, make_dataset

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.negatives import CaptionEditor, Lexicon, load_lexicon

LEXICON = Lexicon({
    "colour": (("red",), ("blue",), ("grey", "gray")),
    "size": (("small", "little"), ("big", "large")),
    "horizontal": (("left",), ("right",)),
})
CAPTION = "a big red circle on the left and a small gray square on the right"


def changed(a: str, b: str) -> list[tuple[str, str]]:
    return [(x, y) for x, y in zip(a.split(), b.split()) if x != y]


def test_a_replace_puts_a_word_of_another_group_of_the_same_class():
    editor = CaptionEditor(LEXICON, swap_share=0.0)
    index = LEXICON.index
    edits = {editor.edit(CAPTION, random.Random(seed)) for seed in range(200)}
    for edited in edits:
        [(old, new)] = changed(CAPTION, edited)
        assert index[old][0] == index[new][0] and index[old][1] != index[new][1]
    # every word of the lexicon in the caption gets edited, to each other group's words
    assert ("big", "small") in {changed(CAPTION, e)[0] for e in edits}
    assert ("gray", "red") in {changed(CAPTION, e)[0] for e in edits}
    assert not any(changed(CAPTION, e)[0] in {("big", "large"), ("small", "little")} for e in edits)


def test_a_swap_exchanges_two_words_of_one_class_from_different_groups():
    editor = CaptionEditor(LEXICON, swap_share=1.0)
    edits = {editor.edit(CAPTION, random.Random(seed)) for seed in range(100)}
    assert edits == {
        "a small red circle on the left and a big gray square on the right",
        "a big gray circle on the left and a small red square on the right",
        "a big red circle on the right and a small gray square on the left",
    }


def test_class_weights_make_edits_of_a_class_that_much_more_likely():
    """CAPTION has 6 lexicon words, 2 of them colours: uniformly a replace edits a colour 1/3
    of the time; with colour weighted 4 it is 8 / (8 + 4) = 2/3."""
    index = LEXICON.index

    def colour_share(editor):
        edits = [editor.edit(CAPTION, random.Random(seed)) for seed in range(3000)]
        return sum(index[changed(CAPTION, e)[0][0]][0] == "colour" for e in edits) / len(edits)

    assert colour_share(CaptionEditor(LEXICON, swap_share=0.0)) == pytest.approx(1 / 3, abs=0.03)
    weighted = CaptionEditor(LEXICON, swap_share=0.0, class_weights={"colour": 4})
    assert colour_share(weighted) == pytest.approx(2 / 3, abs=0.03)
    with pytest.raises(UserError, match=r"edit class weights name \['shape'\]"):
        CaptionEditor(LEXICON, class_weights={"shape": 2})


def test_a_caption_without_lexicon_words_has_no_edit_and_one_class_swaps_nothing():
    editor = CaptionEditor(LEXICON, swap_share=1.0)
    assert editor.edit("two shapes on a dark background", random.Random(0)) is None
    # both words in one group: nothing to swap, so it replaces one of them
    assert changed("a red and a red", editor.edit("a red and a red", random.Random(0)))


def test_bad_lexicons_are_refused_with_the_reason(tmp_path):
    with pytest.raises(UserError, match="at least 2"):
        Lexicon({"colour": (("red",),)})
    with pytest.raises(UserError, match="'red' is in 'colour' and 'size'"):
        Lexicon({"colour": (("red",), ("blue",)), "size": (("red",), ("big",))})
    path = tmp_path / "lexicon.json"
    path.write_text(json.dumps({"colour": ["red", "blue"]}))
    with pytest.raises(UserError, match="synonym lists"):
        load_lexicon(path)


def test_the_loader_gives_each_caption_its_edit(tmp_path):
    shards = make_dataset(tmp_path / "shards", shards=2, per_shard=8)
    lexicon = tmp_path / "lexicon.json"
    lexicon.write_text(json.dumps({"colour": [["red"], ["blue"], ["green"]],
                                   "side": [["left"], ["right"]]}))
    tokenizer = build_tokenizer()
    batch = next(iter(loader_for(shards, tokenizer, lexicon=str(lexicon), edited_negatives=True)))
    texts = tokenizer.batch_decode(batch["text_ids"], skip_special_tokens=True)
    edits = tokenizer.batch_decode(batch["neg_ids"], skip_special_tokens=True)
    for text, edit, has in zip(texts, edits, batch["has_neg"].tolist()):
        has_word = any(w in text.split() for w in ("red", "blue", "green", "left", "right"))
        assert has == has_word
        assert (len(changed(text, edit)) in (1, 2)) if has else edit == text
    assert batch["neg_mask"].dtype == torch.bool and batch["has_neg"].any()
    again = next(iter(loader_for(shards, tokenizer, lexicon=str(lexicon), edited_negatives=True)))
    assert torch.equal(again["neg_ids"], batch["neg_ids"])  # seeded by position: resumable
    plain = next(iter(loader_for(shards, tokenizer)))
    assert "neg_ids" not in plain



COLOURS = Lexicon({"colour": (("red",), ("blue",))})


def test_a_two_group_class_replaces_each_word_by_the_other_keeping_the_rest_verbatim():
    editor = CaptionEditor(COLOURS, swap_share=0.0)
    assert editor.edit("A Red ball, reddish-RED.", random.Random(0)) in {
        "A blue ball, reddish-RED.", "A Red ball, reddish-blue."}
    assert {editor.edit("Red!", random.Random(seed)) for seed in range(20)} == {"blue!"}
    assert editor.edit("reddish bluey credit", random.Random(0)) is None  # whole words only


def test_a_swap_keeps_each_word_where_the_other_was():
    editor = CaptionEditor(COLOURS, swap_share=1.0)
    assert editor.edit("the blue cube left of the red one", random.Random(0)) == (
        "the red cube left of the blue one")


def test_swap_share_sets_how_often_a_caption_that_can_swap_is_swapped():
    editor = CaptionEditor(COLOURS, swap_share=0.25)
    caption = "a red cube and a blue ball"
    swapped = sum(editor.edit(caption, random.Random(seed)) == "a blue cube and a red ball"
                  for seed in range(2000))
    assert swapped / 2000 == pytest.approx(0.25, abs=0.03)


def test_equal_class_weights_draw_as_no_weights_and_a_zero_weight_never_edits_its_class():
    plain = CaptionEditor(LEXICON, swap_share=0.3)
    ones = CaptionEditor(LEXICON, swap_share=0.3, class_weights={"colour": 1.0, "size": 1})
    for seed in range(50):
        assert plain.edit(CAPTION, random.Random(seed)) == ones.edit(CAPTION, random.Random(seed))
    index = LEXICON.index
    for swap_share in (0.0, 1.0):
        no_size = CaptionEditor(LEXICON, swap_share=swap_share, class_weights={"size": 0})
        for seed in range(100):
            words = changed(CAPTION, no_size.edit(CAPTION, random.Random(seed)))
            assert all(index[old][0] != "size" for old, _ in words)
    only_size = CaptionEditor(LEXICON, swap_share=1.0, class_weights={"colour": 0, "horizontal": 0})
    assert only_size.edit(CAPTION, random.Random(0)) == (
        "a small red circle on the left and a big gray square on the right")


def test_the_lexicon_index_names_each_words_class_and_group():
    assert LEXICON.index == {"red": ("colour", 0), "blue": ("colour", 1), "grey": ("colour", 2),
                             "gray": ("colour", 2), "small": ("size", 0), "little": ("size", 0),
                             "big": ("size", 1), "large": ("size", 1), "left": ("horizontal", 0),
                             "right": ("horizontal", 1)}


@pytest.mark.parametrize("groups, message", [
    ({"colour": (("red",), ())}, r"lexicon class 'colour' needs at least 2 non-empty synonym "
                                 r"groups, got \[\['red'\], \[\]\]"),
    ({"colour": ()}, "at least 2"),
    ({"colour": (("Red",), ("blue",))}, r"lexicon word 'Red' \(colour\) must be one lower-case"),
    ({"colour": (("light blue",), ("red",))}, "'light blue'"),
    ({"colour": (("red2",), ("blue",))}, "'red2'"),
    ({"colour": (("red", "red"), ("blue",))}, "'red' is in 'colour' and 'colour'"),
])
def test_malformed_lexicons_are_refused(groups, message):
    with pytest.raises(UserError, match=message):
        Lexicon(groups)


def test_two_groups_of_one_word_each_make_a_lexicon():
    assert COLOURS.index == {"red": ("colour", 0), "blue": ("colour", 1)}


def test_a_lexicon_file_is_read_as_tuples(tmp_path):
    path = tmp_path / "lexicon.json"
    path.write_text(json.dumps({"colour": [["red"], ["grey", "gray"]],
                                "side": [["left"], ["right"]]}))
    assert load_lexicon(path) == Lexicon({"colour": (("red",), ("grey", "gray")),
                                          "side": (("left",), ("right",))})
    path.write_text(json.dumps({"colour": [["red"], [7]]}))
    with pytest.raises(UserError, match="lexicon word '7'"):
        load_lexicon(path)


@pytest.mark.parametrize("content", [None, "{not json", '[["red"], ["blue"]]',
                                     '{"colour": "red"}', '{"colour": [["red"], "blue"]}'])
def test_an_unreadable_or_misshapen_lexicon_file_is_one_user_error(tmp_path, content):
    path = tmp_path / "lexicon.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=rf"{path}"):
        load_lexicon(path)


def test_by_default_half_the_captions_that_can_swap_are_swapped():
    editor = CaptionEditor(COLOURS)
    caption = "a red cube and a blue ball"
    swapped = sum(editor.edit(caption, random.Random(seed)) == "a blue cube and a red ball"
                  for seed in range(2000))
    assert swapped / 2000 == pytest.approx(0.5, abs=0.03)


def test_a_misshapen_lexicon_file_is_shown_the_expected_shape(tmp_path):
    path = tmp_path / "lexicon.json"
    path.write_text('{"colour": "red"}')
    with pytest.raises(UserError) as raised:
        load_lexicon(path)
    assert str(raised.value) == (
        f"{path}: a lexicon is a JSON object of word classes, each a list of synonym lists, "
        'e.g. {"colour": [["red"], ["grey", "gray"]]}')
