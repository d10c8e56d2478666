"""mutmut's verdicts per core module, and the record of the mutants known to survive.

A surviving mutant is recorded in survivors.toml by its function and its changed lines (not by
mutmut's number, which shifts when the function changes), with `equivalent = true` and why when
no test can tell it from the original. Kill rates leave equivalent mutants out.
"""
from __future__ import annotations

import os
import tomllib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from workspace import WORKSPACE, core_modules

SURVIVORS_FILE = Path(__file__).with_name("survivors.toml")
DETECTED = {"killed", "timeout", "segfault", "caught by type check"}
UNDETECTED = {"survived", "no tests", "suspicious"}


@dataclass(frozen=True)
class Mutant:
    name: str  # mutmut's, e.g. vlp.models.losses.x_contrastive_loss__mutmut_3
    module: str  # repository path of its file
    status: str  # mutmut's verdict
    change: tuple[str, ...]  # the diff's removed and added lines

    @property
    def function(self) -> str:
        return self.name.partition("__mutmut_")[0]

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        return self.function, self.change


@contextmanager
def _in_workspace():
    previous = os.getcwd()
    os.chdir(WORKSPACE)
    try:
        yield
    finally:
        os.chdir(previous)


def _changed_lines(diff: str) -> tuple[str, ...]:
    return tuple(line.rstrip() for line in diff.splitlines()
                 if line[:1] in "+-" and not line.startswith(("+++", "---")))


def load_mutants(modules: list[str] | None = None, statuses: set[str] | None = None,
                 skip_unrun: bool = False) -> list[Mutant]:
    """Every mutant of `modules` (all core modules by default) with a verdict in `statuses`.
    A module with no results is an error, or left out with `skip_unrun`."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    mutants = []
    with _in_workspace():
        for module in modules or list(core_modules()):
            path = Path("src/vlp") / module
            data = SourceFileMutationData(path=path)
            data.load()
            if not data.exit_code_by_key:
                if skip_unrun:
                    continue
                raise SystemExit(f"no mutation results for {module}: run `mutation.sh run {module}`")
            for name, exit_code in sorted(data.exit_code_by_key.items()):
                status = status_by_exit_code[exit_code]
                if statuses is not None and status not in statuses:
                    continue
                change = _changed_lines(get_diff_for_mutant(name, path=path)) if status in UNDETECTED else ()
                mutants.append(Mutant(name, module, status, change))
    return mutants


def _load_file() -> dict:
    if not SURVIVORS_FILE.exists():
        return {}
    with open(SURVIVORS_FILE, "rb") as f:
        return tomllib.load(f)


def load_record(recorded: dict | None = None) -> dict[tuple[str, tuple[str, ...]], dict]:
    """survivors.toml (or its `recorded` contents) as {(function, changed lines): entry}."""
    entries = (recorded if recorded is not None else _load_file()).get("mutant", [])
    return {(e["function"], tuple(e["change"])): e for e in entries}


def recorded_modules() -> list[str]:
    """The core modules whose every mutant has a verdict recorded in survivors.toml."""
    return list(_load_file().get("modules", {}))


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_record(scores: list[ModuleScore], survivors: list[Mutant]) -> None:
    """Rewrite survivors.toml with the scores and survivors of the modules run to the end here,
    keeping what was recorded of the other modules and what was said of each mutant."""
    recorded = _load_file()
    previous = load_record(recorded)
    counts = {**recorded.get("modules", {}),
              **{s.module: {"detected": s.killed, "no_tests": s.no_tests} for s in scores}}
    order = list(core_modules())
    lines = ["# Mutants the last full mutation run left alive (written by `bash launch_scripts/mutation.sh",
             "# record`). `equivalent = true` needs a `why`: no input can tell the mutant from the code.",
             "# The others are gaps in the tests; the sampled CI run tolerates only mutants listed here.",
             "# [modules]: each module run to the end, with its detected and never-tested mutants.",
             "[modules]"]
    for module in sorted(counts, key=order.index):
        lines.append(f'"{module}" = {{ detected = {counts[module]["detected"]}, '
                     f'no_tests = {counts[module]["no_tests"]} }}')
    lines.append("")
    for mutant in sorted(survivors, key=lambda m: (m.module, m.name)):
        lines.append(entry(mutant, previous.get(mutant.key, {})))
    # What was said of the mutants of modules not run to the end this time stays.
    rerun = tuple(_prefix(s.module) for s in scores)
    for said in recorded.get("mutant", []):
        if not said["function"].startswith(rerun):
            lines.append(entry(Mutant(said["function"] + "__mutmut_0", "", "", said["change"]), said))
    SURVIVORS_FILE.write_text("\n".join(lines))


def recorded_scores() -> list[ModuleScore]:
    """Each recorded module's score, from survivors.toml alone: its detected and never-tested
    counts, and its listed survivors (equivalent or not)."""
    recorded = _load_file()
    module_scores = {module: ModuleScore(module, killed=c["detected"], no_tests=c["no_tests"])
                     for module, c in recorded.get("modules", {}).items()}
    for said in recorded.get("mutant", []):  # one entry per mutant, twins included
        score = next((s for m, s in module_scores.items()
                      if said["function"].startswith(_prefix(m))), None)
        if score is None:
            raise SystemExit(f"{SURVIVORS_FILE.name} lists a mutant of a module it does not "
                             f"record in [modules]: {said['function']}")
        if said["equivalent"]:
            score.equivalent += 1
        else:
            score.survived += 1
    for score in module_scores.values():
        score.survived -= score.no_tests  # the never-tested are listed among the survivors
    return list(module_scores.values())


def _prefix(module: str) -> str:
    """models/losses.py -> "vlp.models.losses.", the start of its mutants' names."""
    return "vlp." + module.removesuffix(".py").replace("/", ".") + "."


def entry(mutant: Mutant, said: dict) -> str:
    """A survivors.toml entry for `mutant`, keeping what `said` (its previous entry) said."""
    lines = ["[[mutant]]",
             f"function = {_toml_string(mutant.function)}",
             "change = [" + ", ".join(_toml_string(c) for c in mutant.change) + "]",
             f"equivalent = {'true' if said.get('equivalent') else 'false'}"]
    if said.get("why"):
        lines.append(f"why = {_toml_string(said['why'])}")
    return "\n".join(lines) + "\n"


@dataclass
class ModuleScore:
    module: str
    killed: int = 0
    survived: int = 0
    no_tests: int = 0
    equivalent: int = 0

    @property
    def counted(self) -> int:
        return self.killed + self.survived + self.no_tests

    @property
    def kill_rate(self) -> float:
        return self.killed / self.counted if self.counted else 1.0


def scores(mutants: list[Mutant]) -> list[ModuleScore]:
    """Per module: detected, undetected (split into survived / no tests) and equivalent counts."""
    record = load_record()
    by_module = {m: ModuleScore(m) for m in dict.fromkeys(m.module for m in mutants)}
    for mutant in mutants:
        score = by_module[mutant.module]
        if mutant.status in DETECTED:
            score.killed += 1
        elif record.get(mutant.key, {}).get("equivalent"):
            score.equivalent += 1
        elif mutant.status == "no tests":
            score.no_tests += 1
        else:
            score.survived += 1
    return list(by_module.values())


def status_counts(mutants: list[Mutant]) -> Counter:
    return Counter(m.status for m in mutants)

