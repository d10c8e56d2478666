"""The nightly benchmark suite: named benchmarks, each a task and the arguments of its function.

    # eval_suite.yaml (relative paths are relative to this file)
    synth_retrieval:
      task: retrieval
      karpathy_json: world/retrieval/dataset_synth.json
      image_root: world/retrieval
    synth_vqa:
      task: vqa
      vqa_dir: world/vqa
      steps: 200
      min_answer_count: 3
    synth_caption:
      task: caption
      karpathy_json: world/dataset_synth.json
      image_root: world
      steps: 200
    synth_shape_zeroshot:
      task: zeroshot
      dataset: world/classification/shape/wds
    synth_shape_probe:
      task: linear_probe
      dataset: world/classification/shape/imagefolder
    synth_compositionality:
      task: compositionality
      edits: world/compositionality
      image_root: world

A key that the task's function does not take is an error naming it and the valid keys.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.caption.job import evaluate_caption
from vlp.pipeline.eval.classification.probe import evaluate_linear_probe
from vlp.pipeline.eval.classification.zeroshot import evaluate_zeroshot
from vlp.pipeline.eval.compositionality.job import evaluate_compositionality
from vlp.pipeline.eval.retrieval.job import evaluate_retrieval
from vlp.pipeline.eval.vqa.job import evaluate_vqa

TASKS: dict[str, Callable[..., dict]] = {"retrieval": evaluate_retrieval, "vqa": evaluate_vqa,
                                         "caption": evaluate_caption}
TASKS |= {"zeroshot": evaluate_zeroshot, "linear_probe": evaluate_linear_probe}  # classification
TASKS |= {"compositionality": evaluate_compositionality}
# Arguments the nightly job sets itself.
RESERVED = {"checkpoint", "out", "results_out", "device"}
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
PATH_KEYS = {
    "karpathy_json", "image_root", "shards", "vqa_dir", "train_questions", "train_annotations",
    "eval_questions", "eval_annotations",
}
PATH_KEYS |= {"dataset", "classnames", "templates"}  # classification
PATH_KEYS |= {"edits"}  # compositionality


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str
    kwargs: dict[str, Any]

    def run(self, checkpoint, out: Path) -> dict:
        return TASKS[self.task](checkpoint, out=out, **self.kwargs)


def load_suite(suite: str | Path | dict) -> list[Benchmark]:
    """Benchmarks from a YAML/JSON file (paths resolved against its folder) or a dict."""
    base = Path.cwd()
    source = "suite"
    if not isinstance(suite, dict):
        path = Path(suite)
        if not path.is_file():
            raise UserError(f"suite config not found: {path} (see pipeline/eval/suite.py)")
        try:
            suite = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"suite config {path} is not valid YAML/JSON: {exc}") from exc
        base, source = path.parent, str(path)
    if not isinstance(suite, dict) or not suite:
        raise UserError(f"{source}: expected a mapping of benchmark name -> settings")
    return [_benchmark(name, spec, base, source) for name, spec in suite.items()]


def _expected_type(default: Any) -> type | None:
    """The type a suite value must have, from the task function's default (None: any)."""
    if default is inspect.Parameter.empty or default is None:
        return None
    return type(default)


def _is_a(value: Any, expected: type) -> bool:
    """isinstance, where a bool is not a number and an int is a float."""
    if expected is bool or isinstance(value, bool):
        return isinstance(value, bool) and expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _benchmark(name: str, spec: Any, base: Path, source: str) -> Benchmark:
    where = f"{source}: benchmark {name!r}"
    if not _NAME.fullmatch(str(name)):
        raise UserError(f"{where}: a benchmark name is a file name (RUN/eval/TAG/NAME.json): "
                             "letters, digits, '_', '-' and '.', not starting with '.'")
    if not isinstance(spec, dict) or spec.get("task") not in TASKS:
        raise UserError(f"{where} needs 'task: {' | '.join(TASKS)}'")
    kwargs = {k: v for k, v in spec.items() if k != "task"}
    params = inspect.signature(TASKS[spec["task"]]).parameters
    valid = sorted(set(params) - RESERVED)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")
    for key, value in kwargs.items():
        expected = _expected_type(params[key].default)
        if expected and not _is_a(value, expected):
            raise UserError(f"{where}: {key} must be {expected.__name__} like its default "
                            f"{params[key].default!r}, got {value!r:.40}")
    for key in PATH_KEYS & set(kwargs):
        value = kwargs[key]
        resolved = [str(base / v) for v in value] if isinstance(value, list) else str(base / value)
        kwargs[key] = resolved
    return Benchmark(str(name), spec["task"], kwargs)
