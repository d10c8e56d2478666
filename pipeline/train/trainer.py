"""Pretraining: the Trainer that sets up a run and the loop that reads as the sequence of a step.

Started on every rank by the `deepspeed` launcher (`vlp train` builds the command):

    deepspeed --num_accelerators 2 --module vlp.pipeline.train \\
        --recipe tiny_synth.yaml --set run_dir=runs/tiny optim.max_steps=500

A step (step.py): fetch grad_accum batches, forward (all losses inside the module, as ZeRO-3
requires), backward, update (skipped on every rank together when a loss is not finite). Then the
metrics meter logs when its window is due and the checkpointer saves when its interval is due.
The loader position and RNG states travel in the checkpoint, so a resumed run continues with
exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from vlp.pipeline.data.checkpoints import (
    CheckpointError,
    complete_tags,
    load_state,
    resolve_resume,
    validate_tag,
)
from vlp.pipeline.data.errors import READ_COUNTS, SKIP_KINDS, UserError, error_line
from vlp.pipeline.data.files import write_json_atomic
from vlp.pipeline.data.loader import UnreadableShards, check_readable
from vlp.pipeline.data.model_loading import load_float_model
from vlp.pipeline.distributed import fast_bf16, init_distributed
from vlp.pipeline.train.checkpointer import Checkpointer, clear_checkpoints, rank_state_in
from vlp.pipeline.train.comms import CommsRecorder, comms_logging_enabled
from vlp.pipeline.train.config import TrainConfig, load_train_config, read_ds_config
from vlp.pipeline.train.faults import FaultInjector
from vlp.pipeline.train.heartbeat import HangGuard
from vlp.pipeline.train.metrics import MetricsLogger, MetricsMeter, measure_peak_flops
from vlp.pipeline.train.optim import build_optimizer, build_scheduler
from vlp.pipeline.train.peak_flops import Peak, known_peak
from vlp.pipeline.train.rng import get_rng_state, set_rng_state
from vlp.pipeline.train.shared_dir import check_shared_run_dir
from vlp.pipeline.train.status import Progress
from vlp.pipeline.train.step import TrainStep


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss."""


def build_ds_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON config with batch size, accumulation and clipping from the recipe."""
    ds_config = read_ds_config(cfg.ds_config)
    owned = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping", "optimizer", "scheduler")
    clashes = [key for key in owned if key in ds_config]
    if clashes:
        raise UserError(f"{cfg.ds_config} sets {', '.join(clashes)}; these come from the recipe "
                        "(optim.batch_size, optim.grad_accum, optim.grad_clip, optim.*)")
    ds_config.update(train_micro_batch_size_per_gpu=cfg.optim.batch_size,
                     gradient_accumulation_steps=cfg.optim.grad_accum,
                     gradient_clipping=cfg.optim.grad_clip)
    return ds_config


def train_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


class RunInputs(NamedTuple):
    """What a run reads before it builds anything: each part validated, UserError if bad."""

    resume_tag: Path | None
    universal: bool  # the tag was written by another world size (checkpoint.change_world_size)
    tokenizer: object
    tokenizer_json: str  # what every checkpoint stores as its tokenizer.json
    model_config: object
    loader: object  # a lazy TrainLoader: no worker starts before the first batch
    ds_config: dict


def prepare_inputs(cfg: TrainConfig, rank: int, world: int,
                   validate: Callable[[Path], list[str]] = validate_tag) -> RunInputs:
    """Resume tag, tokenizer, model config, this rank's loader and the DeepSpeed config.

    Cheap enough for the `vlp train` parent to run before launching (`check_run`), so a bad
    input is one error line there instead of a traceback from every rank. `validate` checks the
    resume tag (the ranks of a run share the checksums out)."""
    from vlp.models.config import load_config
    from vlp.pipeline.data.loader import build_train_loader
    from vlp.pipeline.data.model_loading import resolve_checkpoint
    from vlp.pipeline.data.tokenizer import load_tokenizer

    checkpoint = cfg.checkpoint
    resume_tag = resolve_resume(Path(cfg.run_dir) / "checkpoints", checkpoint.resume,
                                checkpoint.overwrite, validate=validate)
    universal = False
    if resume_tag is not None:
        universal = _world_size_changes(resume_tag, world, checkpoint.change_world_size)
    elif cfg.model.init_from:
        try:
            resolve_checkpoint(cfg.model.init_from)
        except UserError as exc:
            raise UserError(f"model.init_from: {exc}") from exc
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        tokenizer_json = _tokenizer_json(cfg.data.tokenizer)
    except UserError as exc:
        raise UserError(f"data.tokenizer: {exc}") from exc
    try:
        model_config = load_config(cfg.model.name, vocab_size=len(tokenizer), **cfg.model.overrides)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model: {exc}") from exc
    if resume_tag is None:
        _check_tower_sources(cfg, model_config)
    loader = build_train_loader(
        cfg.data, tokenizer, batch_size=cfg.optim.batch_size, seed=cfg.seed,
        image_size=model_config.image_size, max_text_len=model_config.max_text_len,
        rank=rank, world_size=world)
    ds_config = build_ds_config(cfg)
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return RunInputs(resume_tag, universal, tokenizer, tokenizer_json, model_config, loader,
                     ds_config)


def _check_tower_sources(cfg: TrainConfig, model_config) -> None:
    """model.init_text_from / init_image_from checked by their config.json, before launch."""
    from vlp.models.hf_init import check_sources

    try:
        check_sources(model_config, cfg.model.init_text_from, cfg.model.init_image_from)
    except (ValueError, OSError) as exc:
        raise UserError(f"model.init_text_from / init_image_from: {exc}") from exc


def check_run(recipe: str | None, overrides: list[str], world: int) -> TrainConfig:
    """Load and validate a whole run (config, tokenizer, shards for `world` ranks, DeepSpeed
    config, resume tag) as rank 0 would, without starting anything; UserError if bad."""
    cfg = load_train_config(recipe, overrides)
    prepare_inputs(cfg, 0, world).loader.close()
    return cfg


class Trainer:
    """One pretraining run on this rank: engine, loader, step, meter and checkpointer."""

    def __init__(self, cfg: TrainConfig):
        import deepspeed

        from vlp.models.export import config_meta
        from vlp.models.flops import flops_per_sample
        from vlp.models.model import LossWeights

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.rank, self.world, self.device = init_distributed(cfg.dist_timeout_s, cfg.dist_backend)
        self.is_main = self.rank == 0
        check_shared_run_dir(self.run_dir)  # before any rank looks for a checkpoint
        self.guard = HangGuard(self.run_dir, self.rank, self.world, cfg.dist_timeout_s,
                               cfg.step_timeout_s, cfg.heartbeat_every_s)
        ckpt_dir = self.run_dir / "checkpoints"
        inputs = prepare_inputs(cfg, self.rank, self.world, validate=self._validate_together)
        resume_tag, universal = inputs.resume_tag, inputs.universal
        self.tokenizer, self.loader = inputs.tokenizer, inputs.loader
        model_config, ds_config = inputs.model_config, inputs.ds_config
        if resume_tag is None:
            self._clear_overwritten(ckpt_dir)
        self._fall_back_from_emulated_bf16(ds_config)
        zero = ds_config.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        weights = LossWeights(itc=cfg.model.itc_weight, itm=cfg.model.itm_weight,
                              mlm=cfg.model.mlm_weight, lm=cfg.model.lm_weight)
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero.get("stage") == 3):
            model = self._build_model(model_config, weights)
        self._init_towers(model, resume_tag)
        if cfg.model.init_from:
            source = load_float_model(cfg.model.init_from, "model.init_from")
            if resume_tag is None:
                self._warm_start(model, source)
            self._keep_pruned(model, source.model)
        if cfg.distill.teacher:
            self._attach_teacher(model, cfg.distill.teacher)
        self.optimizer = build_optimizer(model, cfg.optim, offload)
        # A factory: ZeRO wraps the optimizer and the schedule must drive the wrapped one.
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=ds_config,
            lr_scheduler=lambda wrapped: build_scheduler(wrapped, cfg.optim))

        self.faults = FaultInjector(cfg.faults, self.rank)
        self.checkpointer = Checkpointer(
            self.engine, ckpt_dir, every_steps=cfg.checkpoint.every_steps,
            keep_last=cfg.checkpoint.keep_last, save_initial=cfg.checkpoint.save_initial,
            max_steps=cfg.optim.max_steps,
            metadata={"config.json": json.dumps(config_meta(model), indent=1),
                      "tokenizer.json": inputs.tokenizer_json},
            shared_state=lambda: {"skipped_updates": int(self.meter.skipped.item())},
            rank_state=lambda: {"loader": self.loader.state_dict(), "rng": get_rng_state()},
            before_publish=self.faults.before_publish)
        self.key_log = self._open_key_log()
        self.comms = CommsRecorder(self.run_dir, self.rank, comms_logging_enabled(ds_config))
        self.train_step = TrainStep(self.engine, self.optimizer, cfg.optim.grad_accum,
                                    self.faults, on_batch=self._log_keys if self.key_log else None)
        dtype = train_dtype(ds_config)
        self.meter = MetricsMeter(
            every_steps=cfg.logging.every_steps, max_steps=cfg.optim.max_steps,
            samples_per_step=cfg.optim.batch_size * cfg.optim.grad_accum * self.world,
            flops_per_sample=flops_per_sample(model_config, weights=weights,
                                              global_batch=cfg.optim.batch_size * self.world,
                                              local_batch=cfg.optim.batch_size,
                                              edited_negatives=cfg.data.edited_negatives),
            peak_flops_total=self._peak_flops(dtype), device=self.device)

        self.step = 0
        self.save_seconds: dict[int, float] = {}  # this launch's checkpoint saves
        self.logged_saves = -1  # the last save whose time a logging record carries
        torch.manual_seed(cfg.seed + 1000 + self.rank)  # per-rank stream (hard-negative sampling)
        if resume_tag is not None:
            self._resume(resume_tag, universal)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "train_config.json", cfg.to_dict())
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main)

    def _fall_back_from_emulated_bf16(self, ds_config: dict) -> None:
        """A bf16 config on a device without native bf16 matmuls trains in fp32, and says so."""
        if not ds_config.get("bf16", {}).get("enabled") or fast_bf16(self.device):
            return
        ds_config["bf16"]["enabled"] = False
        if self.is_main:
            print(f"{self.cfg.ds_config} asks for bf16, but this {self.device.type} has no native "
                  "bf16 matmul (emulated, slower than fp32): training in fp32"
                  + ("; on GPUs before compute capability 8.0 ds_config=zero3_fp16.json "
                     "trains in fp16 with loss scaling" if self.device.type == "cuda" else ""),
                  flush=True)

    def _build_model(self, model_config, weights) -> torch.nn.Module:
        """The model to train: a UnifiedModel, or a DistilledModel when distill.teacher is set."""
        from vlp.models.distill import DistilledModel, DistillWeights
        from vlp.models.model import UnifiedModel

        distill, uniform = self.cfg.distill, self.cfg.model.itm_uniform_negatives
        if not distill.teacher:
            return UnifiedModel(model_config, loss_weights=weights, itm_uniform_negatives=uniform)
        return DistilledModel(model_config, loss_weights=weights, distill=DistillWeights(
            itc=distill.itc_weight, mlm=distill.mlm_weight, temperature=distill.temperature),
            itm_uniform_negatives=uniform)

    def _attach_teacher(self, model: torch.nn.Module, path: str) -> None:
        """Load the frozen teacher (full weights on every rank; deepspeed.initialize then
        partitions it under ZeRO-3) and attach it to the student."""
        teacher = load_float_model(path, "distill.teacher", self.device)
        try:
            model.attach_teacher(teacher.model)
        except ValueError as exc:
            raise UserError(f"distill.teacher {path}: {exc}") from exc
        if self.is_main:
            print(f"distillation: teacher {teacher.info.path} (step {teacher.info.step}, width "
                  f"{teacher.model.config.width}), frozen, in the student's forward", flush=True)

    def _keep_pruned(self, model: torch.nn.Module, source: torch.nn.Module) -> None:
        """A pruned warm start keeps its zeros: its pruned layers are masked in forward
        (vlp.models.sparsity), so they get zero gradient and stay exactly zero; the run's
        checkpoints carry the pruning record."""
        from vlp.models.sparsity import keep_zeros, pruning_record, set_pruning_record, zero_masks

        masks = zero_masks(source)
        if not masks:
            return
        keep_zeros(model, masks)
        set_pruning_record(model, pruning_record(source))
        if self.is_main:
            kept = sum(int(m.sum()) for m in masks.values())
            total = sum(m.numel() for m in masks.values())
            print(f"pruned warm start: {len(masks)} layers keep their zeros "
                  f"(sparsity {1 - kept / total:.3f})", flush=True)

    def _warm_start(self, model: torch.nn.Module, source) -> None:
        """Copy the weights of a loaded checkpoint or export into `model`."""
        path = source.info.path
        theirs, ours = source.info.config, model.config.to_dict()
        differing = sorted(k for k in ours if theirs.get(k) != ours[k])
        if differing:
            raise UserError(f"model.init_from {path}: its model config differs from this run's in "
                            + ", ".join(f"{k} ({theirs.get(k)!r} vs {ours[k]!r})"
                                        for k in differing))
        self._copy_weights(model, source.model.state_dict())
        if self.is_main:
            print(f"warm start: weights of {source.info.path} (step {source.info.step}); "
                  "optimizer, schedule and data order start fresh", flush=True)

    def _init_towers(self, model: torch.nn.Module, resume_tag: Path | None) -> None:
        """model.init_text_from / init_image_from on a fresh run: the towers start from local
        Hugging Face checkpoints (vlp.models.hf_init); rank 0 prints what was not loaded."""
        from vlp.models.hf_init import pretrained_weights

        text, image = self.cfg.model.init_text_from, self.cfg.model.init_image_from
        if resume_tag is not None or not (text or image):
            return
        try:
            weights, report = pretrained_weights(model.config, text, image)
        except (ValueError, OSError) as exc:
            raise UserError(f"model.init_text_from / init_image_from: {exc}") from exc
        self._copy_weights(model, weights)
        if self.is_main:
            print(report.summary(), flush=True)

    def _copy_weights(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into the parameters they name before DeepSpeed builds its optimizer
        from them (ZeRO-3: each parameter gathered, written on rank 0, re-partitioned)."""
        import deepspeed

        params = {name: p for name, p in model.named_parameters() if name in weights}
        partitioned = any(hasattr(p, "ds_id") for p in params.values())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                               enabled=partitioned), torch.no_grad():
            if self.rank == 0 or not partitioned:
                for name, param in params.items():
                    param.copy_(weights[name])

    def _clear_overwritten(self, ckpt_dir: Path) -> None:
        """A fresh start with checkpoint.overwrite deletes the run's old checkpoints first."""
        if self.cfg.checkpoint.overwrite and complete_tags(ckpt_dir):
            if self.is_main:
                print(f"checkpoint.overwrite: deleting the checkpoints in {ckpt_dir}", flush=True)
                clear_checkpoints(ckpt_dir)
            dist.barrier()

    def _validate_together(self, tag_dir: Path) -> list[str]:
        """validate_tag with the checksums shared out between the ranks; every rank gets all
        the problems."""
        gathered = [None] * self.world
        dist.all_gather_object(gathered, validate_tag(tag_dir, part=(self.rank, self.world)))
        return sorted({problem for problems in gathered for problem in problems})

    def _peak_flops(self, dtype: torch.dtype) -> float:
        """Peak FLOP/s of the whole job: configured or from the datasheet per device
        (peak_flops.py), else measured on every rank; rank 0 says which."""
        peak = known_peak(self.cfg.logging.peak_tflops, self.device, dtype)
        if peak is not None:
            total = peak.tflops * 1e12 * self.world
        else:
            measured = torch.tensor(measure_peak_flops(dtype, self.device), device=self.device)
            dist.all_reduce(measured)  # on the device: NCCL has no CPU backend
            total = measured.item()
            peak = Peak(total / self.world / 1e12, "measured: a dense matmul in the training "
                                                   f"dtype, mean of {self.world} rank(s)")
        if self.is_main:
            print(f"MFU peak: {peak.tflops:.3g} TFLOP/s per device ({peak.source})", flush=True)
        return total

    def _resume(self, tag_dir: Path, universal: bool) -> None:
        if universal:
            self._resume_universal(tag_dir)
            return
        client_state = self.checkpointer.load(tag_dir)
        own = rank_state_in(tag_dir, self.rank, client_state)
        self.step = client_state["step"]
        self.meter.restore(client_state.get("skipped_updates", 0))  # absent in older tags
        self.loader.load_state_dict(own["loader"])
        set_rng_state(own["rng"])
        if self.is_main:
            print(f"resumed from {tag_dir} at step {self.step}", flush=True)

    def _resume_universal(self, tag_dir: Path) -> None:
        """Resume a tag of another world size through its universal form (universal.py)."""
        from vlp.pipeline.train.universal import universal_copy

        copy = universal_copy(tag_dir, self.rank, wait_s=max(3600, self.cfg.dist_timeout_s))
        client_state = self.checkpointer.load(copy)
        dist.barrier()  # every rank has read the copy
        if self.is_main:
            shutil.rmtree(copy, ignore_errors=True)
        self.step = client_state["step"]
        self.meter.restore(client_state.get("skipped_updates", 0))
        self.loader.continue_after([rank_state_in(tag_dir, rank, client_state)["loader"]
                                    for rank in range(client_state["world_size"])])
        if self.is_main:
            print(f"resumed from {tag_dir} at step {self.step} on {self.world} rank(s); it was "
                  f"written by {client_state['world_size']}: weights, optimizer state and "
                  "schedule carried over (DeepSpeed's universal checkpoint), the data order "
                  "continues at the next epoch", flush=True)

    def run(self) -> dict:
        """Train to optim.max_steps; returns the summary also written to train_summary.json."""
        max_steps = self.cfg.optim.max_steps
        log_cfg = self.cfg.logging
        progress = Progress(self.is_main, self.step, max_steps, log_cfg.status_every_steps,
                            bar=log_cfg.progress_bar)
        batches = self.guard.batches(self.loader)
        record: dict[str, float] = {}
        try:
            if self.step == 0:
                self._save(0)
            while self.step < max_steps:
                lr = self.engine.get_lr()[0]  # the rate this step's update uses
                self.step += 1
                with self.guard.step(self.step), self.comms.step(self.step):
                    result = self.train_step(batches, self.step)
                self.meter.update(result.scalars, result.nonfinite, result.data_wait_s)
                logged = self._log(lr) if self.meter.due(self.step) else None
                record = logged or record
                self._save(self.step)
                progress.step_done(self.step, logged)
        finally:  # also on the non-finite stop, so TensorBoard and the logs are flushed
            self.guard.close()
            progress.close()
            if self.key_log is not None:
                self.key_log.close()
            self.logger.close()
        counts = self._data_counts()
        summary = {"step": self.step, "final": record,
                   "skipped_updates": int(self.meter.skipped.item()),
                   "skipped_samples": {k: n for k, n in counts.items() if k in SKIP_KINDS},
                   "reads": {k: n for k, n in counts.items() if k in READ_COUNTS},
                   "checkpoint_save_s": self.save_seconds}
        if self.is_main:
            write_json_atomic(self.run_dir / "train_summary.json", summary)
        return summary

    def _save(self, step: int) -> None:
        """Save when the checkpointer is due, under the start-up collective timeout (rank 0
        publishes and prunes while the others wait); its seconds go to the next logging record
        (checkpoint/save_s) and the run's summary."""
        if not self.checkpointer.due(step):
            return
        start = time.perf_counter()
        with self.guard.slow("checkpoint"):
            self.checkpointer.save(step)
        self.save_seconds[step] = time.perf_counter() - start

    def _log(self, lr: float) -> dict[str, float]:
        """Write the logging record of the window ending at this step; stop on a NaN streak or
        too many unreadable shards."""
        worst = self.meter.worst_nonfinite_run()
        counts = self._data_counts()
        extra = {"train/lr": lr,
                 "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                 **{f"data/skipped_{kind}": counts[kind] for kind in SKIP_KINDS},
                 "data/shard_reads": counts["shard_reads"],
                 "data/retries": counts["read_retries"]}
        if self.save_seconds and max(self.save_seconds) > self.logged_saves:
            self.logged_saves = max(self.save_seconds)
            extra["checkpoint/save_s"] = self.save_seconds[self.logged_saves]
        record = self.meter.collect(extra)
        self.logger.log(self.step, record)
        if worst and self.is_main:
            print(f"step {self.step}: {worst} update(s) in a row skipped for a non-finite loss "
                  f"({record['train/skipped_updates']} in the run)", flush=True)
        if worst >= self.cfg.faults.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"{worst} consecutive steps had a non-finite loss (seen at step {self.step}); "
                "stopping. Lower optim.lr or check the data; resume from the last checkpoint "
                "with --resume latest.")
        check_readable(counts, self.cfg.data.max_unreadable_share)
        return record

    def _data_counts(self) -> dict[str, int]:
        """The loader's skips and reads, summed over ranks."""
        gathered = [None] * self.world
        dist.all_gather_object(gathered, self.loader.counts())
        total: dict[str, int] = {}
        for counts in gathered:
            for kind, n in counts.items():
                total[kind] = total.get(kind, 0) + n
        return total

    def _open_key_log(self):
        if not self.cfg.logging.sample_keys:
            return None
        path = self.run_dir / "samples" / f"rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", buffering=1)

    def _log_keys(self, step: int, micro_step: int, batch: dict) -> None:
        record = {"step": step, "micro": micro_step, "keys": batch["keys"]}
        self.key_log.write(json.dumps(record) + "\n")


def _world_size_changes(tag_dir: Path, world: int, allowed: bool) -> bool:
    """Whether resuming `tag_dir` changes the world size; CheckpointError unless `allowed`."""
    saved_world = load_state(tag_dir)["world_size"]
    if saved_world == world:
        return False
    if allowed:
        return True
    raise CheckpointError(
        f"{tag_dir} was written by {saved_world} ranks; this run has {world}. Run with "
        f"{saved_world}, or set checkpoint.change_world_size=true (weights, optimizer state and "
        "schedule carry over through DeepSpeed's universal checkpoint; the data order continues "
        "at the next epoch, as loader positions are per rank), or start a new run from its "
        f"weights alone with model.init_from={tag_dir} in another run_dir.")


def _tokenizer_json(path: str) -> str:
    """The tokenizer's tokenizer.json text, which checkpoints carry; UserError without one."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path} has no tokenizer.json, which checkpoints store as the "
                        "tokenizer; write one with AutoTokenizer.from_pretrained(DIR)"
                        ".save_pretrained(DIR)")
    return file.read_text()


def train(recipe: str | None, overrides: list[str]) -> int:
    """Exit codes: 0 done, 2 invalid config/data/checkpoint (before any step), 3 non-finite loss,
    4 too many unreadable shards (data.max_unreadable_share).
    Rank 0 prints the error line (`vlp train: error: ...`): every rank reads the same config,
    data and checkpoint, and the loss is all-reduced, so the other ranks fail the same way."""
    try:
        trainer = Trainer(load_train_config(recipe, overrides))
    except UserError as exc:
        _print_error(exc)
        return 2
    try:
        trainer.run()
    except NonFiniteLossError as exc:
        _print_error(exc)
        return 3
    except UnreadableShards as exc:
        _print_error(exc)
        return 4
    return 0


def _print_error(exc: Exception) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(error_line("train", exc), file=sys.stderr, flush=True)
