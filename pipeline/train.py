"""Pretraining entry point: the script the `deepspeed` launcher starts on every rank.

    deepspeed --num_accelerators 2 pipeline/train.py --recipe pipeline/recipes/tiny_synth.yaml \
        --set run_dir=runs/tiny optim.max_steps=500

A step: fetch a batch (timed as data wait), forward (all losses inside the module, as ZeRO-3
requires), agree across ranks whether the loss is finite, backward + optimizer step through the
DeepSpeed engine, log, checkpoint. The loader position and RNG states travel in the checkpoint, so
a resumed run continues with exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.checkpoint import CheckpointError, read_state, resolve_resume, save_checkpoint
from pipeline.config import TrainConfig, load_train_config
from pipeline.distributed import init_distributed, shutdown_distributed
from pipeline.metrics import MetricsLogger, measure_peak_flops
from pipeline.optim import build_optimizer, build_scheduler
from pipeline.rng import get_rng_state, set_rng_state


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss."""


def build_ds_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON config with batch size, accumulation and clipping from the recipe."""
    ds_config = json.loads(Path(cfg.ds_config).read_text())
    owned = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping", "optimizer", "scheduler")
    clashes = [key for key in owned if key in ds_config]
    if clashes:
        raise ValueError(f"{cfg.ds_config} sets {', '.join(clashes)}; these come from the recipe "
                         "(optim.batch_size, optim.grad_accum, optim.grad_clip, optim.*)")
    ds_config.update(train_micro_batch_size_per_gpu=cfg.optim.batch_size,
                     gradient_accumulation_steps=cfg.optim.grad_accum,
                     gradient_clipping=cfg.optim.grad_clip)
    return ds_config


def _train_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def _model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {
        "images": batch["images"].to(device=device, dtype=dtype, non_blocking=True),
        "text_ids": batch["text_ids"].to(device),
        "text_mask": batch["text_mask"].to(device),
        "mlm_ids": batch["mlm_ids"].to(device),
        "mlm_labels": batch["mlm_labels"].to(device),
    }


def _mean_over_ranks(outputs: dict) -> dict[str, float]:
    """All scalar outputs averaged over ranks (one all-reduce); NaN anywhere stays NaN."""
    names = sorted(k for k, v in outputs.items() if torch.is_tensor(v) and v.numel() == 1)
    values = torch.stack([outputs[k].detach().float().reshape(()) for k in names]).cpu()
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(names, values.tolist()))


def _sum_counts_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, counts)
    total: dict[str, int] = {}
    for rank_counts in gathered:
        for kind, n in rank_counts.items():
            total[kind] = total.get(kind, 0) + n
    return total


class Trainer:
    """Holds the engine, loader and bookkeeping of one pretraining run."""

    def __init__(self, cfg: TrainConfig):
        import deepspeed

        from data_prep.tokenizer import load_tokenizer
        from models.config import load_config
        from models.model import LossWeights, UnifiedModel
        from pipeline.data import LoaderConfig, build_train_loader

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.rank, self.world = init_distributed(cfg.dist_timeout_s)
        self.is_main = self.rank == 0

        resume_tag = resolve_resume(self.ckpt_dir, cfg.checkpoint.resume)
        if resume_tag is not None:
            saved_world = read_state(resume_tag)["world_size"]
            if saved_world != self.world:
                raise CheckpointError(
                    f"{resume_tag} was written by {saved_world} ranks; this run has {self.world}. "
                    "The loader position is per rank, so resuming needs the same world size. "
                    "Run with the original size, or start a new run (checkpoint.resume=none) from "
                    "weights exported with `vlp export`.")

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.tokenizer_path = Path(cfg.data.tokenizer)
        self.model_config = load_config(cfg.model.name, vocab_size=len(self.tokenizer),
                                        **cfg.model.overrides)
        self.loader = build_train_loader(
            LoaderConfig(shards=cfg.data.shards, weights=cfg.data.weights,
                         resampled=cfg.data.resampled, batch_size=cfg.optim.batch_size,
                         num_workers=cfg.data.num_workers, seed=cfg.seed,
                         image_size=self.model_config.image_size,
                         max_text_len=self.model_config.max_text_len,
                         mlm_probability=cfg.data.mlm_probability,
                         shuffle_buffer=cfg.data.shuffle_buffer,
                         samples_per_epoch=cfg.data.samples_per_epoch),
            self.tokenizer, self.rank, self.world)

        ds_config = build_ds_config(cfg)
        self.dtype = _train_dtype(ds_config)
        zero = ds_config.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        weights = LossWeights(itc=cfg.model.itc_weight, itm=cfg.model.itm_weight,
                              mlm=cfg.model.mlm_weight)
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero.get("stage") == 3):
            model = UnifiedModel(self.model_config, loss_weights=weights)
        optimizer = build_optimizer(model, cfg.optim, offload)
        # A factory: ZeRO wraps the optimizer and the schedule must drive the wrapped one.
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda wrapped: build_scheduler(wrapped, cfg.optim))

        self.step = 0
        self.skipped_updates = 0  # non-finite steps over the whole run, resumes included
        torch.manual_seed(cfg.seed + 1000 + self.rank)  # per-rank stream (hard-negative sampling)
        if resume_tag is not None:
            self._load(resume_tag)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main)
        self.peak_flops = self._peak_flops()

    def _peak_flops(self) -> float:
        if self.cfg.logging.peak_tflops:
            return self.cfg.logging.peak_tflops * 1e12
        device = "cuda" if torch.cuda.is_available() else "cpu"
        measured = torch.tensor(measure_peak_flops(self.dtype, device=device))
        dist.all_reduce(measured)  # ranks share the machine here; use their mean
        return measured.item() / self.world

    def _load(self, tag_dir: Path) -> None:
        _, client_state = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag_dir.name)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
        own = client_state["ranks"][self.rank]
        self.step = client_state["step"]
        self.skipped_updates = client_state.get("skipped_updates", 0)  # absent in older tags
        self.loader.load_state_dict(own["loader"])
        set_rng_state(own["rng"])
        if self.is_main:
            print(f"resumed from {tag_dir} at step {self.step}", flush=True)

    def _open_key_log(self):
        if not self.cfg.logging.sample_keys:
            return None
        path = self.run_dir / "samples" / f"rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", buffering=1)

    def save(self) -> None:
        from models.export import config_meta

        per_rank = [None] * self.world
        dist.all_gather_object(per_rank, {"loader": self.loader.state_dict(),
                                          "rng": get_rng_state()})
        client_state = {"step": self.step, "world_size": self.world, "ranks": per_rank,
                        "skipped_updates": self.skipped_updates}
        metadata = {
            "config.json": json.dumps(config_meta(self.engine.module), indent=1),
            "tokenizer.json": _tokenizer_json(self.tokenizer_path),
        }
        crash = self.cfg.faults.crash_during_save_at_step == self.step
        save_checkpoint(self.engine, self.ckpt_dir, self.step, client_state, metadata,
                        self.cfg.checkpoint.keep_last,
                        before_publish=_kill_during_save if crash else None)

    def run(self) -> dict:
        from models.flops import flops_per_sample

        cfg = self.cfg
        samples_per_step = cfg.optim.batch_size * cfg.optim.grad_accum * self.world
        sample_flops = flops_per_sample(self.model_config,
                                        global_batch=cfg.optim.batch_size * self.world,
                                        weights=self.engine.module.loss_weights)
        bar = _progress_bar(self.is_main and cfg.logging.progress_bar, self.step,
                            cfg.optim.max_steps)
        nonfinite_in_row = 0
        window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
        key_log = self._open_key_log()
        if cfg.checkpoint.save_initial and self.step == 0:
            self.save()
        last_scalars: dict[str, float] = {}
        batches = iter(self.loader)
        try:
            while self.step < cfg.optim.max_steps:
                finite = True
                lr = self.engine.get_lr()[0]  # the rate this step's update uses
                for _ in range(cfg.optim.grad_accum):
                    wait_start = time.perf_counter()
                    batch = next(batches)
                    window_wait += time.perf_counter() - wait_start
                    if key_log is not None:
                        record = {"step": self.step + 1, "keys": batch["keys"]}
                        key_log.write(json.dumps(record) + "\n")
                    outputs = self.engine(**_model_inputs(batch, self.engine.device, self.dtype))
                    if self.step + 1 in cfg.faults.inject_nonfinite_at and self.is_main:
                        outputs["loss"] = outputs["loss"] * float("nan")
                    scalars = _mean_over_ranks(outputs)
                    if not math.isfinite(scalars["loss"]):
                        finite = False  # every rank sees the same reduced value: all skip together
                        continue
                    self.engine.backward(outputs["loss"])
                    self.engine.step()
                self.step += 1
                window_steps += 1
                if finite:
                    nonfinite_in_row = 0
                    last_scalars = scalars
                else:
                    nonfinite_in_row += 1
                    self.skipped_updates += 1
                    if self.is_main:
                        print(f"step {self.step}: non-finite loss, update skipped "
                              f"({nonfinite_in_row} in a row)", flush=True)
                    if nonfinite_in_row >= cfg.faults.max_nonfinite_in_row:
                        raise NonFiniteLossError(
                            f"{nonfinite_in_row} consecutive steps had a non-finite loss (last at "
                            f"step {self.step}); stopping. Lower optim.lr or check the data; "
                            "resume from the last checkpoint with --resume latest.")
                if self.step % cfg.logging.every_steps == 0 or self.step == cfg.optim.max_steps:
                    elapsed = time.perf_counter() - window_start
                    samples_per_s = samples_per_step * window_steps / elapsed
                    skipped = _sum_counts_over_ranks(self.loader.skipped_counts())
                    record = {_tag(name): value for name, value in scalars.items()}
                    record.update({
                        "train/lr": lr,
                        "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                        "perf/samples_per_s": samples_per_s,
                        "perf/mfu": sample_flops * samples_per_s / (self.peak_flops * self.world),
                        "perf/data_wait_share": window_wait / elapsed,
                        "train/skipped_updates": self.skipped_updates,
                        **{f"data/skipped_{kind}": n for kind, n in skipped.items()},
                    })
                    self.logger.log(self.step, record)
                    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.optim.max_steps:
                    self.save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}")
        finally:  # also on the non-finite stop, so TensorBoard and the logs are flushed
            if bar is not None:
                bar.close()
            if key_log is not None:
                key_log.close()
            self.logger.close()
        summary = {"step": self.step, "final": last_scalars, "skipped_updates": self.skipped_updates,
                   "skipped_samples": _sum_counts_over_ranks(self.loader.skipped_counts())}
        if self.is_main:
            (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _tag(output_name: str) -> str:
    """TensorBoard tag of a model output: loss/total, loss/itc, ..., train/itc_acc."""
    if output_name == "loss":
        return "loss/total"
    if output_name.endswith("_loss"):
        return f"loss/{output_name[:-len('_loss')]}"
    return f"train/{output_name}"


def _kill_during_save(partial_dir: Path) -> None:
    """faults.crash_during_save_at_step: die as a killed process would, in the middle of saving."""
    print(f"fault injection: SIGKILL rank 0 while saving {partial_dir}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _tokenizer_json(path: Path) -> str:
    path = Path(path)
    return (path / "tokenizer.json" if path.is_dir() else path).read_text()


def _progress_bar(enabled: bool, start: int, total: int):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain the unified model (run under deepspeed).")
    parser.add_argument("--recipe", help="YAML training recipe")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.lr=3e-4 run_dir=runs/x")
    parser.add_argument("--resume", help="shorthand for --set checkpoint.resume=MODE")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by deepspeed
    args = parser.parse_args(argv)
    overrides = list(args.set) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        return _train(args.recipe, overrides)
    finally:
        shutdown_distributed()


def _train(recipe: str | None, overrides: list[str]) -> int:
    """Exit codes: 0 done, 2 invalid config/data/checkpoint (before any step), 3 non-finite loss."""
    try:
        trainer = Trainer(load_train_config(recipe, overrides))
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        trainer.run()
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
