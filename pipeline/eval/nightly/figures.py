"""The nightly report's figures as small multiples, each grid one PNG that the report inlines.

    headline grid   each benchmark's headline metric (headline.py) against training step, one
                    line per run, its baseline dashed; the y axis from 0 to 100 (to the next 50
                    above the data for CIDEr x100), so a change looks as large as it is
    training grid   each run's metrics.jsonl curves (losses, lr, samples/s)

One image per grid keeps every panel the same size and the runs the same colours across panels,
so a reader compares shapes at a glance (Tufte's small multiples).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vlp.pipeline.eval.nightly.headline import label, scale  # noqa: E402

TRAINING_CURVES = ("loss/total", "loss/itc", "loss/itm", "loss/mlm", "train/lr",
                   "perf/samples_per_s")
COLUMNS = 4


@dataclass
class Panel:
    title: str
    lines: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # run -> x, y
    baseline: tuple[str, float] | None = None
    ylim: tuple[float, float] | None = None  # None: fitted to the data


def headline_panels(ok: pd.DataFrame, headline: pd.DataFrame) -> list[Panel]:
    """One panel per (benchmark, metric) of `headline` (rows of the latest-vs-best table in
    display units), its lines from the ok result rows; exports have no step: left out."""
    panels = []
    for (benchmark, metric), heads in headline.groupby(["benchmark", "metric"], sort=False):
        rows = ok[(ok["benchmark"] == benchmark) & (ok["metric"] == metric)]
        factor = scale(heads["task"].iloc[0])
        panel = Panel(f"{benchmark}\n{label(metric)}")
        for run, run_rows in rows.dropna(subset=["step"]).sort_values("step").groupby("run"):
            panel.lines[str(run)] = (run_rows["step"].astype(float).tolist(),
                                     (run_rows["value"] * factor).tolist())
        if not panel.lines:
            continue
        baseline = heads.dropna(subset=["baseline"])
        if len(baseline):
            panel.baseline = (baseline["baseline_name"].iloc[-1], baseline["baseline"].iloc[-1])
        peak = max([y for _, ys in panel.lines.values() for y in ys]
                   + [panel.baseline[1] if panel.baseline else 0.0])
        panel.ylim = (0.0, 100.0 if peak <= 100 else math.ceil(peak / 50) * 50.0)
        panels.append(panel)
    return panels


def read_training_metrics(run_dir: Path) -> pd.DataFrame:
    """A run's metrics.jsonl by step; a step logged again after a resume keeps its last record.
    Lines cut short by a killed job are skipped."""
    records = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records[record["step"]] = record
    return pd.DataFrame(sorted(records.values(), key=lambda r: r["step"]))


def training_panels(run_dirs: dict[str, Path]) -> list[Panel]:
    """One panel per training curve that some run logged, one line per run."""
    metrics = {run: read_training_metrics(path) for run, path in sorted(run_dirs.items())}
    panels = []
    for name in TRAINING_CURVES:
        panel = Panel(name)
        for run, frame in metrics.items():
            if name in frame:
                rows = frame.dropna(subset=[name])
                panel.lines[run] = (rows["step"].tolist(), rows[name].tolist())
        if panel.lines:
            panels.append(panel)
    return panels


def draw_grid(panels: list[Panel], xlabel: str = "training step") -> bytes | None:
    """The panels as one PNG grid (None when there is nothing to draw)."""
    if not panels:
        return None
    runs = sorted({run for panel in panels for run in panel.lines})
    colours = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    cols = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
    try:
        for ax, panel in zip(axes.flat, panels):
            for run, (x, y) in panel.lines.items():
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3,
                        color=colours[run], label=run)
            if panel.baseline is not None:
                ax.axhline(panel.baseline[1], linestyle="--", color="grey", linewidth=1)
                ax.text(0.01, panel.baseline[1], panel.baseline[0], fontsize=7, color="grey",
                        va="bottom", transform=ax.get_yaxis_transform())
            if panel.ylim is not None:
                ax.set_ylim(*panel.ylim)
            ax.set_title(panel.title, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        handles = [plt.Line2D([], [], color=colours[run], label=run) for run in runs]
        if any(panel.baseline for panel in panels):
            handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="baseline"))
        fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6),
                   fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.7 * rows)))
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=90)
    finally:
        plt.close(fig)
    return png.getvalue()
