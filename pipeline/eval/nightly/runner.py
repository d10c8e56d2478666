"""Nightly benchmark: evaluate every checkpoint not yet evaluated, keep going past failures.

    runs/NAME/checkpoints/global_step{N}/   complete tags (with vlp_state.json) are evaluated
    runs/NAME/**/model.safetensors          export directories too (step unknown)
    OUT/results.parquet                     one row per (run, tag, benchmark, metric), or one
                                            failure row per (run, tag, benchmark); each with the
                                            checkpoint's content fingerprint
    runs/NAME/tensorboard/eval/             scalars "<benchmark>/<metric>" against step (a '/'
                                            in the metric written '_'), and its baseline
                                            "<benchmark>/baseline_<name>/<metric>": beside
                                            the run's training events (runs/NAME/tensorboard/),
                                            so `tensorboard --logdir runs` lists them together
    OUT/report.html                         one self-contained page, see report.py
    OUT/summary.md                          the headline and the regressions against each
                                            run's best (regressions.py)
    OUT/nightly.lock                        held for the whole run: one run per OUT at a time
    runs/NAME/eval/<tag>/<benchmark>.json   each benchmark's full result (DESIGN's layout)

Work is keyed by (run, tag, benchmark) and the fingerprint of the checkpoint's content
(`checkpoint_fingerprint`): a tag rewritten after a rewind is evaluated again and its old rows
replaced. A result is done when it succeeded, or failed on bad input (a UserError: a corrupt
checkpoint, a missing file; `retry_failed` tries those again). Any other failure (I/O, memory, a
device error) may be transient: it is tried again on later runs, up to MAX_ATTEMPTS in all. So a
re-run does no duplicate work. Rows are appended after each checkpoint, atomically, so a crash
loses at most the checkpoint being evaluated (the next run removes the temporary files a kill
left in OUT). Rows written before fingerprints existed count as matching. Each run reads
results.parquet and writes it back, so two at once on one OUT would drop each other's rows: the
second refuses to start.

Progress goes to stderr (stdout carries the summary JSON): a line when each (checkpoint,
benchmark) starts and when it ends, with its time, the jobs' own progress lines in between, and
after each checkpoint the night's count with its ETA:

    nightly: checkpoint 3/7 tiny/global_step200: synth_vqa (2/6) finished in 3m12s
    nightly: 3/7 (42%) | 6m40s/checkpoint | elapsed 20m01s | ETA 26m41s
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from vlp.pipeline.data.checkpoints import checkpoint_fingerprint, complete_tags, tag_step
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import atomic_path, remove_temp_files
from vlp.pipeline.data.model_loading import load_model
from vlp.pipeline.eval.nightly.regressions import (
    DEFAULT_MARGIN,
    flag_regressions,
    regression_records,
)
from vlp.pipeline.eval.nightly.report import latest_row, render_report, summary_table
from vlp.pipeline.eval.nightly.suite import Benchmark, load_suite
from vlp.pipeline.progress import format_duration, progress_text

RESULT_COLUMNS = ["run", "tag", "step", "benchmark", "task", "metric", "value", "baseline",
                  "baseline_name", "time", "status", "error", "fingerprint", "transient",
                  "attempts"]
MAX_ATTEMPTS = 3  # of a benchmark on one checkpoint content that keeps failing transiently


@dataclass(frozen=True)
class CheckpointRef:
    run: str
    run_dir: Path
    tag: str  # DeepSpeed tag, or the export directory's path inside the run
    path: Path
    step: int | None
    fingerprint: str


def discover_checkpoints(runs_dir: str | Path) -> list[CheckpointRef]:
    """Complete DeepSpeed tags and export directories of every run under `runs_dir` (or of
    `runs_dir` itself when it is one run), ordered by run then step."""
    runs_dir = Path(runs_dir)
    run_dirs = [runs_dir] if (runs_dir / "checkpoints").is_dir() else sorted(
        p for p in runs_dir.iterdir() if p.is_dir())
    refs = []
    for run_dir in run_dirs:
        for tag_dir in complete_tags(run_dir / "checkpoints"):
            refs.append(CheckpointRef(run_dir.name, run_dir, tag_dir.name, tag_dir,
                                      tag_step(tag_dir), checkpoint_fingerprint(tag_dir)))
        for weights in sorted(run_dir.rglob("model.safetensors")):
            export = weights.parent
            if export.relative_to(run_dir).parts[0] not in ("checkpoints", "eval"):
                refs.append(CheckpointRef(run_dir.name, run_dir,
                                          export.relative_to(run_dir).as_posix(), export, None,
                                          checkpoint_fingerprint(export)))
    return refs


def read_results(path: str | Path) -> pd.DataFrame:
    """results.parquet (empty with every column when there is none; rows written before the newer
    columns existed get their defaults: no fingerprint, not transient, one attempt)."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=_DTYPES.get(c, "object")) for c in RESULT_COLUMNS})
    results = pd.read_parquet(path)
    for column, default in (("fingerprint", ""), ("transient", False), ("attempts", 1)):
        results[column] = results[column].fillna(default) if column in results else default
    return results


@dataclass(frozen=True)
class _Record:
    status: str
    fingerprint: str
    transient: bool
    attempts: int


def _records(results: pd.DataFrame) -> dict[tuple[str, str, str], _Record]:
    """The outcome recorded for each (run, tag, benchmark)."""
    rows = results.drop_duplicates(["run", "tag", "benchmark"])
    return {(r.run, r.tag, r.benchmark): _Record(r.status, r.fingerprint or "",
                                                 bool(r.transient), int(r.attempts))
            for r in rows.itertuples()}


def _due(record: _Record | None, fingerprint: str, retry_failed: bool) -> bool:
    if record is None or record.fingerprint not in ("", fingerprint):  # new, or rewritten
        return True
    if record.status == "ok":
        return False
    return retry_failed or (record.transient and record.attempts < MAX_ATTEMPTS)


@contextlib.contextmanager
def nightly_lock(out_dir: Path) -> Iterator[None]:
    """Hold OUT/nightly.lock (an exclusive flock; the kernel drops it if the process dies) until
    the block ends; UserError at once while another run holds it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "nightly.lock"
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another nightly run holds {path}: it is still evaluating into "
                            f"{out_dir}; not starting (run again when it ends)") from None
        yield


def run_nightly(
    runs_dir: str | Path,
    suite: str | Path | dict | None = None,
    out_dir: str | Path | None = None,
    retry_failed: bool = False,
    device: str | None = None,
    regression_margin: float = DEFAULT_MARGIN,
) -> dict:
    """Evaluate new checkpoints under `runs_dir` with `suite` (default RUNS/eval_suite.yaml);
    returns counts, the failures and the output paths."""
    runs_dir = Path(runs_dir)
    benchmarks = load_suite(suite if suite is not None else runs_dir / "eval_suite.yaml")
    out_dir = Path(out_dir) if out_dir is not None else runs_dir / "nightly"
    with nightly_lock(out_dir):
        left = remove_temp_files(out_dir)
        if left:
            _say(f"removed {len(left)} temporary file(s) a killed run left in {out_dir}")
        return _evaluate_new(runs_dir, benchmarks, out_dir, retry_failed, device,
                             regression_margin)


def _evaluate_new(runs_dir: Path, benchmarks: list[Benchmark], out_dir: Path, retry_failed: bool,
                  device: str | None, regression_margin: float) -> dict:
    """run_nightly's work, under its lock."""
    results_path = out_dir / "results.parquet"
    results = read_results(results_path)
    records = _records(results)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    evaluated, failures = 0, []
    refs = discover_checkpoints(runs_dir)
    work = [(ref, [b for b in benchmarks
                   if _due(records.get((ref.run, ref.tag, b.name)), ref.fingerprint, retry_failed)])
            for ref in refs]
    work = [(ref, todo) for ref, todo in work if todo]
    started = time.perf_counter()
    for ref, todo in work:
        where = f"checkpoint {evaluated + 1}/{len(work)} {ref.run}/{ref.tag}"
        rows = evaluate_checkpoint(ref, todo, device, where)
        for row in rows:
            before = records.get((ref.run, ref.tag, row["benchmark"]))
            again = (before is not None and before.status == "failed"
                     and before.fingerprint in ("", ref.fingerprint))
            row["attempts"] = before.attempts + 1 if again else 1
        failures += [r for r in rows if r["status"] == "failed"]
        # A re-evaluated benchmark's new rows replace its old rows (a failure, or results of
        # the tag's earlier content).
        retried = (results["run"] == ref.run) & (results["tag"] == ref.tag) & results[
            "benchmark"].isin([b.name for b in todo])
        results = results[~retried]
        new_rows = pd.DataFrame(rows, columns=RESULT_COLUMNS).astype(_DTYPES)
        results = new_rows if results.empty else pd.concat([results, new_rows], ignore_index=True)
        write_results(results, results_path)
        write_tensorboard(rows, ref.run_dir / EVAL_EVENTS)
        evaluated += 1
        print(progress_text("nightly", evaluated, len(work), "checkpoint",
                            time.perf_counter() - started), file=sys.stderr, flush=True)

    report = out_dir / "report.html"
    if evaluated or not report.exists():
        render_report(results, out_dir, regression_margin,
                      {ref.run: ref.run_dir for ref in refs}, caption_examples(results, refs))
    flagged = flag_regressions(summary_table(results[results["status"] == "ok"]),
                               regression_margin)
    return {
        "checkpoints_evaluated": evaluated,
        "failures": [{k: f[k] for k in ("run", "tag", "benchmark", "error", "transient")}
                     for f in failures],
        "results": str(results_path),
        "report": str(report),
        "regressions": regression_records(flagged),
        "summary": str(out_dir / "summary.md"),
        "tensorboard": str(runs_dir),  # the logdir that shows training and eval together
    }


def evaluate_checkpoint(ref: CheckpointRef, benchmarks: list[Benchmark], device: str,
                        where: str) -> list[dict]:
    """Result rows for one checkpoint: metric rows per benchmark, or a failure row for each
    benchmark that raised (all of them when the checkpoint does not load). Each benchmark's start
    and end go to stderr, after `where` ("checkpoint 3/7 RUN/TAG")."""
    base = {"run": ref.run, "tag": ref.tag, "step": ref.step, "fingerprint": ref.fingerprint}
    _say(f"{where}: loading, {len(benchmarks)} benchmark(s) to run")
    try:
        loaded = load_model(ref.path, device=device)
    except Exception as exc:  # a bad checkpoint is recorded, the others still run
        _say(f"{where}: does not load:\n{_traceback(exc)}")
        return [_failure(base, b, exc) for b in benchmarks]
    rows = []
    eval_dir = ref.run_dir / "eval" / ref.tag
    for number, benchmark in enumerate(benchmarks, 1):
        name = f"{where}: {benchmark.name} ({number}/{len(benchmarks)})"
        _say(f"{name} started")
        start = time.perf_counter()
        try:
            result = benchmark.run(loaded, out=eval_dir / f"{benchmark.name}.json")
        except Exception as exc:  # one failing benchmark does not stop the others
            _say(f"{name} failed after {_since(start)}:\n{_traceback(exc)}")
            rows.append(_failure(base, benchmark, exc))
            continue
        _say(f"{name} finished in {_since(start)}")
        rows += _metric_rows(base, benchmark, result)
    return rows


def _metric_rows(base: dict, benchmark: Benchmark, result: dict) -> list[dict]:
    """One row per metric of a benchmark's result, beside its primary baseline's value."""
    baseline_name, baseline = next(iter(result["baselines"].items()))
    now = datetime.now(timezone.utc)
    return [{**base, "benchmark": benchmark.name, "task": benchmark.task, "metric": metric,
             "value": float(value), "baseline": baseline_value(baseline, metric),
             "baseline_name": baseline_name, "time": now, "status": "ok", "error": "",
             "transient": False}
            for metric, value in result["metrics"].items()]


def _say(text: str) -> None:
    """A progress or failure line of the nightly run, on stderr (stdout carries the summary)."""
    print(f"nightly: {text}", file=sys.stderr, flush=True)


def _since(start: float) -> str:
    return format_duration(time.perf_counter() - start)


def _traceback(exc: Exception) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


def baseline_value(baseline: dict[str, float], metric: str) -> float:
    """The baseline's value for `metric`: under its own name, else under its longest '/'-suffix
    that the baseline has (late_fusion/yes/no: a variant of yes/no; drop/itc: compositionality's
    baseline is per scorer); NaN when it has none."""
    parts = metric.split("/")
    for start in range(len(parts)):
        key = "/".join(parts[start:])
        if key in baseline:
            return float(baseline[key])
    return math.nan


def caption_examples(results: pd.DataFrame, checkpoints: list[CheckpointRef]) -> list[dict]:
    """The example captions of each run's latest checkpoint, per caption benchmark, read from
    its result JSON (runs/NAME/eval/TAG/BENCHMARK.json) for the report."""
    ok = results[(results["status"] == "ok") & (results["task"] == "caption")]
    run_dirs = {ref.run: ref.run_dir for ref in checkpoints}
    sections = []
    for (run, benchmark), rows in ok.groupby(["run", "benchmark"], sort=True):
        tag = latest_row(rows)["tag"]
        path = run_dirs[run] / "eval" / tag / f"{benchmark}.json" if run in run_dirs else None
        if path is not None and path.is_file():
            examples = json.loads(path.read_text()).get("examples", [])
            sections.append({"run": run, "benchmark": benchmark, "tag": tag,
                             "examples": examples})
    return sections


def _failure(base: dict, benchmark: Benchmark, exc: Exception) -> dict:
    return {**base, "benchmark": benchmark.name, "task": benchmark.task, "metric": "",
            "value": math.nan, "baseline": math.nan, "baseline_name": "",
            "time": datetime.now(timezone.utc), "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            # Bad input fails the same way next time; anything else (I/O, memory) may not.
            "transient": not isinstance(exc, UserError)}


_DTYPES = {"step": "Int64", "value": "float64", "baseline": "float64",
           "time": "datetime64[ns, UTC]", "transient": "bool", "attempts": "Int64"}


def write_results(results: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        results.astype(_DTYPES).to_parquet(tmp, index=False)


# Training writes its events to runs/NAME/tensorboard/ (pipeline/train/metrics.py). The eval
# events go to a folder of their own inside it: TensorBoard reads a folder's event files in name
# order and stops reading one once a newer file appears, so a nightly file among the training
# files would freeze a live run's curves.
EVAL_EVENTS = Path("tensorboard") / "eval"


def write_tensorboard(rows: list[dict], log_dir: Path) -> None:
    """Scalars `<benchmark>/<metric>` at the checkpoint's step, and beside each its baseline as
    `<benchmark>/baseline_<name>/<metric>` (exports have no step: skipped)."""
    from torch.utils.tensorboard import SummaryWriter

    ok = [r for r in rows if r["status"] == "ok" and r["step"] is not None]
    if not ok:
        return
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for row in ok:
            # yes/no is one chart, not a group "yes" with a chart "no"
            metric = row["metric"].replace("/", "_")
            writer.add_scalar(f"{row['benchmark']}/{metric}", row["value"],
                              global_step=row["step"])
            if math.isfinite(row["baseline"]):
                writer.add_scalar(f"{row['benchmark']}/baseline_{row['baseline_name']}/{metric}",
                                  row["baseline"], global_step=row["step"])
    finally:
        writer.close()
