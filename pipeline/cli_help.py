"""Help texts every `vlp` command shares: each argument described with its default, and an
example command line at the end of each command's help; and the argument types for counts
(`positive_int`, `nonnegative_int`), so `--batch-size 0` is argparse's one error line, not a
traceback after the model has loaded.

A stage module builds its commands with `add_command`, so a new command gets the same help
layout; tests/test_cli_help.py checks that every argument of every command has a help text and
every command an example.
"""
from __future__ import annotations

import argparse
import contextlib

EXAMPLES_HEADINGS = ("example:", "examples:")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to an argument's help when it has a default worth showing (not
    None, not a flag's False, not already in the text), and keeps the examples' line breaks."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLES_HEADINGS):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unshown = action.default is None or action.default is False or action.default == []
        if unshown or action.default == argparse.SUPPRESS or "(default" in text:
            return text
        return super()._get_help_string(action)


def examples_epilog(examples: list[str]) -> str:
    """The `example:` block ending a command's help."""
    heading = EXAMPLES_HEADINGS[len(examples) > 1]
    return heading + "\n" + "\n".join(f"  {line}" for line in examples)


def add_command(subparsers, name: str, help: str, examples: list[str],
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand with the shared formatter, `help` as its description and an example epilog."""
    return subparsers.add_parser(name, help=help, description=description or help,
                                 epilog=examples_epilog(examples), formatter_class=HelpFormatter)


def _int_at_least(least: int, text: str) -> int:
    """`text` as an integer >= `least`; else argparse's error, which names the argument."""
    with contextlib.suppress(ValueError):
        if int(text) >= least:
            return int(text)
    raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")


def positive_int(text: str) -> int:
    """argparse `type=` for a count that must be >= 1 (a batch size, a chunk)."""
    return _int_at_least(1, text)


def nonnegative_int(text: str) -> int:
    """argparse `type=` for a count where 0 means off (e.g. --rerank-k)."""
    return _int_at_least(0, text)
