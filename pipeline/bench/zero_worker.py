"""Worker of `vlp bench zero`: one rank of a DeepSpeed run (or a plain single process).

    deepspeed --num_accelerators 2 --module vlp.pipeline.bench.zero_worker --mode zero3 --out-dir D
    python -m vlp.pipeline.bench.zero_worker --mode single --out-dir D ...

Builds the model (ZeRO-3: under deepspeed.zero.Init, so it is partitioned at construction),
runs warm-up steps, times `--steps` training steps (forward with all losses, backward, AdamW),
then runs one more, untimed step in which it counts this rank's resident training-state bytes
from the engine (gradients while they are resident, optimizer state after the optimizer step),
and writes D/<mode>_w<world>_rank<r>.json. How bytes are counted:

  parameters  ZeRO-3: each parameter's local partition `param.ds_tensor` (bf16, padded to a
              multiple of the world size), plus the full tensor of parameters ZeRO-3 keeps
              gathered on every rank (`param.ds_persist`, below stage3_param_persistence_threshold).
              ZeRO-2: the full bf16 flat groups (`optimizer.bit16_groups_flat`). Single: the
              fp32 module parameters.
  gradients   ZeRO-3: the partitioned gradient buffer (`optimizer.grad_partitions_flat_buffer`).
              ZeRO-2: the rank's gradient partition (`optimizer.grads_in_partition` with
              contiguous gradients, else the fp32 partition size in the gradient dtype).
              Single: every parameter's `.grad` after backward (fp32).
  optimizer   fp32 master partitions (ZeRO-3 `fp32_partitioned_groups_flat`, ZeRO-2
              `single_partition_of_fp32_groups`; none in single, whose parameters are the fp32
              weights) plus Adam's `exp_avg` and `exp_avg_sq` for every tensor the wrapped
              torch optimizer holds state for.

Activations, communication buckets and allocator caches are not counted: they depend on the
batch and on tuning knobs, not on how the model state is partitioned.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

# shipped configs (vlp.ds_configs), found by vlp.pipeline.train.config.find_ds_config
DS_CONFIGS = {"zero3": "zero3_cpu.json", "zero2": "zero2_cpu.json"}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["zero3", "zero2", "single"], required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--config", default="small")
    p.add_argument("--overrides", default="{}", help="JSON model config overrides")
    p.add_argument("--batch", type=int, default=4, help="per rank")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by deepspeed
    return p.parse_args(argv)


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def adam_state_bytes(torch_optimizer) -> int:
    return sum(_nbytes(state.get(name)) for state in torch_optimizer.state.values()
               for name in ("exp_avg", "exp_avg_sq"))


def zero3_bytes(engine) -> dict:
    opt = engine.optimizer
    params = 0
    for p in engine.module.parameters():
        params += _nbytes(p.ds_tensor)
        if getattr(p, "ds_persist", False):
            params += p.ds_numel * p.ds_tensor.element_size()
    return {"parameters": params,
            "gradients": _nbytes(getattr(opt, "grad_partitions_flat_buffer", None)),
            "optimizer_master": sum(_nbytes(t) for t in opt.fp32_partitioned_groups_flat),
            "optimizer_adam": adam_state_bytes(opt.optimizer)}


def zero2_bytes(engine) -> dict:
    opt = engine.optimizer
    masters = opt.single_partition_of_fp32_groups
    grads = getattr(opt, "grads_in_partition", None)
    grad_bytes = (_nbytes(grads) if grads is not None
                  else sum(t.numel() for t in masters) * opt.bit16_groups_flat[0].element_size())
    return {"parameters": sum(_nbytes(t) for t in opt.bit16_groups_flat),
            "gradients": grad_bytes,
            "optimizer_master": sum(_nbytes(t) for t in masters),
            "optimizer_adam": adam_state_bytes(opt.optimizer)}


def single_bytes(model, optimizer) -> dict:
    return {"parameters": sum(_nbytes(p) for p in model.parameters()),
            "gradients": sum(_nbytes(p.grad) for p in model.parameters()),
            "optimizer_master": 0, "optimizer_adam": adam_state_bytes(optimizer)}


def main(argv=None) -> int:
    args = _args(argv)
    import torch

    from vlp.models.model import UnifiedModel
    from vlp.pipeline.bench.common import load_model_config
    from vlp.pipeline.bench.train import make_batch

    config = load_model_config(args.config, overrides=json.loads(args.overrides))
    torch.manual_seed(0)
    model_params = None

    if args.mode == "single":
        rank, world = 0, 1
        batch = make_batch(config, args.batch, "cpu", seed=0)
        model = UnifiedModel(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)

        def step(count: bool = False) -> dict | None:
            with torch.autocast("cpu", torch.bfloat16):
                loss = model(**batch)["loss"]
            loss.backward()
            optimizer.step()
            counted = single_bytes(model, optimizer) if count else None  # grads until zero_grad
            optimizer.zero_grad(set_to_none=True)
            return counted
        model_params = sum(p.numel() for p in model.parameters())
    else:
        import deepspeed

        from vlp.pipeline.distributed import init_distributed
        from vlp.pipeline.train.config import find_ds_config

        rank, world, device = init_distributed(timeout_s=600)
        batch = make_batch(config, args.batch, device, seed=0)  # where the engine runs
        ds_config = json.loads(find_ds_config(DS_CONFIGS[args.mode]).read_text())
        ds_config.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1,
                         gradient_clipping=1.0)
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=args.mode == "zero3"):
            model = UnifiedModel(config)
        model_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        bf16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.items()}
        counter = zero3_bytes if args.mode == "zero3" else zero2_bytes

        def step(count: bool = False) -> dict | None:
            loss = engine(**bf16)["loss"]
            engine.backward(loss)
            counted = counter(engine) if count else None  # gradient partitions are filled now
            engine.step()
            if count:  # Adam's state exists once the optimizer has stepped
                after = counter(engine)
                counted.update(optimizer_master=after["optimizer_master"],
                               optimizer_adam=after["optimizer_adam"])
            return counted

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    counted = step(count=True)  # untimed: counting walks every parameter
    counted["total"] = sum(counted.values())
    result = {"mode": args.mode, "world_size": world, "rank": rank, "batch_per_rank": args.batch,
              "model_parameters": model_params, "torch_threads": torch.get_num_threads(),
              "step_s": times, "step_s_median": statistics.median(times),
              "bytes": counted, "config": config.to_dict()}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.mode}_w{world}_rank{rank}.json").write_text(json.dumps(result, indent=1))
    if world > 1:
        import torch.distributed as dist

        from vlp.pipeline.distributed import shutdown_distributed

        dist.barrier()
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
