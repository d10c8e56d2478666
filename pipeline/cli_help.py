"""Help texts every `vlp` command shares: each argument described with its default, and an
example command line at the end of each command's help.

A stage module builds its commands with `add_command`, so a new command gets the same help
layout; tests/test_cli_help.py checks that every argument of every command has a help text and
every command an example.
"""
from __future__ import annotations

import argparse

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
