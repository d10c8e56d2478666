"""Shared benchmark plumbing: interleaved timing, medians, the environment record, tables, JSON.

Timing rule for every benchmark: the variants being compared run *interleaved* (A, B, A, B, ...)
in one process, so a noisy neighbour on a shared machine slows both sides alike; each variant's
figure is the median over `repeats`, and a speed-up is the ratio of those medians.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vlp.pipeline.data.files import write_text_atomic

OUT_DIR = Path("bench_out")
DEFAULT_VOCAB = 30522  # BERT's, for configs without a vocabulary (tiny)
# --quick's shrunk model (bench train and zero); the keys in QUICK_CAPS only ever shrink a model
QUICK_MODEL = {"depth": 2, "width": 64, "heads": 2, "fusion_layers": 1, "embed_dim": 32,
               "image_size": 32, "patch_size": 8, "max_text_len": 16, "vocab_size": 1000}
QUICK_CAPS = ("width", "heads", "max_text_len", "vocab_size")
# A JSON-lines file that receives each figure the moment it is measured (see record_figure)
FIGURES_ENV = "VLP_FIGURES"


def load_model_config(name, vocab: int = DEFAULT_VOCAB, overrides: dict | None = None,
                      quick: bool = False):
    """models.config.load_config(name, **overrides), with `vocab` as the vocabulary when neither
    the config nor the overrides set one; `quick` then shrinks it to QUICK_MODEL."""
    from vlp.models.config import load_config

    overrides = dict(overrides or {})
    config = load_config(name, **overrides)
    if config.vocab_size is None:
        config = load_config(name, **{"vocab_size": vocab, **overrides})
    if quick:
        shrunk = {k: min(v, getattr(config, k)) if k in QUICK_CAPS else v
                  for k, v in QUICK_MODEL.items()}
        config = load_config(name, **{**overrides, "vocab_size": config.vocab_size, **shrunk})
    return config


def worker_launch_command(module: str, worker_args: list[str], ranks: int) -> list[str]:
    """Training's own deepspeed launcher line on this node, with `module` in place of the training
    module (benchmarks run their workers exactly as training runs its ranks)."""
    from vlp.pipeline.distributed import free_port
    from vlp.pipeline.train.launch import TRAIN_MODULE, launcher_command

    launcher = launcher_command(None, [], nproc=ranks, master_port=free_port())
    assert launcher[-1] == TRAIN_MODULE, launcher
    return [*launcher[:-1], module, *worker_args]


def median(values) -> float:
    return float(statistics.median(values))


def synchronize(device: str) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def record_figure(bench: str, **fields) -> None:
    """Append one figure as a JSON line to the file $VLP_FIGURES names (nothing when unset),
    closed at once: a benchmark killed by a time limit keeps every figure it had measured.
    Workers started through the launcher inherit the variable and append to the same file."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    line = json.dumps({"bench": bench, "time": round(time.time(), 3), **fields},
                      default=_jsonable)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def interleaved_timings(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        device: str = "cpu",
                        on_time: Callable[[str, int, float], None] | None = None,
                        ) -> dict[str, dict[str, list[float]]]:
    """Run each variant `warmup` times, then `repeats` rounds of one call each, interleaved.

    The order rotates every round, so no variant always runs right after the same neighbour.
    Returns {name: {"wall_s": [...], "cpu_s": [...]}}, entry r from round r. Wall time, what the
    figures use, is measured from an idle device to the end of the call's work on `device`.
    On the CPU, "cpu_s" is this process's CPU time (all threads; OpenMP threads that spin while
    waiting count too); on a GPU it means nothing and is left empty. `on_time(name, round,
    wall seconds)` is called after every timed call (e.g. to record_figure it at once).
    """
    on_cpu = not str(device).startswith("cuda")
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = {name: {"wall_s": [], "cpu_s": []} for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[name]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            fn()
            synchronize(device)
            times[name]["wall_s"].append(time.perf_counter() - wall0)
            if on_cpu:
                times[name]["cpu_s"].append(time.process_time() - cpu0)
            if on_time is not None:
                on_time(name, r, times[name]["wall_s"][-1])
    return times


def median_or_none(values) -> float | None:
    return median(values) if values else None


def round_ratio_median(times: dict, numerator: str, denominator: str,
                       key: str = "wall_s") -> float:
    """Median over rounds of time[numerator] / time[denominator]: a cross-check of the ratio of
    medians that cancels load changes slower than one round."""
    pairs = zip(times[numerator][key], times[denominator][key])
    return median([a / b for a, b in pairs])


def describe_device(device: str = "cpu") -> str:
    """'2-core CPU, no GPU' or '16-core CPU, NVIDIA H100 80GB HBM3'."""
    import torch

    cores = os.cpu_count()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{cores}-core CPU, {torch.cuda.get_device_name()}"
    gpu = "GPU present, unused" if torch.cuda.is_available() else "no GPU"
    return f"{cores}-core CPU, {gpu}"


def environment(device: str = "cpu") -> dict:
    """What a reader needs to compare two result files: when, where, which software."""
    import torch

    env = {
        "date": datetime.date.today().isoformat(),
        "device": describe_device(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": "vlp " + " ".join(sys.argv[1:]) if sys.argv else "",
    }
    if hasattr(os, "getloadavg"):
        env["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    return env


def resolve_device(requested: str | None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            from vlp.pipeline.data.errors import UserError

            raise UserError(f"--device {requested}: no CUDA device is visible to torch")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def out_path(args, name: str) -> Path:
    return Path(args.out) if args.out else OUT_DIR / f"{name}.json"


def write_json(path: Path, payload: dict) -> Path:
    """Write a benchmark's JSON atomically (numpy and torch values as plain numbers)."""
    path = Path(path)
    write_text_atomic(path, json.dumps(payload, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def format_table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A fixed-width text table; floats get 3 significant decimals' worth of precision."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(h.rjust(w) if i else h.ljust(w)
                           for i, (h, w) in enumerate(zip(headers, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def repeats_for(args, full: int, quick: int = 1) -> int:
    if args.repeats:
        return args.repeats
    return quick if args.quick else full


def verdict(value: float, goal: float, higher_is_better: bool = True) -> dict:
    """{"value", "goal", "met"} for a goal stated in the benchmark's output."""
    met = value >= goal if higher_is_better else value <= goal
    return {"value": value, "goal": goal, "met": bool(met),
            "direction": ">=" if higher_is_better else "<="}
