"""Nightly regression flags, the Markdown summary, the small-multiples report and
`--fail-on-regression`, on a results table with known values (no evaluation runs)."""
import json
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from vlp.pipeline.cli import main as vlp
from vlp.pipeline.eval.nightly.regressions import flag_regressions, markdown_summary
from vlp.pipeline.eval.nightly.report import render_report, summary_table
from vlp.pipeline.eval.nightly.runner import RESULT_COLUMNS, write_results

# run "a": recall@1 peaks at step 2 (0.40) and falls to 0.30 at step 3 (-25%): a regression;
# vqa overall dips 2% below its best (within a 5% margin). Run "b" only improves.
VALUES = {("a", "retrieval", "recall@1"): [0.10, 0.40, 0.30],
          ("a", "vqa", "overall"): [40.0, 50.0, 49.0],
          ("b", "retrieval", "recall@1"): [0.05, 0.20, 0.25]}


def results_table() -> pd.DataFrame:
    rows = []
    for (run, benchmark, metric), values in VALUES.items():
        for step, value in enumerate(values, start=1):
            rows.append({"run": run, "tag": f"global_step{step}", "step": step,
                         "benchmark": benchmark, "task": benchmark, "metric": metric,
                         "value": value, "baseline": 0.01 if benchmark == "retrieval" else 20.0,
                         "baseline_name": "chance" if benchmark == "retrieval" else "majority",
                         "time": datetime(2026, 1, step, tzinfo=timezone.utc), "status": "ok",
                         "error": ""})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def write_runs(root: Path) -> Path:
    """runs/a and runs/b with metrics.jsonl (run a resumed at step 2: step 2 logged twice)."""
    for run, losses in (("a", [3.0, 2.5, 2.0]), ("b", [3.2, 2.9, 2.4])):
        run_dir = root / run / "checkpoints"
        run_dir.mkdir(parents=True)
        lines = [{"step": s, "loss/total": v, "train/lr": 1e-3 / s, "perf/samples_per_s": 100.0}
                 for s, v in enumerate(losses, start=1)]
        text = "\n".join(json.dumps(line) for line in lines)
        (root / run / "metrics.jsonl").write_text(text + '\n{"step": 4, "loss/to')  # cut short
    return root


def test_only_a_drop_beyond_the_margin_below_the_best_is_flagged():
    flagged = flag_regressions(summary_table(results_table()), margin=0.05)
    by_key = {(r["run"], r["metric"]): r for r in flagged.to_dict("records")}
    assert by_key[("a", "recall@1")]["regressed"]
    assert by_key[("a", "recall@1")]["change"] == pytest.approx(-0.25)
    assert by_key[("a", "recall@1")]["best tag"] == "global_step2"
    assert not by_key[("a", "overall")]["regressed"]  # -2%
    assert by_key[("a", "overall")]["change"] == pytest.approx(-0.02)
    assert not by_key[("b", "recall@1")]["regressed"] and by_key[("b", "recall@1")]["change"] == 0
    assert flag_regressions(summary_table(results_table()), 0.01)["regressed"].sum() == 2


def test_markdown_summary_names_each_regression():
    flagged = flag_regressions(summary_table(results_table()), margin=0.05)
    assert markdown_summary(flagged, 0.05, failures=1) == (
        "## vlp nightly: **1 regression(s)**\n\n"
        "3 metric(s) compared with their run's best; a regression is a latest value more than "
        "5% below it. Failed evaluations: 1.\n\n"
        "| run | benchmark | metric | latest | best | change |\n"
        "|---|---|---|---:|---:|---:|\n"
        "| a | retrieval | recall@1 | 0.3 (global_step3) | 0.4 (global_step2) | -25.0% |\n")


def test_report_has_the_grids_the_highlighted_row_and_the_summary(tmp_path):
    runs = write_runs(tmp_path / "runs")
    out = tmp_path / "nightly"
    render_report(results_table(), out, 0.05, {"a": runs / "a", "b": runs / "b"})
    page = (out / "report.html").read_text()
    assert page.count('<tr class="regressed">') == 1
    assert "-25.0% regressed" in page and "1 regression(s)" in page
    for grid in ("eval_grid.png", "training_grid.png"):
        assert f'src="grids/{grid}"' in page
        assert (out / "grids" / grid).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "summary.md").read_text().startswith("## vlp nightly: **1 regression(s)**")


def test_training_panels_read_each_runs_metrics_with_the_last_record_per_step(tmp_path):
    from vlp.pipeline.eval.nightly.figures import training_panels

    runs = write_runs(tmp_path / "runs")
    with open(runs / "a" / "metrics.jsonl", "a") as f:  # step 2 again after a resume
        f.write('\n{"step": 2, "loss/total": 2.6}\n')
    panels = {p.title: p for p in training_panels({"a": runs / "a", "b": runs / "b"})}
    assert list(panels) == ["loss/total", "train/lr", "perf/samples_per_s"]
    assert panels["loss/total"].lines["a"] == ([1, 2, 3], [3.0, 2.6, 2.0])
    assert panels["loss/total"].lines["b"] == ([1, 2, 3], [3.2, 2.9, 2.4])


def nightly_cli(runs: Path, *flags: str) -> int:
    return vlp(["eval", "nightly", "--runs", str(runs), "--out", str(runs / "nightly"), *flags])


def test_fail_on_regression_sets_the_exit_status(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs")
    (runs / "eval_suite.yaml").write_text("retrieval:\n  task: retrieval\n  shards: none.tar\n")
    write_results(results_table(), runs / "nightly" / "results.parquet")
    assert nightly_cli(runs) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["metric"]) for r in printed["regressions"]] == [("a", "recall@1")]
    assert (runs / "nightly" / "summary.md").exists()
    assert nightly_cli(runs, "--fail-on-regression") == 4
    assert nightly_cli(runs, "--fail-on-regression", "--regression-margin", "0.3") == 0
    capsys.readouterr()
    assert nightly_cli(runs, "--regression-margin", "5") == 2
    assert "--regression-margin must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed "
                    "(launch_scripts/install_chromium.sh)")
def test_report_renders_in_headless_chromium(tmp_path):
    runs = write_runs(tmp_path / "runs")
    out = tmp_path / "nightly"
    render_report(results_table(), out, 0.05, {"a": runs / "a", "b": runs / "b"})
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'class="regressed"' in dom.stdout and "training_grid.png" in dom.stdout
