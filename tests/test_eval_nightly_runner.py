"""The nightly runner's bookkeeping with stub benchmarks whose results are known and a loader that
records what it loads: which checkpoints are found, the rows each result becomes, which failures
are tried again and how often, what a rewritten tag does, the TensorBoard scalars read back, the
lock and the progress lines. The nightly job on real checkpoints and jobs is in
tests/test_eval_nightly.py."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlp.pipeline.data.checkpoints import checkpoint_fingerprint
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.nightly import runner
from vlp.pipeline.eval.nightly.runner import (
    CheckpointRef,
    baseline_value,
    caption_examples,
    discover_checkpoints,
    nightly_lock,
    read_results,
    run_nightly,
)
from vlp.pipeline.eval.nightly.regressions import flag_regressions, regression_records
from vlp.pipeline.eval.nightly.report import summary_table
from vlp.pipeline.eval.nightly.suite import Benchmark


def tag(run_dir: Path, step: int, state: str = "{}") -> Path:
    path = run_dir / "checkpoints" / f"global_step{step}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "vlp_state.json").write_text(state)
    return path


def export(run_dir: Path, name: str, weights: bytes = b"w") -> Path:
    path = run_dir / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_checkpoints_are_complete_tags_by_step_then_exports_outside_checkpoints_and_eval(
        tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ten, two = tag(a, 10, '{"n": 10}'), tag(a, 2)
    (a / "checkpoints/global_step5").mkdir()  # no state file: not published
    (a / "checkpoints/global_step7.bak").mkdir()
    (a / "checkpoints/global_step7.bak/vlp_state.json").write_text("{}")
    export(a, "checkpoints/global_step2/hf")  # inside a tag: part of it
    export(a, "eval/global_step2/hf")
    hf = export(a, "exports/hf")
    other = export(b, "hf", b"other")
    (tmp_path / "notes.txt").write_text("not a run")
    refs = discover_checkpoints(tmp_path)
    assert [(r.run, r.tag, r.step) for r in refs] == [
        ("a", "global_step2", 2), ("a", "global_step10", 10), ("a", "exports/hf", None),
        ("b", "hf", None)]
    assert [r.path for r in refs] == [two, ten, hf, other]
    assert [r.run_dir for r in refs] == [a, a, a, b]
    assert [r.fingerprint for r in refs] == [checkpoint_fingerprint(p) for p in (two, ten, hf,
                                                                              other)]
    assert refs[0].fingerprint != refs[1].fingerprint != refs[2].fingerprint
    assert [r.tag for r in discover_checkpoints(a)] == ["global_step2", "global_step10",
                                                       "exports/hf"]  # one run's folder


@dataclasses.dataclass(frozen=True)
class StubBenchmark(Benchmark):
    """A benchmark whose result is `results[(checkpoint, its step)]`, or that raises it; each
    run is logged."""

    outcomes: dict = dataclasses.field(default_factory=dict, compare=False)
    log: list = dataclasses.field(default_factory=list, compare=False)

    def run(self, checkpoint, out: Path) -> dict:
        self.log.append((checkpoint, out))
        outcome = self.outcomes.get(checkpoint, self.outcomes.get(None))
        if isinstance(outcome, Exception):
            raise outcome
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(outcome))
        return outcome


RESULT = {"metrics": {"image_retrieval_recall@1": 0.5, "yes/no": 0.75, "score": 2},
          "baselines": {"chance": {"image_retrieval_recall@1": 0.1, "no": 0.25},
                        "other": {"score": 9.0}}}


@pytest.fixture
def night(tmp_path, monkeypatch):
    """Runs with two tags and an export; benchmarks `ok` (worse on the export) and `last`
    always succeed, `flaky`
    (between them) fails with an OSError on the step-2 tag and a bad-input UserError on the
    export; the loader loads everything but a tag whose state says "corrupt"."""
    runs = tmp_path / "runs"
    tag(runs / "r", 2)
    tag(runs / "r", 4)
    export(runs / "r", "hf")
    loads = []

    def load_model(path, device="cpu"):
        loads.append((Path(path).relative_to(runs).as_posix(), device))
        if (Path(path) / "vlp_state.json").is_file() and "corrupt" in (
                Path(path) / "vlp_state.json").read_text():
            raise UserError(f"{path}: corrupt")
        return Path(path).relative_to(runs).as_posix()

    worse = {**RESULT, "metrics": {**RESULT["metrics"], "image_retrieval_recall@1": 0.2}}
    ok = StubBenchmark("ok", "retrieval", None, {"r/hf": worse, None: RESULT})
    flaky = StubBenchmark("flaky", "vqa", None, {
        "r/checkpoints/global_step2": OSError("disk hiccup"), "r/hf": UserError("bad input"),
        None: {"metrics": {"overall": 40.0}, "baselines": {"majority": {"overall": 20.0}}}})
    last = StubBenchmark("last", "caption", None, {None: {"metrics": {"CIDEr": 1.5},
                                                          "baselines": {"none": {}}}})
    reports = []

    def render_report(results, out_dir, margin, run_dirs, captions):
        reports.append((len(results), margin, run_dirs, captions))
        (Path(out_dir) / "report.html").write_text("report")

    monkeypatch.setattr(runner, "load_model", load_model)
    monkeypatch.setattr(runner, "load_suite", lambda suite: [ok, flaky, last])
    monkeypatch.setattr(runner, "render_report", render_report)
    return {"runs": runs, "out": tmp_path / "out", "loads": loads, "ok": ok, "flaky": flaky,
            "reports": reports}


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


def test_the_first_night_evaluates_every_checkpoint_and_keeps_each_result_as_rows(night,
                                                                                    capfd):
    before = pd.Timestamp.now(tz="UTC")
    summary = run_nightly(night["runs"], suite="suite.yaml", out_dir=night["out"],
                          device="cuda:3", regression_margin=0.5)
    assert night["loads"] == [("r/checkpoints/global_step2", "cuda:3"),
                              ("r/checkpoints/global_step4", "cuda:3"), ("r/hf", "cuda:3")]
    assert summary["checkpoints_evaluated"] == 3
    assert summary["failures"] == [
        {"run": "r", "tag": "global_step2", "benchmark": "flaky",
         "error": "OSError: disk hiccup", "transient": True},
        {"run": "r", "tag": "hf", "benchmark": "flaky", "error": "UserError: bad input",
         "transient": False}]
    assert summary["results"] == str(night["out"] / "results.parquet")
    assert summary["report"] == str(night["out"] / "report.html")
    assert summary["summary"] == str(night["out"] / "summary.md")
    assert summary["tensorboard"] == str(night["runs"])
    results = rows(night["out"])
    assert pq.read_schema(night["out"] / "results.parquet").names == runner.RESULT_COLUMNS
    # the export, latest, has 60% less recall than the best: the one regression (ok rows)
    assert summary["regressions"] == regression_records(
        flag_regressions(summary_table(results[results.status == "ok"]), 0.5))
    assert [(r["benchmark"], r["metric"], r["latest tag"]) for r in summary["regressions"]] == [
        ("ok", "image_retrieval_recall@1", "hf")]
    assert list(results.columns) == runner.RESULT_COLUMNS
    ok = results[(results.benchmark == "ok") & (results.tag == "global_step4")]
    assert ok.metric.tolist() == ["image_retrieval_recall@1", "yes/no", "score"]
    assert ok.value.tolist() == [0.5, 0.75, 2.0] and ok.step.tolist() == [4] * 3
    assert results[(results.benchmark == "ok") & (results.tag == "hf")].value.tolist()[0] == 0.2
    assert ok.baseline.tolist()[:2] == [0.1, 0.25] and math.isnan(ok.baseline.tolist()[2])
    assert set(ok.baseline_name) == {"chance"} and set(ok.task) == {"retrieval"}
    assert set(ok.status) == {"ok"} and set(ok.error) == {""} and not ok.transient.any()
    assert ((ok.time >= before) & (ok.time <= pd.Timestamp.now(tz="UTC"))).all()
    assert set(ok.attempts) == {1} and set(ok.fingerprint) == {
        checkpoint_fingerprint(night["runs"] / "r/checkpoints/global_step4")}
    failed = results[results.status == "failed"]
    assert failed[["tag", "benchmark", "task", "metric"]].values.tolist() == [
        ["global_step2", "flaky", "vqa", ""], ["hf", "flaky", "vqa", ""]]
    assert failed.value.isna().all() and failed.baseline.isna().all()
    assert failed.transient.tolist() == [True, False] and set(failed.baseline_name) == {""}
    assert ((failed.time >= before) & (failed.time <= pd.Timestamp.now(tz="UTC"))).all()
    assert results[results.tag == "hf"].step.isna().all()
    assert len(results) == 3 * 3 + 1 + 2 + 3  # ok: 3 metrics x 3; flaky: 1, 2 failures; last
    last = results[results.benchmark == "last"]
    assert last.tag.tolist() == ["global_step2", "global_step4", "hf"]  # after the failures
    assert last.baseline.isna().all() and set(last.baseline_name) == {"none"}
    (count, margin, run_dirs, captions), = night["reports"]
    assert (count, margin, run_dirs) == (len(results), 0.5, {"r": night["runs"] / "r"})
    # the caption benchmark's examples, from the result JSON of the latest (an export: last)
    assert captions == [{"run": "r", "benchmark": "last", "tag": "hf", "examples": []}]
    eval_json = night["runs"] / "r/eval/global_step4/ok.json"
    assert json.loads(eval_json.read_text()) == RESULT
    assert night["ok"].log[-1] == ("r/hf", night["runs"] / "r/eval/hf/ok.json")
    err = capfd.readouterr().err
    assert "nightly: checkpoint 1/3 r/global_step2: loading, 3 benchmark(s) to run\n" in err
    assert "nightly: checkpoint 2/3 r/global_step4: flaky (2/3) started\n" in err
    assert "nightly: checkpoint 2/3 r/global_step4: ok (1/3) finished in 0s\n" in err
    assert "nightly: checkpoint 3/3 r/hf: flaky (2/3) failed after " in err
    assert "UserError: bad input" in err
    assert re.search(r"\nnightly: 3/3 \(100%\) \| [\d.]+ checkpoints/s \| elapsed \ds \| ETA 0s\n",
                     err)
    traceback = err.split("flaky (2/3) failed after 0s:\n", 1)[1].split("\nnightly: ", 1)[0]
    assert traceback.endswith("OSError: disk hiccup")  # one line each, no blank one
    lines = traceback.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[-1] == "OSError: disk hiccup"
    assert all(line.startswith("  ") for line in lines[1:-1])


def test_scalars_and_their_baselines_sit_beside_the_run_s_training_curves(night):
    run_nightly(night["runs"], out_dir=night["out"])
    events = EventAccumulator(str(night["runs"] / "r/tensorboard/eval"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted([
        "ok/image_retrieval_recall@1", "ok/baseline_chance/image_retrieval_recall@1",
        "ok/yes_no", "ok/baseline_chance/yes_no", "ok/score", "flaky/overall",
        "flaky/baseline_majority/overall", "last/CIDEr"])
    assert [(e.step, e.value) for e in events.Scalars("ok/yes_no")] == [(2, 0.75), (4, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("flaky/overall")] == [(4, 40.0)]
    assert [(e.step, e.value) for e in events.Scalars("flaky/baseline_majority/overall")] == [
        (4, 20.0)]


def test_the_next_nights_retry_what_may_pass_and_no_more(night):
    run_nightly(night["runs"], out_dir=night["out"])
    night["flaky"].log.clear()
    for attempt in (2, 3):
        summary = run_nightly(night["runs"], out_dir=night["out"])
        assert summary["checkpoints_evaluated"] == 1  # the transient failure, not the bad input
        results = rows(night["out"])
        retried = results[(results.tag == "global_step2") & (results.benchmark == "flaky")]
        assert retried.attempts.tolist() == [attempt] and len(results) == 15
    assert [checkpoint for checkpoint, _ in night["flaky"].log] == [
        "r/checkpoints/global_step2"] * 2
    assert run_nightly(night["runs"], out_dir=night["out"])["checkpoints_evaluated"] == 0
    assert len(night["reports"]) == 3  # not rendered again when nothing was evaluated
    night["flaky"].outcomes.pop("r/checkpoints/global_step2")
    night["flaky"].outcomes.pop("r/hf")
    summary = run_nightly(night["runs"], out_dir=night["out"], retry_failed=True)
    assert summary["checkpoints_evaluated"] == 2 and summary["failures"] == []
    results = rows(night["out"])
    assert set(results.status) == {"ok"} and len(results) == 3 * 3 + 3 + 3
    assert results[results.tag == "global_step2"].attempts.tolist() == [1, 1, 1, 1, 4]


def test_a_tag_rewritten_after_a_rewind_is_evaluated_again_and_replaces_its_rows(night):
    run_nightly(night["runs"], out_dir=night["out"])
    tag(night["runs"] / "r", 4, '{"rewound": true}')
    night["ok"].log.clear()
    assert run_nightly(night["runs"], out_dir=night["out"])["checkpoints_evaluated"] == 2
    assert sorted(c for c, _ in night["ok"].log) == ["r/checkpoints/global_step4"]
    results = rows(night["out"])
    step4 = results[results.tag == "global_step4"]
    assert len(step4) == 5 and set(step4.fingerprint) == {
        checkpoint_fingerprint(night["runs"] / "r/checkpoints/global_step4")}
    assert set(step4.attempts) == {1}


def test_a_checkpoint_that_does_not_load_fails_every_benchmark_and_the_others_run(night, capfd):
    tag(night["runs"] / "r", 2, "corrupt")
    summary = run_nightly(night["runs"], out_dir=night["out"])
    assert [(f["tag"], f["benchmark"], f["transient"]) for f in summary["failures"]] == [
        ("global_step2", "ok", False), ("global_step2", "flaky", False),
        ("global_step2", "last", False), ("hf", "flaky", False)]
    assert summary["checkpoints_evaluated"] == 3
    assert "checkpoint 1/3 r/global_step2: does not load:\nTraceback" in capfd.readouterr().err


def test_rows_written_before_fingerprints_count_as_this_content(night):
    run_nightly(night["runs"], out_dir=night["out"])
    results = rows(night["out"])
    results["fingerprint"] = ""
    results.to_parquet(night["out"] / "results.parquet")
    night["ok"].log.clear()
    assert run_nightly(night["runs"], out_dir=night["out"])["checkpoints_evaluated"] == 1
    assert night["ok"].log == []  # only the transient failure is tried again, its second try
    results = rows(night["out"])
    assert results[results.status == "failed"].attempts.tolist() == [1, 2]


def test_rows_of_older_files_get_the_newer_columns_defaults(tmp_path):
    empty = read_results(tmp_path / "none.parquet")
    assert list(empty.columns) == runner.RESULT_COLUMNS and empty.empty
    assert {c: str(t) for c, t in empty.dtypes.items() if c in (
        "run", "step", "value", "time", "transient", "attempts")} == {
        "run": "object", "step": "Int64", "value": "float64", "time": "datetime64[ns, UTC]",
        "transient": "bool", "attempts": "Int64"}
    old = pd.DataFrame({"run": ["r"], "tag": ["t"], "benchmark": ["b"], "status": ["failed"],
                        "fingerprint": [None]})
    old.to_parquet(tmp_path / "old.parquet")
    results = read_results(tmp_path / "old.parquet")
    assert results[["fingerprint", "transient", "attempts"]].values.tolist() == [["", False, 1]]


def test_one_night_at_a_time_and_a_killed_night_s_files_are_removed(night, tmp_path, capfd):
    night["out"].mkdir()
    (night["out"] / ".results.parquet.abcd1234.tmp").write_text("half")
    (night["out"] / "keep.tmp").write_text("not ours")
    with nightly_lock(night["out"]):
        with pytest.raises(UserError) as refused:
            run_nightly(night["runs"], out_dir=night["out"])
    assert str(refused.value) == (
        f"another nightly run holds {night['out'] / 'nightly.lock'}: it is still evaluating into "
        f"{night['out']}; not starting (run again when it ends)")
    run_nightly(night["runs"])  # default OUT: RUNS/nightly
    assert (night["runs"] / "nightly/results.parquet").is_file()
    run_nightly(night["runs"], out_dir=night["out"])
    assert not (night["out"] / ".results.parquet.abcd1234.tmp").exists()
    assert (night["out"] / "keep.tmp").exists()
    assert ("nightly: removed 1 temporary file(s) a killed run left in "
            f"{night['out']}\n") in capfd.readouterr().err


@pytest.mark.parametrize("cuda", [False, True])
def test_without_a_device_the_night_runs_on_cuda_when_there_is_one(night, monkeypatch, cuda):
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: cuda)
    run_nightly(night["runs"], out_dir=night["out"])
    assert {device for _, device in night["loads"]} == {"cuda" if cuda else "cpu"}


def test_the_suite_defaults_to_the_runs_folder_s_eval_suite(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(runner, "load_suite", lambda suite: asked.append(suite) or [])
    (tmp_path / "runs").mkdir()
    run_nightly(tmp_path / "runs", out_dir=tmp_path / "out")
    run_nightly(tmp_path / "runs", suite={"x": {}}, out_dir=tmp_path / "out")
    assert asked == [tmp_path / "runs/eval_suite.yaml", {"x": {}}]


@pytest.mark.parametrize("metric, expected", [
    ("overall", 1.0), ("late_fusion/yes/no", 2.0), ("yes/no", 2.0), ("drop/itc", 3.0),
    ("a/b/c/itc", 3.0), ("missing", math.nan), ("x/", math.nan)])
def test_a_baseline_is_found_under_the_metric_or_its_longest_suffix(metric, expected):
    baseline = {"overall": 1.0, "yes/no": 2.0, "itc": 3.0, "no": 9.0}
    value = baseline_value(baseline, metric)
    assert value == expected or (math.isnan(expected) and math.isnan(value))


def test_caption_examples_come_from_each_run_s_latest_checkpoint(tmp_path):
    runs = {name: tmp_path / name for name in ("a", "b")}
    for run, tag_name, examples in (("a", "global_step2", ["old"]), ("a", "global_step10", ["new"]),
                                    ("b", "global_step3", ["b"])):
        path = runs[run] / "eval" / tag_name / "cap.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"examples": examples}))
    results = pd.DataFrame([
        {"run": run, "tag": t, "step": s, "benchmark": "cap", "task": task, "status": status,
         "time": pd.Timestamp(0)}
        for run, t, s, task, status in (  # run b first: the sections come by run name
            ("b", "global_step3", 3, "caption", "ok"),
            ("a", "global_step2", 2, "caption", "ok"), ("a", "global_step10", 10, "caption", "ok"),
            ("a", "global_step12", 12, "caption", "failed"),
            ("a", "global_step10", 10, "vqa", "ok"), ("gone", "global_step1", 1, "caption",
                                                      "ok"))])
    refs = [CheckpointRef(run, path, "t", path, 1, "") for run, path in runs.items()]
    assert caption_examples(results, refs) == [
        {"run": "a", "benchmark": "cap", "tag": "global_step10", "examples": ["new"]},
        {"run": "b", "benchmark": "cap", "tag": "global_step3", "examples": ["b"]}]
