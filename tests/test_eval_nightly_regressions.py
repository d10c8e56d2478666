"""Nightly regression flags, the Markdown summary, the report (headline first, one unit, one
self-contained file) and `--fail-on-regression`, on a results table with known values (no
evaluation runs)."""
import base64
import json
import math
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
from nightly_helpers import Page

from vlp.pipeline.cli import main as vlp
from vlp.pipeline.eval.nightly.headline import HEADLINE, SCALE
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.nightly.regressions import (
    check_margin,
    flag_regressions,
    markdown_summary,
    regression_records,
)
from vlp.pipeline.eval.nightly.report import render_report, shown_table, summary_table
from vlp.pipeline.eval.nightly.runner import RESULT_COLUMNS, baseline_value, write_results
from vlp.pipeline.eval.nightly.suite import TASKS

# run "a": R@1 peaks at step 2 (0.40) and falls to 0.30 at step 3 (-25%): a regression; VQA
# overall dips 2% below its best (within a 5% margin); its yes/no row was recorded without a
# baseline. Run "b" only improves, over 7 checkpoints; its compositionality benchmark was scored
# by ITC alone (no mean/itm).
R1 = "image_retrieval_recall@1"
VALUES = {("a", "retrieval", R1): [0.10, 0.40, 0.30],
          ("a", "vqa", "overall"): [40.0, 50.0, 49.0],
          ("a", "vqa", "yes/no"): [60.0, 70.0, 70.0],
          ("b", "retrieval", R1): [0.05, 0.10, 0.15, 0.20, 0.22, 0.24, 0.25],
          ("b", "compositionality", "drop/itc"): [0.5, 0.6, 0.7, 0.8, 0.8, 0.8, 0.9],
          ("b", "compositionality", "mean/itc"): [0.5, 0.55, 0.6, 0.65, 0.7, 0.7, 0.75]}
BASELINES = {"retrieval": ("chance", 0.01), "vqa": ("majority", 20.0),
             "compositionality": ("chance", 0.5)}


def results_table() -> pd.DataFrame:
    rows = []
    for (run, benchmark, metric), values in VALUES.items():
        name, baseline = BASELINES[benchmark]
        for step, value in enumerate(values, start=1):
            rows.append({"run": run, "tag": f"global_step{step}", "step": step,
                         "benchmark": benchmark, "task": benchmark, "metric": metric,
                         "value": value, "baseline": float("nan") if metric == "yes/no"
                         else baseline, "baseline_name": name,
                         "time": datetime(2026, 1, step, tzinfo=timezone.utc), "status": "ok",
                         "error": ""})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


HEADLINE_ROWS = [  # what the report and summary.md lead with
    ["run", "benchmark", "metric", "latest", "baseline", "best", "vs best", "trend"],
    ["a", "retrieval", "text→image R@1", "30.0 (global_step3)", "1.0 (chance)",
     "40.0 (global_step2)", "-25.0% regressed", "10.0 → 40.0 → 30.0"],
    ["a", "vqa", "accuracy", "49.0 (global_step3)", "20.0 (majority)", "50.0 (global_step2)",
     "-2.0%", "40.0 → 50.0 → 49.0"],
    ["b", "retrieval", "text→image R@1", "25.0 (global_step7)", "1.0 (chance)",
     "25.0 (global_step7)", "+0.0%", "15.0 → 20.0 → 22.0 → 24.0 → 25.0"],
    ["b", "compositionality", "true over edited caption, mean (ITC)", "75.0 (global_step7)",
     "50.0 (chance)", "75.0 (global_step7)", "+0.0%", "60.0 → 65.0 → 70.0 → 70.0 → 75.0"],
]


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
    assert by_key[("a", R1)]["regressed"]
    assert by_key[("a", R1)]["change"] == pytest.approx(-0.25)
    assert by_key[("a", R1)]["best tag"] == "global_step2"
    assert not by_key[("a", "overall")]["regressed"]  # -2%
    assert by_key[("a", "overall")]["change"] == pytest.approx(-0.02)
    assert not by_key[("b", R1)]["regressed"] and by_key[("b", R1)]["change"] == 0
    assert flag_regressions(summary_table(results_table()), 0.01)["regressed"].sum() == 2


def test_every_task_has_a_unit_and_a_headline_metric():
    assert set(SCALE) == set(HEADLINE) == set(TASKS)


def test_a_metric_is_compared_with_its_own_baseline_or_that_of_the_metric_it_varies():
    """The yes/no baseline was looked up as "no" (the part after the last '/'): NaN, shown as
    "nan (majority)"."""
    majority = {"overall": 19.82, "yes/no": 57.62, "number": 0.0, "other": 0.0}
    assert baseline_value(majority, "yes/no") == 57.62
    assert baseline_value(majority, "late_fusion/yes/no") == 57.62
    assert baseline_value(majority, "late_fusion/overall") == 19.82
    assert baseline_value({"itc": 0.5, "itm": 0.5}, "swap_colour/itm") == 0.5  # per scorer
    assert math.isnan(baseline_value({"acc1": 0.2}, "acc5"))  # none: shown as a reason


def test_markdown_summary_leads_with_the_headline_then_names_each_regression():
    table = shown_table(results_table(), margin=0.05)
    rows = ["| " + " | ".join(row) + " |" for row in HEADLINE_ROWS]
    assert markdown_summary(table, 0.05, failures=1) == "\n".join([
        "## vlp nightly: **1 regression(s)**", "",
        rows[0], "|---|---|---|---|---|---|---|---|", *rows[1:], "",
        "All values in percent; caption metrics x100 as papers quote them (CIDEr 152.5 for the "
        "COCO tools' 1.525). 6 metric(s) compared with their run's best; a regression is a "
        "latest value more than 5% below it. Failed evaluations: 1.", "",
        "| run | benchmark | metric | latest | baseline | best | vs best |",
        "|---|---|---|---|---|---|---|",
        "| a | retrieval | image_retrieval_recall@1 | 30.0 (global_step3) | 1.0 (chance) "
        "| 40.0 (global_step2) | -25.0% regressed |", ""])


def test_report_is_one_page_that_leads_with_the_headline_in_percent(tmp_path):
    runs = write_runs(tmp_path / "runs")
    out = tmp_path / "nightly"
    render_report(results_table(), out, 0.05, {"a": runs / "a", "b": runs / "b"})
    page = Page((out / "report.html").read_text())
    (first, headline), (second, table) = page.tables  # no failures: no table
    assert first == "headline" and headline == HEADLINE_ROWS
    assert second == "all" and [row[:3] for row in table] == [
        ["run", "benchmark", "metric"], ["a", "retrieval", R1], ["a", "vqa", "overall"],
        ["a", "vqa", "yes/no"], ["b", "retrieval", R1], ["b", "compositionality", "mean/itc"],
        ["b", "compositionality", "drop/itc"]]
    assert table[3][3:] == ["70.0 (global_step3)", "— (majority has no value for this metric)",
                            "70.0 (global_step2)", "+0.0%"]  # a row recorded without a baseline
    # Self-contained: both grids (headline metrics, training curves) inline, no other file
    assert page.links == ["#failures"] + [page.links[1], page.links[2]]
    for link in page.links[1:]:
        assert base64.b64decode(link.removeprefix("data:image/png;base64,"))[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "summary.md"]
    assert "nan" not in "".join(page.text).lower()
    assert (out / "summary.md").read_text().startswith("## vlp nightly: **1 regression(s)**")


def test_headline_plots_start_at_zero_and_reach_100_or_the_next_50_above_the_data():
    from vlp.pipeline.eval.nightly.figures import headline_panels

    results = results_table()
    caption = results[results["metric"] == "overall"].assign(
        benchmark="caption", task="caption", metric="CIDEr", value=[1.2, 2.2, 2.51],
        baseline=2.0, baseline_name="retrieval")
    results = pd.concat([results, caption], ignore_index=True)
    table = shown_table(results, 0.05)
    panels = {p.title: p for p in headline_panels(results, table[table["metric"].isin(
        [R1, "CIDEr"])])}
    r1 = panels["retrieval\ntext→image R@1"]
    assert r1.lines["a"] == ([1.0, 2.0, 3.0], pytest.approx([10.0, 40.0, 30.0]))
    assert r1.ylim == (0.0, 100.0) and r1.baseline == ("chance", 1.0)
    cider = panels["caption\nCIDEr (x100)"]
    assert cider.lines["a"][1] == pytest.approx([120.0, 220.0, 251.0])
    assert cider.ylim == (0.0, 300.0) and cider.baseline == ("retrieval", 200.0)


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
    assert [(r["run"], r["metric"], r["latest"]) for r in printed["regressions"]] == [
        ("a", R1, 0.30)]  # the evaluator's value, as in results.parquet
    assert (runs / "nightly" / "summary.md").exists()
    assert nightly_cli(runs, "--fail-on-regression") == 4
    assert nightly_cli(runs, "--fail-on-regression", "--regression-margin", "0.3") == 0
    capsys.readouterr()
    assert nightly_cli(runs, "--regression-margin", "5") == 2
    assert "--regression-margin must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed "
                    "(launch_scripts/report_screenshot.sh installs it)")
def test_report_renders_in_headless_chromium_from_the_file_alone(tmp_path):
    """The screenshot script renders a copy of the page alone in a folder, as someone it was
    mailed to opens it; Chromium's DOM holds the headline table first."""
    runs = write_runs(tmp_path / "runs")
    report = render_report(results_table(), tmp_path / "nightly", 0.05,
                           {"a": runs / "a", "b": runs / "b"})
    shot = tmp_path / "report.png"
    done = subprocess.run(["bash", "launch_scripts/report_screenshot.sh", str(report), str(shot),
                           "1200x900"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from PIL import Image

    assert Image.open(shot).size == (1200, 900)
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", report.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert Page(dom.stdout).tables[0] == ("headline", HEADLINE_ROWS)


def latest_vs_best(rows):
    """A summary table of (metric, latest, best) rows of one run."""
    return pd.DataFrame([{"run": "r", "benchmark": "b", "task": "b", "metric": metric,
                          "latest tag": "s2", "latest": latest, "best tag": "s1", "best": best}
                         for metric, latest, best in rows])


def test_the_margin_is_a_share_of_the_best_values_size_and_a_drop_to_it_passes():
    flagged = flag_regressions(latest_vs_best([
        ("at the margin", 0.75, 1.0), ("past it", 0.7, 1.0),
        ("negative best", -2.4, -2.0),  # 20% below; the margin is 0.5 below -2
        ("zero best", -1.0, 0.0)]), margin=0.25)
    assert flagged["regressed"].tolist() == [False, True, False, True]
    assert flagged["change"].tolist() == pytest.approx([-0.25, -0.3, -0.2, 0.0])
    assert regression_records(flagged) == [
        {"run": "r", "benchmark": "b", "metric": metric, "latest tag": "s2", "latest": latest,
         "best tag": "s1", "best": best, "change": change}
        for metric, latest, best, change in [("past it", 0.7, 1.0, pytest.approx(-0.3)),
                                             ("zero best", -1.0, 0.0, 0.0)]]


def test_no_results_flag_nothing():
    flagged = flag_regressions(summary_table(results_table().iloc[:0]), 0.05)
    assert flagged.empty and flagged.dtypes[["change", "regressed"]].tolist() == [
        "float64", "bool"]
    assert regression_records(flagged) == []


def test_the_margin_is_a_fraction_below_one():
    assert check_margin(0.0) == 0.0 and check_margin(0.99) == 0.99
    for margin in (1.0, -0.01):
        with pytest.raises(UserError, match=rf"--regression-margin must be in \[0, 1\) \(a "
                                            rf"fraction of the best value\), got {margin}"):
            check_margin(margin)


def test_markdown_summary_without_regressions_ends_with_the_counts():
    lines = markdown_summary(shown_table(results_table(), margin=0.5), 0.5, failures=0).split("\n")
    assert lines[0] == "## vlp nightly: no regressions" and lines[1] == ""
    assert lines[-2:] == [
        "All values in percent; caption metrics x100 as papers quote them (CIDEr 152.5 for the "
        "COCO tools' 1.525). 6 metric(s) compared with their run's best; a regression is a "
        "latest value more than 50% below it. Failed evaluations: 0.", ""]


def test_a_task_without_a_unit_is_refused_by_name():
    from vlp.pipeline.eval.nightly.headline import scale

    with pytest.raises(UserError) as refused:
        scale("segmentation")
    assert str(refused.value) == ("results name task 'segmentation', which the report has no "
                                  f"unit for; known tasks: {sorted(SCALE)}")


def test_a_shown_number_has_one_decimal_or_is_a_dash():
    from vlp.pipeline.eval.nightly.headline import number

    assert (number(12.345), number(float("nan")), number(None)) == ("12.3", "—", "—")


def test_a_benchmark_without_its_headline_metric_or_of_an_unknown_task_has_no_headline_row():
    from vlp.pipeline.eval.nightly.headline import is_headline

    table = pd.DataFrame({"run": ["r"] * 4, "benchmark": ["a", "a", "b", "c"],
                          "task": ["retrieval", "retrieval", "other", "vqa"],
                          "metric": ["odd_metric", "another", HEADLINE["retrieval"][0],
                                     HEADLINE["vqa"][0]]}, index=[7, 3, 9, 1])
    headline = is_headline(table)
    assert headline.tolist() == [False, False, False, True]
    assert headline.index.tolist() == [7, 3, 9, 1]  # a mask for the table as it is indexed


def test_a_metric_without_a_label_is_shown_by_its_name():
    from vlp.pipeline.eval.nightly.headline import label

    assert (label("overall"), label("odd_metric")) == ("accuracy", "odd_metric")


def test_the_reading_order_keeps_the_columns_and_numbers_the_rows_afresh():
    from vlp.pipeline.eval.nightly.headline import reading_order

    table = pd.DataFrame({"run": ["r", "r"], "benchmark": ["b", "a"], "task": ["vqa", "vqa"],
                          "metric": ["other", HEADLINE["vqa"][0]]}, index=[5, 2])
    ordered = reading_order(table)
    assert list(ordered.columns) == list(table.columns) and ordered.index.tolist() == [0, 1]
    assert ordered["benchmark"].tolist() == ["a", "b"]
