"""Regression flags for the nightly job: a metric whose latest value fell more than a margin below
its run's best, and a short Markdown summary to paste into chat or a CI comment.

The margin is relative to the best value (0.05: more than 5% below it), so one setting serves
retrieval recalls (fractions) and VQA accuracies (percentages). Every metric is higher-is-better.
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import atomic_path

DEFAULT_MARGIN = 0.05


def check_margin(margin: float) -> float:
    if not 0 <= margin < 1:
        raise UserError(f"--regression-margin must be in [0, 1) (a fraction of the best value), "
                        f"got {margin}")
    return margin


def flag_regressions(summary: pd.DataFrame, margin: float) -> pd.DataFrame:
    """The latest-vs-best table (report.summary_table) with `change` (latest / best - 1) and
    `regressed` (latest more than `margin` of |best| below best)."""
    if summary.empty:
        return summary.assign(change=pd.Series(dtype="float64"),
                              regressed=pd.Series(dtype="bool"))
    best, latest = summary["best"], summary["latest"]
    change = (latest - best) / best.abs().where(best != 0)
    return summary.assign(change=change.fillna(0.0),
                          regressed=latest < best - margin * best.abs())


def regression_records(flagged: pd.DataFrame) -> list[dict]:
    """The regressed rows as plain dicts (the nightly command's JSON summary)."""
    columns = ["run", "benchmark", "metric", "latest tag", "latest", "best tag", "best", "change"]
    return flagged.loc[flagged["regressed"], columns].to_dict("records")


def markdown_summary(flagged: pd.DataFrame, margin: float, failures: int) -> str:
    """A few lines: the verdict, one table row per regressed metric, the failure count."""
    regressed = flagged[flagged["regressed"]]
    verdict = f"**{len(regressed)} regression(s)**" if len(regressed) else "no regressions"
    lines = [f"## vlp nightly: {verdict}", "",
             f"{len(flagged)} metric(s) compared with their run's best; a regression is a latest "
             f"value more than {margin:.0%} below it. Failed evaluations: {failures}.", ""]
    if len(regressed):
        lines += ["| run | benchmark | metric | latest | best | change |",
                  "|---|---|---|---:|---:|---:|"]
        for r in regressed.to_dict("records"):
            lines.append(f"| {r['run']} | {r['benchmark']} | {r['metric']} "
                         f"| {r['latest']:.4g} ({r['latest tag']}) "
                         f"| {r['best']:.4g} ({r['best tag']}) | {r['change']:+.1%} |")
        lines.append("")
    return "\n".join(lines)


def write_markdown_summary(text: str, out_dir: Path) -> Path:
    path = Path(out_dir) / "summary.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def flagged_table_html(flagged: pd.DataFrame) -> str:
    """The latest-vs-best table with the change column; regressed rows highlighted."""
    if flagged.empty:
        return "<p>None.</p>"
    columns = ["run", "benchmark", "metric", "latest tag", "latest", "best tag", "best",
               "change", "baseline"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for record in flagged.to_dict("records"):
        cells = []
        for column in columns:
            value = record[column]
            if column == "change":
                text = f"{value:+.1%}" + (" regressed" if record["regressed"] else "")
            elif isinstance(value, float):
                text = f"{value:.4g}"
            else:
                text = str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        css = ' class="regressed"' if record["regressed"] else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return (f'<table class="results"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")
