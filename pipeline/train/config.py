"""Typed training configuration: a YAML recipe plus `section.key=value` overrides.

Every key is a dataclass field with a default and a docstring (`vlp train --list-keys` prints
them), so a misspelt key in a recipe or on the command line is an error that names the key and
the valid ones, never a silently ignored setting; values are type- and range-checked before any
work starts.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from vlp.pipeline.data.checkpoints import RESUME_MODES
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.loader import DataConfig

ResumeMode = Literal[RESUME_MODES]  # auto, latest, latest-valid, none
_BACKEND = re.compile(r"[a-z0-9_]+|[a-z0-9_]+:[a-z0-9_]+(,[a-z0-9_]+:[a-z0-9_]+)*")
# A week: a hung collective should end the job within that. Far larger values overflow torch's
# timedelta / int64-millisecond timeout on every rank (1e15 s), after the launch.
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600


def _check(section: str, checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise UserError(f"{section}.{message}")


def _finite(*values: float) -> bool:
    """No inf or nan: YAML reads `inf` as a float, and no key here means anything at infinity."""
    return all(math.isfinite(value) for value in values)


@dataclass
class ModelSection:
    name: str = "tiny"
    """A named size in vlp/models/configs (tiny, small, base, large) or a JSON file."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields to change, e.g. {depth: 6, fusion_layers: 3}."""
    itc_weight: float = 1.0
    """Weight of the image-text contrastive loss (0 skips its compute)."""
    itm_weight: float = 1.0
    """Weight of the image-text matching loss with hard negatives (0 skips it)."""
    mlm_weight: float = 1.0
    """Weight of the masked-language loss on the fused caption (0 skips it)."""
    itm_uniform_negatives: float = 0.0
    """Share of ITM negatives drawn uniformly from the batch instead of by ITC similarity (hard
    negatives): a fusion encoder trained from scratch on hard negatives alone can sit at the
    constant prediction for hundreds of steps (docs/fusion.md)."""
    lm_weight: float = 0.0
    """Weight of the captioning loss: next-token prediction of the caption from its image under
    the sequence-to-sequence mask (0 skips it; `vlp eval caption --steps N` fine-tunes it)."""
    init_from: str | None = None
    """Warm start: the weights of an export or a training checkpoint (any path `vlp export`
    takes) with this run's model config; fresh optimizer, schedule and data order. Ignored when
    the run resumes from its own checkpoint, except that the zeros of a pruned source (`vlp
    deploy prune`) stay zero for the whole run."""
    init_text_from: str | None = None
    """Start the text side (token and position embeddings, L-FFN and VL-FFN, MLM head; also the
    shared attention without init_image_from) from a local Hugging Face BERT folder (written by
    save_pretrained); train with its tokenizer (data.tokenizer=that folder). docs/interop.md has
    the mapping. Ignored when the run resumes."""
    init_image_from: str | None = None
    """Start the image side (patch embedding, CLS, positions, shared attention and its norms,
    V-FFN, final norm) from a local Hugging Face ViT folder. Ignored when the run resumes."""

    def __post_init__(self):
        weights = (self.itc_weight, self.itm_weight, self.mlm_weight, self.lm_weight)
        _check("model", [
            (not (self.init_from and (self.init_text_from or self.init_image_from)),
             "init_from sets every weight: unset init_text_from and init_image_from, or "
             "init_from"),
            (_finite(*weights) and min(weights) >= 0 and max(weights) > 0,
             f"*_weight must be >= 0, finite and not all 0, got {weights}"),
            (0 <= self.itm_uniform_negatives <= 1,
             f"itm_uniform_negatives must be in [0, 1], got {self.itm_uniform_negatives}"),
        ])


@dataclass
class DistillSection:
    teacher: str | None = None
    """Knowledge distillation: the frozen teacher, an export or a training checkpoint (any path
    `vlp export` takes) with this run's image size and tokenizer; it runs under no_grad inside
    the student's forward. None: no distillation."""
    itc_weight: float = 1.0
    """Weight of the KL between the teacher's and the student's softened ITC similarities
    (needs model.itc_weight > 0)."""
    mlm_weight: float = 0.0
    """Weight of the KL between their masked-token predictions on the fused caption (needs
    model.mlm_weight > 0; 0 skips the teacher's fused pass)."""
    temperature: float = 1.0
    """Softening temperature T: both sides' logits are divided by T, the KL multiplied by T^2."""

    def __post_init__(self):
        weights = (self.itc_weight, self.mlm_weight)
        _check("distill", [
            (_finite(*weights) and min(weights) >= 0,
             f"itc_weight and mlm_weight must be >= 0 and finite, got {weights}"),
            (self.teacher is None or self.itc_weight + self.mlm_weight > 0,
             "itc_weight and mlm_weight are both 0: give one a weight, or unset distill.teacher"),
            (_finite(self.temperature) and self.temperature > 0,
             f"temperature must be > 0 and finite, got {self.temperature}"),
        ])


@dataclass
class OptimSection:
    batch_size: int = 64
    """Samples per rank and micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio at max_steps."""
    warmup_steps: int = 100
    """Linear warmup from lr / warmup_steps to lr (at most max_steps)."""
    max_steps: int = 1000
    """Optimizer steps of the whole run."""
    weight_decay: float = 0.05
    """AdamW weight decay (not on biases, norms, positions, CLS, type embeddings, temperature)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    def __post_init__(self):
        _check("optim", [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (_finite(self.lr) and self.lr > 0, f"lr must be > 0 and finite, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.warmup_steps <= self.max_steps,
             f"warmup_steps {self.warmup_steps} is longer than max_steps {self.max_steps}: the lr "
             "would never leave warmup; lower optim.warmup_steps"),
            (_finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0 and finite, got {self.weight_decay}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}"),
            (_finite(self.eps) and self.eps > 0, f"eps must be > 0 and finite, got {self.eps}"),
            (_finite(self.grad_clip) and self.grad_clip >= 0,
             f"grad_clip must be >= 0 and finite (0 disables), got {self.grad_clip}"),
        ])


@dataclass
class CheckpointSection:
    every_steps: int = 500
    """Save every this many steps (and at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep; 0 keeps every one."""
    save_initial: bool = False
    """Also save the untrained weights as global_step0 (a baseline for evaluation)."""
    resume: ResumeMode = "auto"
    """auto: resume from `latest` when the run has one (else the newest valid checkpoint, else
    start afresh); latest: require it; latest-valid: the newest checkpoint that passes
    validation; none: start afresh."""
    overwrite: bool = False
    """Starting afresh where the run already has checkpoints is refused unless this is true;
    then they are deleted first (a new run's tags never mix with an old run's)."""
    change_world_size: bool = False
    """Resume a checkpoint written by another number of ranks: DeepSpeed's universal checkpoint
    carries the weights, optimizer state, step and schedule over; the data order continues at
    the next epoch (loader positions are per rank, so that resume is not sample-exact)."""

    def __post_init__(self):
        _check("checkpoint", [
            (self.every_steps >= 1, f"every_steps must be >= 1, got {self.every_steps}"),
            (self.keep_last >= 0, f"keep_last must be >= 0 (0 keeps all), got {self.keep_last}"),
        ])


@dataclass
class LoggingSection:
    every_steps: int = 10
    """Reduce and log the metrics every this many steps (the only steps that read the device)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for MFU (e.g. 989 for an H100 SXM in dense bf16); None: the GPU's
    datasheet figure (pipeline/train/peak_flops.py), measured where the table has none."""
    progress_bar: bool = True
    """A tqdm bar on rank 0 when attached to a terminal."""
    status_every_steps: int = 50
    """When stdout is not a terminal (sbatch, nohup), rank 0 prints a status line (step, loss, lr,
    samples/s, MFU, data wait, ETA) on the first logging step at or after every this many steps;
    0: never."""
    sample_keys: bool = False
    """Write the keys of every batch to samples/rank{R}.jsonl (data-order audits)."""

    def __post_init__(self):
        _check("logging", [
            (self.every_steps >= 1, f"every_steps must be >= 1, got {self.every_steps}"),
            (self.status_every_steps >= 0,
             f"status_every_steps must be >= 0 (0: none), got {self.status_every_steps}"),
            (self.peak_tflops is None or (_finite(self.peak_tflops) and self.peak_tflops > 0),
             f"peak_tflops must be > 0 and finite, or null, got {self.peak_tflops}"),
        ])


@dataclass
class FaultSection:
    max_nonfinite_in_row: int = 5
    """Stop the run when this many consecutive updates were skipped for a non-finite loss
    (checked on logging steps)."""
    inject_nonfinite_at: list[int] = field(default_factory=list)
    """(tests) Steps whose loss is made NaN on rank 0, numbered as logged (the first step is 1)."""
    crash_during_save_at_step: int | None = None
    """(tests) SIGKILL rank 0 while saving this step: DeepSpeed's files are written, the tag is
    not yet published. Shows that a kill during saving leaves `latest` and older tags intact."""

    def __post_init__(self):
        _check("faults", [
            (self.max_nonfinite_in_row >= 1,
             f"max_nonfinite_in_row must be >= 1, got {self.max_nonfinite_in_row}"),
            (all(step >= 1 for step in self.inject_nonfinite_at),
             f"inject_nonfinite_at steps count from 1, got {self.inject_nonfinite_at}"),
            (self.crash_during_save_at_step is None or self.crash_during_save_at_step >= 0,
             f"crash_during_save_at_step must be >= 0 or null, got "
             f"{self.crash_during_save_at_step}"),
        ])


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Checkpoints, TensorBoard, metrics.jsonl and the resolved config go here."""
    ds_config: str = "zero3_cpu.json"
    """DeepSpeed JSON: a path, or the name of a shipped config (zero3_bf16.json, zero2_bf16.json,
    zero3_offload.json, zero3_cpu.json, zero2_cpu.json)."""
    seed: int = 0
    """Initial weights, data order, masks and negatives all derive from it."""
    dist_timeout_s: int = 300
    """Collective timeout at start-up (until a launch's first step is done) and while a
    checkpoint is saved: a dead rank ends the job instead of hanging it (at most a week)."""
    step_timeout_s: int | None = None
    """Collective timeout of the steps after the first (pipeline/train/heartbeat.py): a hang
    then ends the job in this time, not dist_timeout_s. None: dist_timeout_s throughout."""
    heartbeat_every_s: float = 10.0
    """Each rank writes run_dir/heartbeat/rank_{R}.json this often (its step and phase); rank 0
    reports a rank that stops writing or stays in one phase past half its timeout. 0: off."""
    dist_backend: str | None = None
    """torch.distributed backend; None: nccl on CUDA, gloo on CPU. Per device type with e.g.
    'cpu:gloo,cuda:nccl'."""
    model: ModelSection = field(default_factory=ModelSection)
    distill: DistillSection = field(default_factory=DistillSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    faults: FaultSection = field(default_factory=FaultSection)

    def __post_init__(self):
        distill, model = self.distill, self.model
        _check("config", [
            (self.dist_timeout_s >= 1, f"dist_timeout_s must be >= 1, got {self.dist_timeout_s}"),
            (self.dist_timeout_s <= MAX_DIST_TIMEOUT_S,
             f"dist_timeout_s must be at most {MAX_DIST_TIMEOUT_S} (a week), got "
             f"{self.dist_timeout_s}"),
            (self.step_timeout_s is None or 1 <= self.step_timeout_s <= self.dist_timeout_s,
             f"step_timeout_s must be in [1, dist_timeout_s={self.dist_timeout_s}] or null, got "
             f"{self.step_timeout_s}"),
            (_finite(self.heartbeat_every_s) and self.heartbeat_every_s >= 0,
             f"heartbeat_every_s must be >= 0 (0: off), got {self.heartbeat_every_s}"),
            (self.dist_backend is None or _BACKEND.fullmatch(self.dist_backend) is not None,
             f"dist_backend {self.dist_backend!r} must be a backend name (nccl, gloo) or "
             "device:backend pairs such as 'cpu:gloo,cuda:nccl'"),
            (not distill.teacher or not distill.itc_weight or model.itc_weight,
             "distill.itc_weight > 0 reads the student's ITC pass: model.itc_weight is 0"),
            (not distill.teacher or not distill.mlm_weight or model.mlm_weight,
             "distill.mlm_weight > 0 reads the student's MLM pass: model.mlm_weight is 0"),
            (not distill.teacher or not self.data.edited_negatives,
             "distill.teacher with data.edited_negatives: distillation reads one text pass per "
             "batch, set data.edited_negatives=false"),
        ])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a dict, recursing into nested sections."""
    if not isinstance(values, dict):
        raise UserError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' in ' + where if where else ''}: {', '.join(sorted(names))} "
            "(`vlp train --list-keys` lists them all)"
        )
    kwargs = {}
    for name, value in values.items():
        path = f"{where}.{name}" if where else name
        hint = hints[name]
        kwargs[name] = (_build(hint, value, path) if dataclasses.is_dataclass(hint)
                        else _coerce(hint, value, path))
    return cls(**kwargs)


def _coerce(hint, value, path: str):
    """`value` checked against a field's type; numbers given as strings ("3e-4") are converted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value in args:
            return value
        raise UserError(f"config key {path}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key {path}: {value!r} is not a list")
        return [_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)] \
            if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {path}: {value!r} is not a mapping")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config key {path}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def _set_dotted(values: dict, dotted: str, raw: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, lists, null)."""
    keys = dotted.split(".")
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"override {dotted}: {key} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"override {dotted}={raw!r} is not a YAML value: {exc}") from exc


def load_train_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML recipe (a path, or the name of a shipped one such as tiny_synth.yaml; optional)
    and apply `key.path=value` overrides; UserError if anything is bad."""
    values: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file() and str(recipe) in shipped_recipes():
            path = recipe_path(str(recipe))
        if not path.is_file():
            raise UserError(f"recipe {recipe} not found: not a file and not a shipped recipe "
                            f"({', '.join(shipped_recipes())})")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"recipe {recipe} is not valid YAML: {exc}") from exc
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        _set_dotted(values, dotted.strip(), raw)
    config = _build(TrainConfig, values, "")
    config.ds_config = str(find_ds_config(config.ds_config))
    read_ds_config(config.ds_config)
    return config


# ---- shipped files -----------------------------------------------------------------------------

def shipped_recipes() -> list[str]:
    return sorted(p.name for p in resources.files("vlp.pipeline.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def recipe_path(name: str) -> Path:
    """A shipped recipe (e.g. tiny_synth.yaml) as a file path, from any working directory."""
    return Path(str(resources.files("vlp.pipeline.recipes") / name))


def find_ds_config(path: str) -> Path:
    """A DeepSpeed JSON as given (relative to the working directory), else the shipped config of
    that file name (so `ds_configs/zero3_cpu.json` in a recipe works from any directory)."""
    given = Path(path)
    if given.is_file():
        return given
    shipped = Path(str(resources.files("vlp.ds_configs") / given.name))
    if shipped.is_file():
        return shipped
    names = sorted(p.name for p in resources.files("vlp.ds_configs").iterdir()
                   if p.name.endswith(".json"))
    raise UserError(f"ds_config {path}: no such file, and not a shipped config ({', '.join(names)})")


def read_ds_config(path: str | Path) -> dict:
    """The DeepSpeed JSON at `path` as a dict; UserError if it is not a JSON object."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"ds_config {path} is not valid JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise UserError(f"ds_config {path} must be a JSON object, got {type(values).__name__}")
    return values


# ---- documentation -----------------------------------------------------------------------------

def list_keys(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, object, str]]:
    """(dotted key, type, default, docstring) of every config key, in declaration order."""
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += list_keys(hint, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        type_name = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
        rows.append((prefix + f.name, type_name or str(hint).replace("typing.", ""), default,
                     docs.get(f.name, "")))
    return rows


def _field_docs(cls) -> dict[str, str]:
    """The attribute docstrings (a string literal right after a field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs
