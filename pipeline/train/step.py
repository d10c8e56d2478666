"""One optimizer step through the DeepSpeed engine, with accumulation and the finite check.

    for each of grad_accum micro-batches: fetch (timed), forward (every loss inside the module,
    as ZeRO-3 needs), backward, engine.step() (DeepSpeed applies the update at the last one)

If any micro-step on any rank has a non-finite loss, the whole accumulated update is skipped on
every rank: the flag is all-reduced on the device (MAX) and handed to the optimizer as
`found_inf`, which torch's fused AdamW honours on the device (no update, no moment or step-count
change; vlp.pipeline.train.optim for the CPU-offload optimizer). DeepSpeed's micro-step counter
advances as usual, so the accumulation boundary never shifts. Nothing here reads a device value
on the host: the step queues its work and returns device tensors.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vlp.pipeline.train.faults import FaultInjector

MODEL_INPUTS = ("images", "text_ids", "text_mask", "mlm_ids", "mlm_labels",
                "neg_ids", "neg_mask", "has_neg")  # the last three with data.hard_negatives


@dataclass
class StepResult:
    scalars: dict[str, torch.Tensor]  # every 0-d model output, mean over micro-steps (device)
    nonfinite: torch.Tensor  # 0-d float on the device: 1.0 when the update was skipped
    data_wait_s: float  # host time spent waiting for batches


class TrainStep:
    def __init__(self, engine, optimizer: torch.optim.Optimizer, grad_accum: int,
                 faults: FaultInjector, on_batch=None):
        self.engine, self.optimizer = engine, optimizer
        self.grad_accum, self.faults = grad_accum, faults
        self.on_batch = on_batch  # (step, micro-step, batch) before its forward (key audit log)

    def __call__(self, batches: Iterator[dict], step: int) -> StepResult:
        device = self.engine.device
        nonfinite = torch.zeros((), device=device)
        sums: dict[str, torch.Tensor] = {}
        wait = 0.0
        for micro in range(self.grad_accum):
            start = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - start
            if self.on_batch is not None:
                self.on_batch(step, micro, batch)
            outputs = self.engine(**{k: batch[k].to(device, non_blocking=True)
                                     for k in MODEL_INPUTS if k in batch})
            loss = self.faults.corrupt_loss(step, micro, outputs["loss"])
            nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss.detach())).float())
            if micro == self.grad_accum - 1:  # before the step that applies the update
                dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
                self.optimizer.found_inf = nonfinite
            self.engine.backward(loss)
            self.engine.step()
            for name, value in outputs.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    value = loss if name == "loss" else value
                    sums[name] = sums.get(name, 0) + value.detach().float().reshape(())
        scalars = {name: total / self.grad_accum for name, total in sums.items()}
        return StepResult(scalars, nonfinite, wait)
