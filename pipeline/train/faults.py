"""Fault injection for the process-level tests (tests/faults), in one place.

The training loop calls two hooks; with the default FaultSection both do nothing.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from vlp.pipeline.train.config import FaultSection


class FaultInjector:
    def __init__(self, cfg: FaultSection, rank: int):
        self.cfg, self.rank = cfg, rank

    def corrupt_loss(self, step: int, micro_step: int, loss: torch.Tensor) -> torch.Tensor:
        """faults.inject_nonfinite_at: rank 0's loss becomes NaN in the first micro-step of those
        steps (numbered as logged, the first step is 1), so its gradients are NaN too."""
        if step in self.cfg.inject_nonfinite_at and self.rank == 0 and micro_step == 0:
            return loss * float("nan")
        return loss

    def before_publish(self, step: int, partial_dir: Path) -> None:
        """faults.crash_during_save_at_step: die as a killed process would, mid-save (DeepSpeed's
        files are written, the tag is not yet published)."""
        if step == self.cfg.crash_during_save_at_step:
            print(f"fault injection: SIGKILL rank 0 while saving {partial_dir}", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
