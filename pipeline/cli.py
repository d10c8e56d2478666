"""The `vlp` command line: one subcommand per stage.

Each stage module exposes `register(subparsers)`, which adds its subcommands and sets
`func(args) -> int | None` on each; the same functions are importable for tests. Stage modules
are imported by name here, and each imports its heavy dependencies inside the command that needs
them, so `vlp --help` stays fast.

One help layout for every command: stage modules build their commands with
`vlp.pipeline.cli_help.add_command` (each argument's default shown, an example per command).
One error convention for every command: bad input raises UserError, printed as one line,
`vlp <command>: error: <message>`, on stderr, with exit status 2 and no traceback; a stage that
failed (a training launch inside the quickstart) raises StageFailed, printed the same way, exit
status 1.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from vlp.pipeline.data.errors import StageFailed, UserError, error_line

# (subcommand, module that registers it)
STAGES = [
    ("data", "vlp.data_prep.cli"),
    ("train", "vlp.pipeline.train.launch"),
    ("export", "vlp.pipeline.deploy.export"),
    ("deploy", "vlp.pipeline.deploy.cli"),
    ("eval", "vlp.pipeline.eval.cli"),
    ("bench", "vlp.pipeline.bench.cli"),
    ("quickstart", "vlp.pipeline.quickstart"),
    ("doctor", "vlp.pipeline.doctor"),
    ("scripts", "vlp.pipeline.scripts"),
]


def package_version() -> str:
    try:
        return version("vlp")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vlp {package_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for _, module_name in STAGES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """'data download', 'eval vqa', 'train': the words the user typed to pick the command."""
    words = [args.command]
    for attr in ("data_command", "eval_command", "deploy_command", "bench", "scripts_command"):
        if getattr(args, attr, None):
            words.append(getattr(args, attr))
    return " ".join(words)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command under the one error convention."""
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(error_line(command_name(args), exc), file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(error_line(command_name(args), exc), file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    # At exit, skip the collector's last walk over torch's and DeepSpeed's objects (1-6 s per
    # command); the process's memory goes back to the OS anyway.
    atexit.register(gc.freeze)
    if not sys.stderr.isatty():
        # In a log file tqdm's bars (img2dataset's, DeepSpeed's) become run-on lines joined by
        # '\r'; the commands print whole progress lines of their own (pipeline/progress.py).
        os.environ.setdefault("TQDM_DISABLE", "1")
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
