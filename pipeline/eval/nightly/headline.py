"""What a reader of the nightly report looks at first: one headline metric per benchmark, and
every value in one unit.

Units: the evaluators report VQA accuracy in percent (the official evaluator) and everything
else as fractions (CLIP_benchmark's recalls and accuracies, the COCO caption tools, the
compositionality pairs). The report and summary.md show every value x100: percent, and caption
metrics as papers quote them (CIDEr 152.5 for the tools' 1.525). results.parquet, the result
JSONs, TensorBoard and the command's JSON keep the evaluators' values.
"""
from __future__ import annotations

import pandas as pd

from vlp.pipeline.data.errors import UserError

# task -> factor from the evaluator's value to the value shown
SCALE = {"retrieval": 100.0, "vqa": 1.0, "caption": 100.0, "zeroshot": 100.0,
         "linear_probe": 100.0, "compositionality": 100.0}
# task -> its headline metric, the first of these that the benchmark reports; the tasks in the
# order the headline lists them
HEADLINE = {
    "retrieval": ("image_retrieval_recall@1",),
    "vqa": ("overall",),
    "caption": ("CIDEr",),
    "zeroshot": ("acc1",),
    "linear_probe": ("acc1",),
    "compositionality": ("mean/itm", "mean/itc"),
}
LABELS = {"image_retrieval_recall@1": "text→image R@1", "overall": "accuracy",
          "CIDEr": "CIDEr (x100)", "acc1": "top-1 accuracy",
          "mean/itm": "true over edited caption, mean (ITM)",
          "mean/itc": "true over edited caption, mean (ITC)"}
TREND_POINTS = 5  # checkpoints shown in a headline row's trend
UNITS_NOTE = ("All values in percent; caption metrics x100 as papers quote them "
              "(CIDEr 152.5 for the COCO tools' 1.525).")


def scale(task: str) -> float:
    """The factor from the evaluator's value of `task` to the value shown."""
    if task not in SCALE:
        raise UserError(f"results name task {task!r}, which the report has no unit for; "
                        f"known tasks: {sorted(SCALE)}")
    return SCALE[task]


def in_display_units(table: pd.DataFrame) -> pd.DataFrame:
    """The latest-vs-best table (report.summary_table) with latest, best, baseline and the
    trend's values x the task's SCALE ('change' is relative: unchanged)."""
    factors = table["task"].map(scale).astype("float64")
    shown = table.assign(latest=table["latest"] * factors, best=table["best"] * factors,
                         baseline=table["baseline"] * factors)
    shown["trend"] = [[v * f for v in values] for values, f in zip(table["trend"], factors)]
    return shown


def is_headline(table: pd.DataFrame) -> pd.Series:
    """True for the rows of each (run, benchmark) that hold its headline metric."""
    chosen = {}
    for (run, benchmark), rows in table.groupby(["run", "benchmark"], sort=False):
        present = set(rows["metric"])
        chosen[run, benchmark] = next((m for m in HEADLINE.get(rows["task"].iloc[0], ())
                                       if m in present), None)
    return pd.Series([chosen[run, benchmark] == metric for run, benchmark, metric
                      in zip(table["run"], table["benchmark"], table["metric"])],
                     index=table.index, dtype="bool")


def reading_order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows by run, task (HEADLINE's order), benchmark, headline metric first, then the
    evaluator's order of metrics."""
    rank = {task: i for i, task in enumerate(HEADLINE)}
    keys = pd.DataFrame({"run": table["run"], "benchmark": table["benchmark"],
                         "task": table["task"].map(rank).fillna(len(rank)),
                         "headline": ~is_headline(table), "order": range(len(table))},
                        index=table.index)
    order = keys.sort_values(["run", "task", "benchmark", "headline", "order"]).index
    return table.loc[order].reset_index(drop=True)


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def number(value: float) -> str:
    """A shown value: one decimal, or an em dash for none."""
    return "—" if pd.isna(value) else f"{value:.1f}"


def cells(row: dict, headline: bool = False) -> dict[str, str]:
    """One row of the latest-vs-best table as shown (in the report and summary.md): the
    headline's rows name the metric by its label and add the trend over the last checkpoints."""
    shown = {"run": row["run"], "benchmark": row["benchmark"],
             "metric": label(row["metric"]) if headline else row["metric"],
             "latest": f"{number(row['latest'])} ({row['latest tag']})",
             "baseline": _baseline_text(row),
             "best": f"{number(row['best'])} ({row['best tag']})",
             "vs best": f"{row['change']:+.1%}" + (" regressed" if row["regressed"] else "")}
    if headline:
        shown["trend"] = " → ".join(number(v) for v in row["trend"][-TREND_POINTS:])
    return shown


def _baseline_text(row: dict) -> str:
    """'0.1 (chance)', or the reason there is none."""
    if pd.isna(row["baseline"]):
        return f"— ({row['baseline_name']} has no value for this metric)"
    return f"{number(row['baseline'])} ({row['baseline_name']})"
