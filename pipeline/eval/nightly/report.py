"""The nightly HTML report, one self-contained file to open, mail or post: the headline (one
metric per benchmark, headline.py) with its baseline, best and trend, a plot of each headline
metric against training step, the full latest-vs-best table (regressions highlighted,
regressions.py), each run's training curves (figures.py), a few generated captions beside their
images, and the failures.

Every value is shown in percent (caption metrics x100, headline.py). Plots and caption images are
inlined as data URIs (PNG grids; small JPEG thumbnails, an image that cannot be read, or that the
training loader would skip, is a note instead), so the page links to no other file. The page and
summary.md are written atomically.
"""
from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from vlp.pipeline.data.errors import BadData
from vlp.pipeline.data.files import write_text_atomic
from vlp.pipeline.data.transforms import decode_image
from vlp.pipeline.eval.nightly import figures, headline, regressions


def render_report(results: pd.DataFrame, out_dir: str | Path,
                  margin: float = regressions.DEFAULT_MARGIN,
                  run_dirs: dict[str, Path] | None = None,
                  captions: list[dict] | None = None) -> Path:
    """Write OUT/report.html and OUT/summary.md from the results and the runs' metrics.jsonl
    (`run_dirs`: run name -> folder); returns the HTML path.

    `captions`: per caption benchmark, {"run", "benchmark", "tag", "examples"} with the
    examples of its result JSON (image path, caption, retrieval baseline, references)."""
    out_dir = Path(out_dir)
    ok = results[results["status"] == "ok"]
    failures = results[results["status"] == "failed"]
    table = shown_table(ok, margin)
    heads = table[headline.is_headline(table)]
    regressed = int(table["regressed"].sum())
    page = _PAGE.format(
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        checkpoints=len(results[["run", "tag"]].drop_duplicates()),
        verdict=_verdict(regressed, len(failures), margin),
        units=headline.UNITS_NOTE,
        headline=_html_table([headline.cells(r, headline=True) for r in heads.to_dict("records")],
                             heads["regressed"].tolist()),
        headline_grid=_grid_html(figures.draw_grid(figures.headline_panels(ok, heads)),
                                 "headline metrics against training step"),
        table=_html_table([headline.cells(r) for r in table.to_dict("records")],
                          table["regressed"].tolist()),
        training_grid=_grid_html(figures.draw_grid(figures.training_panels(run_dirs or {})),
                                 "training curves"),
        captions="\n".join(_caption_section(c) for c in captions or []) or "<p>None.</p>",
        failures=_html_table([{"run": r["run"], "tag": r["tag"], "benchmark": r["benchmark"],
                               "time": f"{r['time']:%Y-%m-%d %H:%M UTC}", "error": r["error"]}
                              for r in failures.to_dict("records")]),
    )
    path = out_dir / "report.html"
    write_text_atomic(path, page)
    write_text_atomic(out_dir / "summary.md",
                      regressions.markdown_summary(table, margin, len(failures)))
    return path


def shown_table(ok: pd.DataFrame, margin: float) -> pd.DataFrame:
    """The latest-vs-best table with regression flags, in display units and reading order."""
    flagged = regressions.flag_regressions(summary_table(ok), margin)
    return headline.reading_order(headline.in_display_units(flagged))


def _verdict(regressed: int, failed: int, margin: float) -> str:
    css = "bad" if regressed or failed else "good"
    return (f'<p class="verdict {css}">{regressed} regression(s) (a latest value more than '
            f'{margin:.0%} below its run\'s best); <a href="#failures">{failed} failed '
            f"evaluation(s)</a>.</p>")


def _grid_html(png: bytes | None, what: str) -> str:
    if png is None:
        return f"<p>No {what} yet.</p>"
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img class="grid" src="data:image/png;base64,{encoded}" alt="{what}">'


SUMMARY_COLUMNS = ["run", "benchmark", "task", "metric", "latest tag", "latest", "best tag",
                   "best", "baseline", "baseline_name", "trend"]


def summary_table(ok: pd.DataFrame) -> pd.DataFrame:
    """Per run/benchmark/metric (in the results' order): the latest checkpoint's value and
    baseline, the best value and its tag, and the values of every checkpoint (`trend`, in
    checkpoint order), as the evaluators report them."""
    records = []
    for (run, benchmark, metric), rows in ok.groupby(["run", "benchmark", "metric"], sort=False):
        ordered = checkpoint_order(rows)
        latest, best = ordered.iloc[-1], rows.loc[rows["value"].idxmax()]
        records.append({
            "run": run, "benchmark": benchmark, "task": latest["task"], "metric": metric,
            "latest tag": latest["tag"], "latest": latest["value"],
            "best tag": best["tag"], "best": best["value"],
            "baseline": latest["baseline"], "baseline_name": latest["baseline_name"],
            "trend": ordered["value"].tolist(),
        })
    return pd.DataFrame(records, columns=SUMMARY_COLUMNS)


def checkpoint_order(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows by step; exports (no step) after the tags, by evaluation time."""
    ordered = rows.assign(_step=rows["step"].astype("float64").fillna(float("inf")))
    return ordered.sort_values(["_step", "time"]).drop(columns="_step")


def latest_row(rows: pd.DataFrame) -> pd.Series:
    """The row of the latest checkpoint (checkpoint_order's last)."""
    return checkpoint_order(rows).iloc[-1]


def _caption_section(section: dict) -> str:
    rows = []
    for example in section["examples"]:
        references = "<br>".join(_e(r) for r in example["references"][:3])
        rows.append(f"<tr><td>{_thumbnail(example['image'])}</td>"
                    f"<td><b>{_e(example['caption'])}</b></td><td>{_e(example['retrieval'])}</td>"
                    f"<td>{references}</td></tr>")
    return (f"<h3>{_e(section['run'])} / {_e(section['tag'])}: {_e(section['benchmark'])}</h3>"
            '<table class="results"><tr><th>image</th><th>generated</th>'
            "<th>retrieval baseline</th><th>references (first 3)</th></tr>"
            + "".join(rows) + "</table>")


def _thumbnail(path: str, size: int = 96) -> str:
    """An <img> with the image inlined as a small JPEG, or a note saying why it is left out (a
    missing file, or what the training loader skips: a decompression bomb, undecodable bytes)."""
    try:
        image = decode_image(Path(path).read_bytes(), size)
    except OSError as exc:
        return f"(image skipped: cannot read {_e(path)}: {_e(exc.strerror or exc)})"
    except BadData as exc:
        return f"(image skipped: {exc.kind}: {_e(exc)})"
    image.thumbnail((size, size))
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=85)
    encoded = base64.b64encode(data.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{encoded}" alt="{_e(Path(path).name)}">'


def _e(text) -> str:
    return html.escape(str(text))


def _html_table(rows: list[dict[str, str]], regressed: list[bool] | None = None) -> str:
    """Rows of shown cells as a table; regressed rows highlighted."""
    if not rows:
        return "<p>None.</p>"
    head = "".join(f"<th>{_e(c)}</th>" for c in rows[0])
    body = []
    for i, row in enumerate(rows):
        css = ' class="regressed"' if regressed and regressed[i] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{_e(v)}</td>" for v in row.values()) + "</tr>")
    return (f'<table class="results"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vlp nightly evaluation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px;
        padding: 0 1em; color: #222; }}
p.meta {{ color: #555; }}
p.verdict {{ font-size: 1.1em; padding: 0.4em 0.8em; border-radius: 4px; }}
p.verdict.good {{ background: #e6f4ea; }}
p.verdict.bad {{ background: #fde2e1; }}
table.results {{ border-collapse: collapse; font-size: 0.9em; font-variant-numeric: tabular-nums; }}
table.results td, table.results th {{ padding: 0.25em 0.7em; border-bottom: 1px solid #ddd;
                                      text-align: left; vertical-align: top; }}
section.metrics td {{ white-space: nowrap; }}
#headline td:nth-child(4) {{ font-weight: bold; }}
#headline td:nth-child(3) {{ white-space: normal; min-width: 8em; }}
#headline td:nth-child(8) {{ white-space: normal; min-width: 12em; }}
tr.regressed td {{ background: #fde2e1; }}
tr.regressed td:nth-child(7) {{ color: #b3261e; font-weight: bold; }}
img.grid {{ max-width: 100%; }}
</style></head><body>
<h1>vlp nightly evaluation</h1>
<p class="meta">Generated {generated}; {checkpoints} checkpoint(s) evaluated. {units}</p>
{verdict}
<section id="headline" class="metrics">
<h2>Headline</h2>
<p>Each benchmark's headline metric at its run's latest checkpoint, beside its baseline, its run's
best, and its values at the last checkpoints (oldest first).</p>
{headline}
</section>
<h2>Headline metrics against training step</h2>
{headline_grid}
<section id="all" class="metrics">
<h2>All metrics</h2>
<p>Every metric at the latest checkpoint against its run's best; regressions highlighted.</p>
{table}
</section>
<h2>Training curves</h2>
{training_grid}
<h2>Generated captions (latest checkpoint)</h2>
{captions}
<h2 id="failures">Failures</h2>
{failures}
</body></html>
"""
