"""Regression flags for the nightly job: a metric whose latest value fell more than a margin below
its run's best, and a short Markdown summary to paste into chat or a CI comment (the headline
first, then the regressions).

The margin is relative to the best value (0.05: more than 5% below it), so one setting serves
every unit. Every metric is higher-is-better.
"""
from __future__ import annotations

import pandas as pd

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.nightly import headline

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


def markdown_summary(table: pd.DataFrame, margin: float, failures: int) -> str:
    """The verdict, the headline table, a line on units and counts, and the regressed rows;
    `table` is the report's (flagged, in display units: report.shown_table)."""
    regressed = table[table["regressed"]]
    verdict = f"**{len(regressed)} regression(s)**" if len(regressed) else "no regressions"
    heads = table[headline.is_headline(table)]
    lines = [f"## vlp nightly: {verdict}", ""]
    lines += _markdown_table([headline.cells(r, headline=True) for r in heads.to_dict("records")])
    lines += [f"{headline.UNITS_NOTE} {len(table)} metric(s) compared with their run's best; a "
              f"regression is a latest value more than {margin:.0%} below it. Failed "
              f"evaluations: {failures}.", ""]
    lines += _markdown_table([headline.cells(r) for r in regressed.to_dict("records")])
    return "\n".join(lines)


def _markdown_table(rows: list[dict[str, str]]) -> list[str]:
    """The lines of a Markdown table and a blank line (none for no rows)."""
    if not rows:
        return []
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
            *("| " + " | ".join(row.values()) + " |" for row in rows), ""]
