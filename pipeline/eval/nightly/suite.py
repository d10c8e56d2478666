"""The nightly benchmark suite: named benchmarks, each a task (eval/jobs.py) and its settings.

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

Each entry's keys are the fields of its task's config (pipeline/eval/configs.py, the same
settings as the `vlp eval <task>` options); an unknown key or a value of the wrong type is an
error naming it and the valid keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.job_config import JobConfig, config_from_mapping
from vlp.pipeline.eval.jobs import JOBS, EvalJob

TASKS: dict[str, EvalJob] = {job.task: job for job in JOBS}
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str
    config: JobConfig

    def run(self, checkpoint, out: Path) -> dict:
        return TASKS[self.task].evaluate()(checkpoint, self.config, out=out)


def load_suite(suite: str | Path | dict) -> list[Benchmark]:
    """Benchmarks from a YAML/JSON file (paths resolved against its folder) or a dict."""
    base = Path.cwd()
    source = "suite"
    if not isinstance(suite, dict):
        path = Path(suite)
        if not path.is_file():
            raise UserError(f"suite config not found: {path} (see pipeline/eval/nightly/suite.py)")
        try:
            suite = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"suite config {path} is not valid YAML/JSON: {exc}") from exc
        base, source = path.parent, str(path)
    if not isinstance(suite, dict) or not suite:
        raise UserError(f"{source}: expected a mapping of benchmark name -> settings")
    return [_benchmark(name, spec, base, source) for name, spec in suite.items()]


def _benchmark(name: str, spec: Any, base: Path, source: str) -> Benchmark:
    where = f"{source}: benchmark {name!r}"
    if not _NAME.fullmatch(str(name)):
        raise UserError(f"{where}: a benchmark name is a file name (RUN/eval/TAG/NAME.json): "
                             "letters, digits, '_', '-' and '.', not starting with '.'")
    if not isinstance(spec, dict) or spec.get("task") not in TASKS:
        raise UserError(f"{where} needs 'task: {' | '.join(TASKS)}'")
    values = {k: v for k, v in spec.items() if k != "task"}
    config = config_from_mapping(TASKS[spec["task"]].config, values, where, base)
    return Benchmark(str(name), spec["task"], config)
