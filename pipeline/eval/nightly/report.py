"""The nightly HTML report: latest vs best with regressions highlighted (regressions.py), the
eval metrics and each run's training curves as small multiples (figures.py), failures, and a few
generated captions beside their images.

Per-metric plots at full size are PNGs (matplotlib's Agg backend, no display needed) in
OUT/plots/, one line per run and the primary baseline (retrieval: chance, VQA: majority answer,
captioning: retrieved training caption) as a dashed line. The table lists, per run, benchmark and
metric, the latest checkpoint's value, the best so far (all metrics are higher-is-better), the
change and the baseline. Caption examples come from each caption benchmark's latest result, their
images inlined as small JPEG thumbnails so the page stands alone (an image that cannot be read,
or that the training loader would skip, is a note instead). Every file is written
atomically.
"""
from __future__ import annotations

import base64
import html
import io
import re
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vlp.pipeline.data.errors import BadData  # noqa: E402
from vlp.pipeline.data.files import atomic_path  # noqa: E402
from vlp.pipeline.data.transforms import decode_image  # noqa: E402
from vlp.pipeline.eval.nightly import figures, regressions  # noqa: E402


def render_report(results: pd.DataFrame, out_dir: str | Path,
                  margin: float = regressions.DEFAULT_MARGIN,
                  run_dirs: dict[str, Path] | None = None,
                  captions: list[dict] | None = None) -> Path:
    """Write OUT/report.html, OUT/summary.md, OUT/plots/ and OUT/grids/ from the results and the
    runs' metrics.jsonl (`run_dirs`: run name -> folder); returns the HTML path.

    `captions`: per caption benchmark, {"run", "benchmark", "tag", "examples"} with the
    examples of its result JSON (image path, caption, retrieval baseline, references)."""
    out_dir = Path(out_dir)
    ok = results[results["status"] == "ok"]
    flagged = regressions.flag_regressions(summary_table(ok), margin)
    grids = [figures.draw_grid(figures.eval_panels(ok), out_dir / "grids" / "eval_grid.png"),
             figures.draw_grid(figures.training_panels(run_dirs or {}),
                               out_dir / "grids" / "training_grid.png")]
    sections = []
    for (benchmark, metric), rows in ok.groupby(["benchmark", "metric"], sort=True):
        image = plot_metric(rows, benchmark, metric, out_dir / "plots")
        sections.append(f'<figure><img src="plots/{image.name}" alt="{_e(benchmark)} {_e(metric)}">'
                        f"<figcaption>{_e(benchmark)}: {_e(metric)}</figcaption></figure>")
    failures = results[results["status"] == "failed"]
    page = _PAGE.format(
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        checkpoints=len(results[["run", "tag"]].drop_duplicates()),
        margin=f"{margin:.0%}", regressed=int(flagged["regressed"].sum()),
        table=regressions.flagged_table_html(flagged),
        eval_grid=_grid_html(grids[0], "eval metrics"),
        training_grid=_grid_html(grids[1], "training curves"),
        plots="\n".join(sections),
        failures=_html_table(failures[["run", "tag", "benchmark", "time", "error"]]),
        captions="\n".join(_caption_section(c) for c in captions or []) or "<p>None.</p>",
    )
    path = out_dir / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    regressions.write_markdown_summary(
        regressions.markdown_summary(flagged, margin, len(failures)), out_dir)
    return path


def _grid_html(path: Path | None, what: str) -> str:
    if path is None:
        return f"<p>No {what} yet.</p>"
    return f'<img class="grid" src="grids/{path.name}" alt="{what}">'


SUMMARY_COLUMNS = ["run", "benchmark", "metric", "latest tag", "latest", "best tag", "best",
                   "baseline"]


def summary_table(ok: pd.DataFrame) -> pd.DataFrame:
    """Per run/benchmark/metric: latest checkpoint's value, best value and its tag, baseline."""
    records = []
    for (run, benchmark, metric), rows in ok.groupby(["run", "benchmark", "metric"], sort=True):
        latest = latest_row(rows)
        best = rows.loc[rows["value"].idxmax()]
        records.append({
            "run": run, "benchmark": benchmark, "metric": metric,
            "latest tag": latest["tag"], "latest": latest["value"],
            "best tag": best["tag"], "best": best["value"],
            "baseline": f"{latest['baseline']:.4g} ({latest['baseline_name']})",
        })
    return pd.DataFrame(records, columns=SUMMARY_COLUMNS)


def latest_row(rows: pd.DataFrame) -> pd.Series:
    """The row of the latest checkpoint: highest step; exports (no step) rank after the tags,
    by evaluation time."""
    ordered = rows.assign(_step=rows["step"].astype("float64").fillna(float("inf")))
    return ordered.sort_values(["_step", "time"]).iloc[-1]


def plot_metric(rows: pd.DataFrame, benchmark: str, metric: str, plot_dir: Path) -> Path:
    """PNG of `metric` against step, one line per run, baseline dashed."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    try:
        for run, run_rows in rows.dropna(subset=["step"]).groupby("run"):
            run_rows = run_rows.sort_values("step")
            ax.plot(run_rows["step"].astype(float), run_rows["value"], marker="o", label=str(run))
        baseline = rows["baseline"].dropna()
        if len(baseline):
            ax.axhline(baseline.iloc[-1], linestyle="--", color="grey",
                       label=f"{rows['baseline_name'].iloc[-1]} baseline")
        ax.set(title=f"{benchmark}: {metric}", xlabel="training step", ylabel=metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = plot_dir / f"{_slug(benchmark)}__{_slug(metric)}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _e(text) -> str:
    return html.escape(str(text))


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p>None.</p>"
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", escape=True,
                         border=0, classes="results")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vlp nightly evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table.results {{ border-collapse: collapse; font-size: 0.9em; }}
table.results td, table.results th {{ padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }}
tr.regressed td {{ background: #fde2e1; }}
tr.regressed td:nth-child(8) {{ color: #b3261e; font-weight: bold; }}
img.grid {{ max-width: 100%; }}
figure {{ display: inline-block; margin: 0.5em; }}
</style></head><body>
<h1>vlp nightly evaluation</h1>
<p>Generated {generated}; {checkpoints} checkpoint(s) evaluated. Retrieval recalls are fractions
(CLIP_benchmark), VQA accuracies percentages (official evaluator), caption metrics as the COCO
caption evaluation reports them (fractions; CIDEr up to 10), classification accuracies fractions
(CLIP_benchmark).</p>
<h2>Latest vs best</h2>
<p>{regressed} regression(s): a latest value more than {margin} below its run's best
(highlighted).</p>
{table}
<h2>Metrics against training step</h2>
{eval_grid}
<h2>Training curves</h2>
{training_grid}
<details><summary>Each metric at full size</summary>
{plots}
</details>
<h2>Generated captions (latest checkpoint)</h2>
{captions}
<h2>Failures</h2>
{failures}
</body></html>
"""
