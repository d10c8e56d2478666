"""The `vlp` command line: one subcommand per stage.

Each stage module exposes `register(subparsers)`, which adds its subcommands and sets
`func(args) -> int | None` on each; the same functions are importable for tests.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module that registers it)
STAGES = [
    ("data", "data_prep.cli"),
    ("train", "pipeline.train_cli"),
    ("export", "pipeline.export_cli"),
    ("eval", "pipeline.eval.cli"),
    ("bench", "pipeline.bench.cli"),
    ("quickstart", "pipeline.quickstart"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for _, module_name in STAGES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
