"""Worker: one DeepSpeed ZeRO-3 rank that reports what ZeRO-3 does in a step, for a model size.

    deepspeed --num_accelerators 1 --module vlp.pipeline.bench.zero3_probe --config base --out F

1. The step's order (for vlp.pipeline.bench.zero_traffic): a narrow twin of the model (the same
   modules, tiny tensors: the order does not depend on widths) trains three steps under ZeRO-3.
   ZeRO-3 changes the autograd graph (its own linear function, wrappers around every module's
   inputs and outputs) and with it the order in which gradients become ready, so its order is
   taken from DeepSpeed; ZeRO-1/2 leave the graph alone, so theirs from one plain step. Recorded:
   the parameters of each module as forward enters it and the order of gradient-ready hooks
   (registered after DeepSpeed's own, so they fire in the same order). Sizes come from the real
   model built on the meta device; the optimizer's parameter groups from
   vlp.pipeline.train.optim.
2. With --hook-steps N: the host time of ZeRO-3's per-module hooks. The four functions DeepSpeed
   runs around every module (DeepSpeedZeRoOffload.pre/post_sub_module_forward/backward_function:
   trace bookkeeping, fetch and prefetch, release) are wrapped in timers while the real model
   under --ds-config runs two untimed steps (trace recording), then N timed forward+backward
   passes interleaved with the same passes of a plain copy without DeepSpeed (in the engine's
   dtype). One rank: no collective runs and no rank waits for another, so what is timed is host
   work. Hooks are timed in this thread's CPU time (time a shared machine gives other processes
   is not counted), the passes in wall time (on a GPU, synchronised: the GPU's work included).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

HOOK_FUNCTIONS = ("pre_sub_module_forward_function", "post_sub_module_forward_function",
                  "pre_sub_module_backward_function", "post_sub_module_backward_function")
# the twin: the same modules as the real model, tiny tensors
TWIN_SIZES = {"width": 16, "heads": 2, "embed_dim": 8, "image_size": 32, "patch_size": 16,
              "max_text_len": 12, "vocab_size": 64}
TWIN_ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": 1, "steps_per_print": 1_000_000}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="base")
    p.add_argument("--overrides", default="{}", help="JSON model config overrides")
    p.add_argument("--hook-steps", type=int, default=0, help="timed hook steps (0: order only)")
    p.add_argument("--ds-config", default="zero3_bf16.json", help="ZeRO-3 config of the hook run")
    p.add_argument("--batch", type=int, default=2, help="batch of the hook run")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by deepspeed
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    from vlp.models.config import load_config
    from vlp.pipeline.distributed import init_distributed, shutdown_distributed

    _, _, device = init_distributed(timeout_s=600)
    config = load_config(args.config, **json.loads(args.overrides))
    result = {"config": config.to_dict(), "trace": record_order(config)}
    if args.hook_steps:
        result["hooks"] = time_hooks(config, args, device)
    Path(args.out).write_text(json.dumps(result))
    shutdown_distributed()
    return 0


def record_order(config) -> dict:
    import deepspeed
    import torch

    from vlp.models.model import UnifiedModel
    from vlp.pipeline.train.optim import parameter_groups

    with torch.device("meta"):
        real = UnifiedModel(config)
    names = {id(p): name for name, p in real.named_parameters()}
    groups = [[names[id(p)] for p in group["params"]] for group in parameter_groups(real, 0.1)]
    twin_config = dataclasses.replace(config, **TWIN_SIZES)

    # ZeRO-1/2 leave the graph alone: plain torch's order. First, because zero.Init replaces
    # torch.nn.functional.linear for the rest of the process.
    torch.manual_seed(0)
    plain = UnifiedModel(twin_config)
    _, plain_grad_order = _one_step_order(plain, lambda batch: plain(**batch)["loss"].backward(),
                                          torch.device("cpu"))

    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=TWIN_ZERO3):
        twin = UnifiedModel(twin_config)
    engine, _, _, _ = deepspeed.initialize(
        model=twin, optimizer=torch.optim.AdamW(twin.parameters(), lr=1e-4), config=TWIN_ZERO3)

    def zero3_step(batch):
        engine.backward(engine(**batch)["loss"])
        engine.step()

    forward_modules, grad_order = _one_step_order(twin, zero3_step, engine.device, warmup=2)
    engine.destroy()
    return {"numel": {name: p.numel() for name, p in real.named_parameters()},
            "forward_modules": forward_modules, "grad_order": grad_order,
            "plain_grad_order": plain_grad_order, "groups": groups}


def batch_on(device, config, batch: int, dtype=None) -> dict:
    """A random batch (vlp.pipeline.bench.train.make_batch) for a model whose weights are on
    `device` (an engine's: cuda:N under the launcher), floating tensors in `dtype` if given."""
    from vlp.pipeline.bench.train import make_batch

    tensors = make_batch(config, batch, device, seed=0)
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _one_step_order(model, step, device, warmup: int = 0) -> tuple[list[list[str]], list[str]]:
    """The parameters of each module as forward enters it, and the gradient-ready order, in the
    step after `warmup` steps (hooks registered last fire in the order of DeepSpeed's own); the
    batch is built on `device`, where the model's weights are."""
    names = {id(p): name for name, p in model.named_parameters()}
    forward_modules, grad_order = [], []
    for module in model.modules():
        own = [names[id(p)] for p in module._parameters.values() if p is not None]
        module.register_forward_pre_hook(lambda _m, _args, own=own: forward_modules.append(own))
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda _p, name=name: grad_order.append(name))
    batch = batch_on(device, model.config, 2)
    for _ in range(warmup + 1):
        forward_modules.clear()
        grad_order.clear()
        step(batch)
    return list(forward_modules), list(grad_order)


class HookTimer:
    """Times every call of DeepSpeed's per-module hook functions while `recording` is set."""

    def __init__(self):
        self.recording = False
        self.calls: list[tuple[str, int, float]] = []  # (function, own parameters, CPU seconds)

    def install(self) -> None:
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

        for name in HOOK_FUNCTIONS:
            function = getattr(DeepSpeedZeRoOffload, name)
            setattr(DeepSpeedZeRoOffload, name, self._timed(name, function))

    def _timed(self, name, function):
        def timed(offload, module):
            if not self.recording:
                return function(offload, module)
            start = time.thread_time()
            try:
                return function(offload, module)
            finally:
                self.calls.append((name, len(module._parameters), time.thread_time() - start))
        return timed


def time_hooks(config, args, device) -> dict:
    import deepspeed
    import torch

    from vlp.models.model import UnifiedModel
    from vlp.pipeline.distributed import fast_bf16
    from vlp.pipeline.train.config import find_ds_config

    ds_config = json.loads(find_ds_config(args.ds_config).read_text())
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        raise SystemExit(f"{args.ds_config} is not a ZeRO-3 config: it has no per-module hooks")
    ds_config["bf16"] = {"enabled": fast_bf16(device)}  # as training decides on this device
    ds_config.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1)
    timer = HookTimer()
    timer.install()
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = UnifiedModel(config)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), config=ds_config)
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    torch.manual_seed(0)
    plain = UnifiedModel(config).to(device=engine.device, dtype=dtype)  # as the engine's weights
    batch = batch_on(engine.device, config, args.batch, dtype)
    # wall times must include the GPU's work, not only its launch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def plain_pass():
        plain(**batch)["loss"].backward()
        plain.zero_grad(set_to_none=True)
        sync()

    for _ in range(2):  # DeepSpeed: a step without a trace, then one recording it
        engine.backward(engine(**batch)["loss"])
        engine.step()
    plain_pass()
    zero3_s, plain_s = _timed_passes(engine, batch, plain_pass, timer, args, sync)

    per_kind = {}
    for name in HOOK_FUNCTIONS:
        times = [seconds for kind, _, seconds in timer.calls if kind == name]
        per_kind[name] = {"calls_per_step": len(times) // args.hook_steps,
                          "seconds_per_step": sum(times) / args.hook_steps}
    return {"ds_config": args.ds_config, "device": device.type, "dtype": str(dtype),
            "batch": args.batch,
            "torch_threads": torch.get_num_threads(), "steps": args.hook_steps,
            "modules": sum(1 for _ in engine.module.modules()),
            "fwd_bwd_wall_s": {"zero3": zero3_s, "plain": plain_s},
            "fwd_bwd_wall_s_median": {"zero3": statistics.median(zero3_s),
                                      "plain": statistics.median(plain_s)},
            "per_kind": per_kind, "calls": timer.calls}



def _timed_passes(engine, batch, plain_pass, timer: HookTimer, args, sync):
    """--hook-steps forward+backward passes under ZeRO-3 (hooks timed), each followed by the
    plain copy's; every step's figures are recorded as soon as they are measured."""
    from vlp.pipeline.bench.common import record_figure

    zero3_s, plain_s = [], []
    for step in range(args.hook_steps):
        calls_before = len(timer.calls)
        sync()
        timer.recording = True
        start = time.perf_counter()
        engine.backward(engine(**batch)["loss"])
        sync()
        zero3_s.append(time.perf_counter() - start)
        timer.recording = False
        engine.step()  # the optimizer is not hook work
        start = time.perf_counter()
        plain_pass()
        plain_s.append(time.perf_counter() - start)
        step_calls = timer.calls[calls_before:]
        record_figure("hooks", config=args.config, batch=args.batch, step=step,
                      zero3_fwd_bwd_s=zero3_s[-1], plain_fwd_bwd_s=plain_s[-1],
                      hook_calls=len(step_calls), hook_cpu_s=sum(t for _, _, t in step_calls))
    return zero3_s, plain_s

if __name__ == "__main__":
    raise SystemExit(main())
