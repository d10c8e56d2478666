"""`vlp bench loader`: our training loader vs a plain webdataset + PIL pipeline, per worker.

Data: real JPEG shards encoded with Pillow and written by data_prep.reshard's ShardWriter in
img2dataset's layout (`NNNNN.tar` holding `KEY.jpg`, `KEY.txt`, `KEY.json`, beside it
`NNNNN_stats.json`; each tar is renamed into place when complete), indexed with
data_prep.index.build_manifest; images are synthetic scenes (data_prep.scenes) rendered at
`--source-size` px and saved as quality-95 JPEG (img2dataset's default); captions from
data_prep.captions; a WordPiece tokenizer trained on them (data_prep.tokenizer). Cached under
bench_out/loader_data/ keyed by the parameters.

Both pipelines do the same work per sample: shuffle (same buffer size) -> JPEG decode -> resize
the shorter side to `image_size` (bicubic) -> centre crop -> (3, S, S) image -> tokenize to fixed
length with [CLS]...[SEP] -> batch -> BERT MLM masking. Ours: vlp.pipeline.data.loader's
build_train_loader, which hands over uint8 pixels (the model normalises them on its device, and a
GPU copy moves a quarter of fp32's bytes). Plain: wds.WebDataset(...).shuffle().decode("pil") with
normalised float images as users usually write it, explicit skip handlers, a per-sample image transform (what torchvision's Resize/CenterCrop/
ToTensor/Normalize do, in PIL + torch), per-sample `tokenizer(caption, padding="max_length",
...)` as users typically write it, batched by webdataset's default collation, masked per batch
with the same mask_tokens.

Per worker: the benchmark process uses one torch thread and TOKENIZERS_PARALLELISM=false, so
num_workers=0 is one core doing everything; num_workers=1 is one worker process (the main
process only receives batches). Each repeat builds a loader, skips its first `prefetch + 1`
batches (start-up, prefetched queue), then times `--batches` batches; the pipelines alternate.
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

from vlp.pipeline.bench.common import (
    OUT_DIR,
    environment,
    format_table,
    median,
    out_path,
    repeats_for,
    verdict,
    write_json,
)

GOAL_SPEEDUP = 1.5


def add_arguments(p) -> None:
    p.add_argument("--workers", default="0,1", help="comma-separated num_workers values")
    p.add_argument("--batch", type=int, default=32, help="samples per batch")
    p.add_argument("--batches", type=int, default=12, help="timed batches per repeat")
    p.add_argument("--image-size", type=int, default=224, help="model input size")
    p.add_argument("--source-size", type=int, default=256, help="JPEG size in the shards")
    p.add_argument("--max-text-len", type=int, default=40, help="caption tokens per sample")
    p.add_argument("--num-shards", "--shards", dest="shards", type=int, default=8,
                   help="shards to write and read")
    p.add_argument("--samples-per-shard", "--per-shard", dest="per_shard", type=int, default=256,
                   help="samples per shard")
    p.add_argument("--shuffle-buffer", type=int, default=500, help="samples in the shuffle buffer")
    p.add_argument("--data-dir", help="where to write/reuse the shards "
                   "(default bench_out/loader_data/<params>)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="also run a short real `vlp train` (tiny, 2 ranks) of this many steps on "
                        "the shards and report its logged perf/data_wait_share")


# ---- data ----------------------------------------------------------------------------------------

def write_jpeg_shards(out_dir: Path, shards: int, per_shard: int, source_size: int,
                      seed: int = 0) -> Path:
    """img2dataset-layout JPEG shards of synthetic scenes, indexed; returns out_dir."""
    import numpy as np

    from vlp.data_prep.captions import captions
    from vlp.data_prep.folder import Folder
    from vlp.data_prep.index import build_manifest
    from vlp.data_prep.reshard import ShardWriter
    from vlp.data_prep.scenes import WorldSpec, render_scene, sample_scene

    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").exists() and (out_dir / "tokenizer" / "tokenizer.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = WorldSpec()
    texts = []
    sink = ShardWriter(Folder(out_dir), per_shard)  # a new NNNNN.tar (+ NNNNN_stats.json) every per_shard
    for shard in range(shards):
        for i in range(per_shard):
            rng = np.random.default_rng([seed, shard, i])
            scene = sample_scene(rng, spec)
            buffer = io.BytesIO()
            render_scene(scene, rng, source_size).save(buffer, format="JPEG", quality=95)
            caption = captions(scene, rng, 1)[0]
            texts.append(caption)
            key = f"{shard:05d}{i:04d}"
            meta = {"key": key, "caption": caption, "width": source_size,
                    "height": source_size, "status": "success"}
            sink.write(key, {"jpg": buffer.getvalue(), "txt": caption.encode(),
                             "json": json.dumps(meta).encode()}, source="synthetic_scenes")
    sink.close()
    build_manifest(out_dir)
    from vlp.data_prep.tokenizer import train_tokenizer

    train_tokenizer(texts, out_dir / "tokenizer", vocab_size=1000)
    return out_dir


def shard_urls(data_dir: Path) -> str:
    """Brace pattern over the indexed shards (data_prep.index.shard_url_pattern), absolute."""
    from vlp.pipeline.data.manifest import shard_url_pattern

    return shard_url_pattern(Path(data_dir).resolve())


# ---- the two pipelines ---------------------------------------------------------------------------

def ours(urls: str, tokenizer, args, num_workers: int):
    from vlp.pipeline.data.loader import DataConfig, build_train_loader

    config = DataConfig(shards=urls, num_workers=num_workers, shuffle_buffer=args.shuffle_buffer)
    loader = build_train_loader(config, tokenizer, batch_size=args.batch, seed=0,
                                image_size=args.image_size, max_text_len=args.max_text_len,
                                rank=0, world_size=1)
    return loader, loader.close


def plain(urls: str, tokenizer, args, num_workers: int):
    """The webdataset + PIL pipeline people write first (see the module docstring)."""
    import numpy as np
    import torch
    import webdataset as wds
    from PIL import Image

    from vlp.models.model import IMAGE_MEAN, IMAGE_STD
    from vlp.pipeline.data.tokenizer import masking_spec
    from vlp.pipeline.data.transforms import mask_tokens

    size, max_len = args.image_size, args.max_text_len
    mean, std = torch.tensor(IMAGE_MEAN).view(3, 1, 1), torch.tensor(IMAGE_STD).view(3, 1, 1)
    masking = masking_spec(tokenizer, 0.15)
    generator = torch.Generator().manual_seed(0)

    def image_transform(image):  # Resize(size, bicubic), CenterCrop(size), ToTensor, Normalize
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        return (x - mean) / std

    def text_transform(caption):
        enc = tokenizer(caption, padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="pt")
        return enc["input_ids"][0], enc["attention_mask"][0].bool()

    def to_batch(batch):
        images, (ids, mask) = batch[0], batch[1]
        mlm_ids, mlm_labels = mask_tokens(ids, mask, masking, generator)
        return {"images": images, "text_ids": ids, "text_mask": mask, "mlm_ids": mlm_ids,
                "mlm_labels": mlm_labels}

    def collate(samples):
        images = torch.stack([s[0] for s in samples])
        ids = torch.stack([s[1][0] for s in samples])
        mask = torch.stack([s[1][1] for s in samples])
        return images, (ids, mask)

    dataset = (wds.WebDataset(urls, resampled=True, shardshuffle=False,
                              handler=wds.warn_and_continue, nodesplitter=None)
               .shuffle(args.shuffle_buffer)
               .decode("pil", handler=wds.warn_and_continue)
               .to_tuple("jpg", "txt", handler=wds.warn_and_continue)
               .map_tuple(image_transform, text_transform, handler=wds.warn_and_continue)
               .batched(args.batch, collation_fn=collate)
               .map(to_batch))
    if num_workers == 0:
        return iter(dataset), lambda: None
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=2)
    iterator = iter(loader)
    return iterator, getattr(iterator, "_shutdown_workers", lambda: None)


def time_batches(make, urls, tokenizer, args, num_workers: int) -> dict:
    iterable, close = make(urls, tokenizer, args, num_workers)
    iterator = iter(iterable)
    try:
        for _ in range(3 if num_workers else 1):  # start-up and the prefetched queue
            batch = next(iterator)
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(iterator)
        seconds = time.perf_counter() - start
    finally:
        close()
    assert batch["images"].shape == (args.batch, 3, args.image_size, args.image_size)
    return {"seconds": seconds, "samples_per_s": args.batch * args.batches / seconds}


# ---- optional: data-wait share of a short real training run -------------------------------------

def train_data_wait(data_dir: Path, steps: int, run_dir: Path) -> dict:
    """Run `vlp train` (tiny, 2 ranks, ZeRO-3 CPU config) and read its logged data-wait share."""
    import shutil

    from vlp.pipeline.train.config import recipe_path
    from vlp.pipeline.train.launch import run_training

    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"run_dir={run_dir}", f"data.shards={shard_urls(data_dir)}",
                 f"data.tokenizer={data_dir / 'tokenizer'}", f"optim.max_steps={steps}",
                 "optim.batch_size=32", "logging.every_steps=5", f"checkpoint.every_steps={steps}",
                 "data.num_workers=1", "optim.warmup_steps=1"]  # the lr does not matter here
    start = time.perf_counter()
    code = run_training(str(recipe_path("tiny_synth.yaml")), overrides, nproc=2)
    wall = time.perf_counter() - start
    records = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    shares = [r["perf/data_wait_share"] for r in records if "perf/data_wait_share" in r]
    return {"exit_code": code, "steps": steps, "wall_s": wall,
            "data_wait_share_per_window": shares,
            "data_wait_share_after_first_window": median(shares[1:]) if len(shares) > 1 else None,
            "samples_per_s": [r.get("perf/samples_per_s") for r in records]}


# ---- the benchmark -------------------------------------------------------------------------------

def run(args) -> int:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    from vlp.pipeline.data.manifest import load_manifest
    from vlp.pipeline.data.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    if args.quick:
        args.shards, args.per_shard, args.batch, args.batches = 2, 24, 8, 2
        args.source_size, args.image_size, args.shuffle_buffer = 96, 64, 16
    workers = [int(w) for w in args.workers.split(",")]
    repeats = repeats_for(args, full=5)
    key = f"s{args.shards}x{args.per_shard}_px{args.source_size}"
    data_dir = Path(args.data_dir) if args.data_dir else OUT_DIR / "loader_data" / key
    start = time.perf_counter()
    write_jpeg_shards(data_dir, args.shards, args.per_shard, args.source_size)
    prepare_s = time.perf_counter() - start
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    urls = shard_urls(data_dir)
    jpeg_bytes = median([m["bytes"] / m["samples"] for m in load_manifest(data_dir)["shards"]])

    results, rows = {}, []
    for n in workers:
        runs = {"ours": [], "plain": []}
        for _ in range(repeats):
            for name, make in (("ours", ours), ("plain", plain)):
                runs[name].append(time_batches(make, urls, tokenizer, args, n))
        entry = {name: {"samples_per_s_median": median([r["samples_per_s"] for r in rs]),
                        "samples_per_s": [r["samples_per_s"] for r in rs]}
                 for name, rs in runs.items()}
        entry["speedup"] = (entry["ours"]["samples_per_s_median"]
                            / entry["plain"]["samples_per_s_median"])
        # cross-check that cancels load changes slower than one ours+plain pair
        entry["speedup_round_ratio_median"] = median(
            [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs["ours"], runs["plain"])])
        results[f"workers_{n}"] = entry
        rows.append([n, entry["ours"]["samples_per_s_median"],
                     entry["plain"]["samples_per_s_median"], entry["speedup"],
                     entry["speedup_round_ratio_median"], max(entry["ours"]["samples_per_s"]),
                     max(entry["plain"]["samples_per_s"])])

    speedups = [r["speedup"] for r in results.values()]
    summary = {"speedup_per_core": verdict(min(speedups), GOAL_SPEEDUP),
               "ours_samples_per_s_per_core": results[f"workers_{workers[0]}"]["ours"][
                   "samples_per_s_median"]}
    path = out_path(args, "loader")
    train = None
    if args.train_steps and not args.quick:  # its run directory goes beside the JSON result
        train = train_data_wait(data_dir, args.train_steps,
                                path.with_name(path.stem + "_train_run"))
    payload = {"benchmark": "loader", "environment": environment("cpu"),
               "setup": {"batch": args.batch, "timed_batches": args.batches,
                         "image_size": args.image_size, "source_size": args.source_size,
                         "max_text_len": args.max_text_len, "shards": args.shards,
                         "per_shard": args.per_shard, "shuffle_buffer": args.shuffle_buffer,
                         "repeats": repeats, "torch_threads": 1, "data_dir": str(data_dir),
                         "jpeg_shard_bytes_per_sample": jpeg_bytes,
                         "data": "Pillow q95 JPEG, img2dataset-layout shards (data_prep.reshard)",
                         "prepare_s": prepare_s},
               "results": results, "summary": summary, "train_run": train}
    path = write_json(path, payload)
    print(format_table(["num_workers", "ours samples/s", "plain samples/s", "speed-up",
                        "per-round", "ours best", "plain best"], rows,
                       title=(f"bench loader: batch {args.batch}, {args.source_size}px JPEG -> "
                              f"{args.image_size}px, text {args.max_text_len}, median of "
                              f"{repeats} x {args.batches} batches, 1 torch thread")))
    v = summary["speedup_per_core"]
    print(f"ours vs plain webdataset+PIL per core: {v['value']:.2f}x (lowest over worker counts; "
          f"goal >= {GOAL_SPEEDUP}x: {'met' if v['met'] else 'NOT met'})")
    if train:
        print(f"short training run ({train['steps']} steps, tiny, 2 ranks): data-wait share "
              f"{train['data_wait_share_after_first_window']} (exit {train['exit_code']})")
    print(f"wrote {path}")
    return 0
