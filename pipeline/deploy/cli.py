"""`vlp deploy quantize | prune | distill | onnx`: compressed exports of a checkpoint.

Each command reads a checkpoint or an export and writes a directory that `load_model`, and so
every eval job, loads unchanged (the ONNX one serves retrieval only). `vlp bench compress`
measures them side by side; docs/deployment.md says what each costs and keeps.
"""
from __future__ import annotations

import importlib

COMMANDS = ("vlp.pipeline.deploy.quantize", "vlp.pipeline.deploy.prune",
            "vlp.pipeline.deploy.distill", "vlp.pipeline.deploy.onnx")


def register(subparsers) -> None:
    p = subparsers.add_parser("deploy", help="compress a checkpoint: int8, pruning, "
                                             "distillation, ONNX encoders")
    commands = p.add_subparsers(dest="deploy_command", required=True)
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(commands)
