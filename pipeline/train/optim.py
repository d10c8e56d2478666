"""Optimizer and learning-rate schedule for pretraining."""
from __future__ import annotations

import math
import types

import torch

from vlp.pipeline.train.config import OptimSection


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave biases, norms, the temperature, the learned positions, the CLS
    token and the modality-type embeddings alone."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith((".pos", ".cls")) or name.startswith("type_embed."):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimSection, offload: bool):
    """AdamW: DeepSpeed's CPU Adam when the optimizer state is offloaded, else torch's fused one.

    Both skip their update when `optimizer.found_inf` holds 1.0 (set by TrainStep when a loss
    was non-finite): torch's fused AdamW on the device, the CPU one on the host (where its update
    runs anyway). A skipped update leaves weights, moments and step counts untouched.
    """
    groups = parameter_groups(model, cfg.weight_decay)
    if offload:
        return _skipping_cpu_adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def _skipping_cpu_adam(groups, **kwargs):
    """DeepSpeed's CPU Adam whose step does nothing while `found_inf` holds 1.0.

    The skip replaces this instance's `step` (with a bound method, as torch's LR scheduler
    expects) instead of subclassing: ZeRO accepts only the exact class (`type(optimizer) in
    ZERO_SUPPORTED_OPTIMIZERS`, runtime/zero/utils.py) and refuses a subclass at
    deepspeed.initialize as an untested optimizer."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer = DeepSpeedCPUAdam(groups, **kwargs)
    optimizer.found_inf = None
    update = optimizer.step

    def step(self, *args, **step_kwargs):
        if self.found_inf is not None and bool(self.found_inf):
            return None
        return update(*args, **step_kwargs)

    optimizer.step = types.MethodType(step, optimizer)
    return optimizer


def warmup_cosine(step: int, cfg: OptimSection) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: OptimSection) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, cfg))
