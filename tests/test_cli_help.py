"""Every `vlp` command teaches its use: each argument described with its default, an example."""
from __future__ import annotations

import argparse

import pytest

from vlp.pipeline.cli import build_parser
from vlp.pipeline.cli_help import EXAMPLES_HEADINGS, HelpFormatter


def leaf_commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(words, parser) of every command that runs something, e.g. (('data', 'index'), ...)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield words, parser
        return
    for name, sub in groups[0].choices.items():
        yield from leaf_commands(sub, (*words, name))


COMMANDS = list(leaf_commands(build_parser()))


def test_the_walk_finds_every_stage():
    found = {" ".join(words) for words, _ in COMMANDS}
    assert {"data download", "data index", "train", "export", "eval vqa", "eval nightly",
            "bench loader", "quickstart"} <= found


@pytest.mark.parametrize("words,parser", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_every_argument_has_help_and_shows_its_default(words, parser):
    assert issubclass(parser.formatter_class, HelpFormatter)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"vlp {' '.join(words)} {name} has no help"
        # SUPPRESS: an evaluation job's option, whose default its config holds (and its help
        # shows, checked in test_eval_configs.py)
        hidden = action.default in (None, False, [], argparse.SUPPRESS)
        if not hidden:
            assert "default" in formatter._get_help_string(action), \
                f"vlp {' '.join(words)} {name} hides its default {action.default!r}"


@pytest.mark.parametrize("words,parser", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_every_command_ends_its_help_with_an_example_of_itself(words, parser):
    assert parser.epilog and parser.epilog.startswith(EXAMPLES_HEADINGS)
    examples = parser.epilog.splitlines()[1:]
    assert examples and all(line.strip().startswith(f"vlp {' '.join(words)}")
                            for line in examples)
    assert parser.epilog.splitlines()[1] in parser.format_help()  # line breaks kept


def test_img2dataset_spellings_are_aliases_of_download_options():
    args = build_parser().parse_args([
        "data", "download", "--url_list", "u.parquet", "--output_folder", "s",
        "--thread_count", "64", "--processes_count", "3", "--number_sample_per_shard", "10000",
        "--resize_mode", "border", "--image_size", "224"])
    assert (args.url_list, args.out, args.threads, args.processes, args.samples_per_shard,
            args.resize_mode, args.image_size) == ("u.parquet", "s", 64, 3, 10000, "border", 224)
