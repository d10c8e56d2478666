"""Mutation testing of the core modules with mutmut (docs/testing.md).

    mutate.py run [MODULE ...] [--children N] [--survivors]
                                               mutate the core modules (or the ones named);
                                               --survivors reruns only last run's survivors
    mutate.py collect WORKSPACE MODULE ...     take modules' results from a parallel run's workspace
    mutate.py record                           write survivors.toml and docs/testing.md's table
    mutate.py show [MODULE ...]                list the unrecorded survivors with their diffs
    mutate.py sample [--modules K] [--count N] [--seed S]
                                               CI: N random mutants of K random core modules

`launch_scripts/mutation.sh` runs this file; mutmut works in build/mutation (workspace.py).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import report
import results
from workspace import REPO, WORKSPACE, core_modules, stage


def _mutmut(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=WORKSPACE, check=True)


def run(modules: list[str], children: int, survivors_only: bool) -> None:
    stage(modules)
    names = []
    if survivors_only:  # mutmut reruns a decided mutant only when it is named
        names = [m.name for m in results.load_mutants(modules, results.UNDETECTED)]
        if not names:
            return
    _mutmut("run", "--max-children", str(children), *names)
    print(report.summary(results.scores(results.load_mutants(modules))))


def collect(source: Path, modules: list[str]) -> None:
    """Copy the results of `modules` from another workspace (a parallel run) into this one."""
    for module in modules:
        for suffix in ("", ".meta", ".spans"):
            target = WORKSPACE / "mutants" / "src" / "vlp" / (module + suffix)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / "mutants" / "src" / "vlp" / (module + suffix), target)


def record() -> None:
    """Record the scores and survivors of the core modules run to the end in this workspace,
    then write the table of every recorded module (the others keep their last record)."""
    mutants = results.load_mutants(skip_unrun=True)
    unchecked = {m.module for m in mutants if m.status == "not checked"}
    done = [m for m in core_modules() if any(x.module == m for x in mutants) and m not in unchecked]
    mutants = [m for m in mutants if m.module in done]
    results.write_record(results.scores(mutants), [m for m in mutants if m.status in results.UNDETECTED])
    scores = results.recorded_scores()
    not_run = [m for m in core_modules() if m not in results.recorded_modules()]
    report.write_doc(scores, results.load_record(), not_run)
    print(report.summary(scores))


def show(modules: list[str]) -> None:
    """The survivors survivors.toml does not list, as entries ready to go there."""
    record = results.load_record()
    for mutant in results.load_mutants(modules or None, results.UNDETECTED):
        if mutant.key not in record:
            print(f"# {mutant.name} ({mutant.status})\n{results.entry(mutant, {})}")


def _generate() -> None:
    """Write the staged modules' mutants without running any test (mutmut's first phase)."""
    os.chdir(WORKSPACE)
    sys.path.insert(0, str(WORKSPACE))
    from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants
    from mutmut.mutation.trampoline import set_mutant_under_test

    set_mutant_under_test("mutant_generation")
    copy_src_dir()
    copy_also_copy_files()
    create_mutants(2)
    os.chdir(REPO)


def sample(module_count: int, count: int, seed: str) -> int:
    """Run `count` random mutants of `module_count` random recorded core modules; fail when one
    survives that survivors.toml does not list (a test lost its power, or new code is untested)."""
    rng = random.Random(seed)
    recorded = results.recorded_modules()
    if not recorded:
        raise SystemExit("no core module is recorded in survivors.toml: run `mutation.sh run` and `record`")
    modules = sorted(rng.sample(recorded, min(module_count, len(recorded))))
    print(f"mutation sample (seed {seed}): {', '.join(modules)}", flush=True)
    shutil.rmtree(WORKSPACE / "mutants", ignore_errors=True)  # a sample starts clean, as on CI
    stage(modules)
    _generate()
    names = [m.name for m in results.load_mutants(modules)]
    chosen = sorted(rng.sample(names, min(count, len(names))))
    _mutmut("run", "--max-children", "2", *chosen)
    record = results.load_record()
    outcome = [m for m in results.load_mutants(modules) if m.name in chosen]
    new = [m for m in outcome if m.status in results.UNDETECTED and m.key not in record]
    for mutant in new:
        print(f"survived, not in tests/mutation/survivors.toml: {mutant.name} ({mutant.status})",
              *mutant.change, sep="\n")
    print(f"{len(outcome) - len(new)} of {len(outcome)} sampled mutants killed or recorded")
    return 1 if new else 0


def _head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mutation.sh", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("modules", nargs="*", help="repository paths; default: every core module")
    run_parser.add_argument("--children", type=int, default=2)
    run_parser.add_argument("--survivors", action="store_true",
                            help="rerun only the mutants the last run left alive")
    collect_parser = commands.add_parser("collect")
    collect_parser.add_argument("source", type=Path, help="the other run's MUTATION_WORKSPACE")
    collect_parser.add_argument("modules", nargs="+")
    commands.add_parser("record")
    show_parser = commands.add_parser("show")
    show_parser.add_argument("modules", nargs="*")
    sample_parser = commands.add_parser("sample")
    sample_parser.add_argument("--modules", type=int, default=3)
    sample_parser.add_argument("--count", type=int, default=15)
    sample_parser.add_argument("--seed", default=None, help="default: the checked-out commit")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.modules or list(core_modules()), args.children, args.survivors)
    elif args.command == "collect":
        collect(args.source, args.modules)
    elif args.command == "record":
        record()
    elif args.command == "show":
        show(args.modules)
    else:
        return sample(args.modules, args.count, args.seed or _head())
    return 0


if __name__ == "__main__":
    sys.exit(main())
