"""Typed training configuration: a YAML recipe plus `section.key=value` overrides.

Every key is a dataclass field with a documented default, so a misspelt key in a recipe or on
the command line is an error that names the key and the valid ones, never a silently ignored
setting.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the checkout, with ds_configs/


@dataclass
class ModelSection:
    name: str = "tiny"  # a named config in models/configs or a JSON path
    overrides: dict = field(default_factory=dict)  # ModelConfig fields to change
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0


@dataclass
class DataSection:
    shards: str = ""  # brace-expanded shard URLs; several sources separated by "::"
    weights: list | None = None  # per-source sampling weights (resampled mode)
    resampled: bool = False
    tokenizer: str = ""  # tokenizer.json, its directory, or a local HF tokenizer directory
    num_workers: int = 2
    shuffle_buffer: int = 1000
    mlm_probability: float = 0.15
    samples_per_epoch: int | None = None  # default: the shard manifest's total


@dataclass
class OptimSection:
    batch_size: int = 64  # per rank and micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0


@dataclass
class CheckpointSection:
    every_steps: int = 500
    keep_last: int = 3  # 0 keeps every checkpoint
    save_initial: bool = False  # also save the untrained weights as global_step0 (baselines)
    # auto: resume from `latest` when the run has one; latest: require it; latest-valid: the
    # newest checkpoint that passes validation; none: start fresh.
    resume: str = "auto"


@dataclass
class LoggingSection:
    every_steps: int = 10
    peak_tflops: float | None = None  # per rank; None: measured with a large matmul at start
    progress_bar: bool = True  # tqdm on rank 0 when attached to a terminal
    sample_keys: bool = False  # write the keys of every batch to samples/rank{R}.jsonl (audits)


@dataclass
class FaultSection:
    max_nonfinite_in_row: int = 5  # stop the run after this many skipped updates in a row
    # (tests) steps whose loss is made NaN, numbered as logged (the first step is 1)
    inject_nonfinite_at: list = field(default_factory=list)
    # (tests) SIGKILL rank 0 while saving this step: DeepSpeed's files are written, the tag is
    # not yet published. Shows that a kill during saving leaves `latest` and older tags intact.
    crash_during_save_at_step: int | None = None


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    ds_config: str = "ds_configs/zero3_cpu.json"
    seed: int = 0
    dist_timeout_s: int = 300  # collective timeout: a dead rank ends the job instead of hanging
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    faults: FaultSection = field(default_factory=FaultSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a dict, recursing into nested sections."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' in ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, path)
        else:
            value = _coerce(hint, value, path)
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(hint, value, path: str):
    """Check `value` against a field's type; numbers given as strings ("3e-4") are converted."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in (bool, int, float, str, list, dict):
        if kind not in allowed:
            continue
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
    raise ValueError(f"config key {path}: {value!r} is not a valid {hint}")


def _set_dotted(values: dict, dotted: str, raw: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, lists, null)."""
    keys = dotted.split(".")
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_train_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML recipe (optional) and apply `key.path=value` overrides."""
    values: dict = {}
    if recipe is not None:
        values = yaml.safe_load(Path(recipe).read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        _set_dotted(values, dotted.strip(), raw)
    config = _build(TrainConfig, values, "")
    config.ds_config = str(_find_ds_config(config.ds_config))
    return config


def _find_ds_config(path: str) -> Path:
    """A DeepSpeed JSON: as given (relative to the working directory), else relative to this
    checkout, so the shipped `ds_configs/...` work from any directory."""
    given = Path(path)
    for candidate in (given, PROJECT_ROOT / given):
        if candidate.is_file():
            return candidate
    raise ValueError(f"ds_config {path}: no such file (relative paths are looked up in the "
                     f"working directory, then in {PROJECT_ROOT})")
