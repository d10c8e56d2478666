"""The mutation-testing set-up (tests/mutation/, docs/testing.md) stays consistent with the tree."""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "mutation"))

import report  # noqa: E402
import results  # noqa: E402
import workspace  # noqa: E402


def test_every_core_module_and_guarding_test_file_exists_and_is_not_slow():
    for module, tests in workspace.core_modules().items():
        assert (REPO / module).is_file(), module
        assert tests, f"{module} has no guarding tests"
        for test in tests:
            text = (REPO / test).read_text()
            assert "pytestmark = pytest.mark.slow" not in text, f"{test} is slow: no mutant reaches it"


def test_the_record_names_only_core_modules_and_every_equivalent_says_why():
    with open(results.SURVIVORS_FILE, "rb") as f:
        record = tomllib.load(f)
    core = workspace.core_modules()
    assert set(record["modules"]) <= set(core)
    prefixes = tuple("vlp." + m.removesuffix(".py").replace("/", ".") + "." for m in core)
    for entry in record.get("mutant", []):
        assert entry["function"].startswith(prefixes), entry["function"]
        assert entry["change"], entry
        if entry["equivalent"]:
            assert entry.get("why", "").strip(), f"equivalent without a reason: {entry}"


def test_the_table_counts_equivalents_out_of_the_rate():
    scores = [results.ModuleScore("a.py", killed=9, survived=1, equivalent=5),
              results.ModuleScore("b.py", killed=1, no_tests=1)]
    rows = report.summary(scores).splitlines()
    assert rows[2] == "| a.py | 15 | 9 | 1 | 0 | 5 | 90.0% |"
    assert rows[3] == "| b.py | 2 | 1 | 0 | 1 | 0 | 50.0% |"
    assert rows[4] == "| modules run to the end | 17 | 10 | 1 | 1 | 5 | 83.3% |"


def test_a_survivor_is_known_by_its_function_and_change_not_its_number():
    a = results.Mutant("vlp.m.x_f__mutmut_3", "m.py", "survived", ("-    a", "+    b"))
    b = results.Mutant("vlp.m.x_f__mutmut_7", "m.py", "survived", ("-    a", "+    b"))
    assert a.key == b.key == ("vlp.m.x_f", ("-    a", "+    b"))


def test_the_doc_keeps_the_generated_tables_markers():
    text = report.DOC.read_text()
    assert text.count(report.START) == 1 and text.count(report.END) == 1


def test_a_record_of_one_module_keeps_what_was_recorded_of_the_others(tmp_path, monkeypatch):
    """A fresh workspace that ran one module must not drop the other modules' scores, nor twin
    survivors (two mutants with one change) of either."""
    monkeypatch.setattr(results, "SURVIVORS_FILE", tmp_path / "survivors.toml")
    flops, losses = "models/flops.py", "models/losses.py"
    twin = ("-    a = 1", "+    a = 2")
    untested = ("-    b = 1", "+    b = None")
    results.SURVIVORS_FILE.write_text(
        f'[modules]\n"{flops}" = {{ detected = 7, no_tests = 1 }}\n\n' + "\n".join(
            f'[[mutant]]\nfunction = "vlp.models.flops.x_f"\nchange = {list(change)!r}\n'
            f'equivalent = {flag}\n' + ('why = "same value"\n' if flag == "true" else "")
            for change, flag in ((twin, "true"), (twin, "true"), (untested, "false"))
        ).replace("'", '"'))
    survivor = results.Mutant("vlp.models.losses.x_g__mutmut_4", losses, "survived", twin)
    results.write_record([results.ModuleScore(losses, killed=5)], [survivor, survivor])
    assert results.recorded_modules() == [losses, flops]  # in modules.toml's order
    assert [vars(s) for s in results.recorded_scores()] == [
        dict(module=losses, killed=5, survived=2, no_tests=0, equivalent=0),
        dict(module=flops, killed=7, survived=0, no_tests=1, equivalent=2)]
    assert results.load_record()[("vlp.models.flops.x_f", twin)]["why"] == "same value"


def test_a_survivor_of_a_module_not_recorded_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "SURVIVORS_FILE", tmp_path / "survivors.toml")
    results.SURVIVORS_FILE.write_text(
        '[modules]\n"models/flops.py" = { detected = 7, no_tests = 0 }\n\n[[mutant]]\n'
        'function = "vlp.models.losses.x_f"\nchange = ["-a", "+b"]\nequivalent = false\n')
    with pytest.raises(SystemExit, match="lists a mutant of a module it does not record in "
                                         r"\[modules\]: vlp.models.losses.x_f"):
        results.recorded_scores()
