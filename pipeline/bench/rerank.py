"""`vlp bench rerank`: ITM re-ranking of the top k in both directions, against its FLOP count.

Data: the retrieval test split of a synthetic world (`--images` images, 5 captions each, written
by data_prep.synth under bench_out/rerank_data/), or `--karpathy-json` + `--image-root`. Model:
`--checkpoint`, or a randomly initialised `tiny` with a tokenizer trained on the captions
(speed does not depend on the weights).

Ours is the retrieval job's ItmScorer: every distinct (caption, image) pair of the text->image and
image->text top k scored once, each caption's bottom states and each image's fused-layer memory
computed once. Its FLOPs come from vlp.models.flops.rerank_flops (image bottom + memory per image,
caption bottom per caption, one fused pass per pair) and the FLOP-bound time is FLOPs / peak, the
peak measured in the same run as training measures it (vlp.pipeline.train.metrics). The reference
is the per-pair path (`UnifiedModel.itm_logits`: decode the image and run both encoders for every
pair), timed on `--reference-pairs` of the same pairs and scaled to all of them.
"""
from __future__ import annotations

import time
from pathlib import Path

from vlp.pipeline.bench.common import (
    OUT_DIR,
    environment,
    format_table,
    median,
    out_path,
    repeats_for,
    set_threads,
    write_json,
)

GOAL_FLOP_BOUND_RATIO = 2.0  # re-ranking time / its FLOP-bound time


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", help="export or checkpoint (default: random-init tiny)")
    p.add_argument("--karpathy-json", help="retrieval test set (default: a synthetic one)")
    p.add_argument("--image-root", help="with --karpathy-json")
    p.add_argument("--images", type=int, default=1000, help="synthetic test images (5 captions)")
    p.add_argument("--k", type=int, default=16, help="candidates re-ranked per query")
    p.add_argument("--batch", type=int, default=64, help="images or pairs per forward pass")
    p.add_argument("--reference-pairs", type=int, default=256,
                   help="pairs the per-pair reference is timed on")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")


def _test_set(args) -> tuple[Path, Path]:
    """(Karpathy JSON, image root) of the data to re-rank."""
    if args.karpathy_json:
        return Path(args.karpathy_json), Path(args.image_root or Path(args.karpathy_json).parent)
    from vlp.data_prep.synth import generate_world

    world = OUT_DIR / "rerank_data" / f"test{args.images}"
    if not (world / "world.json").exists():
        generate_world(world, 2, args.images, seed=0, n_vqa_train=1, n_vqa_val=1)
    return world / "retrieval" / "dataset_synth.json", world / "retrieval"


def _model(args, captions: list[str]):
    from vlp.pipeline.data.model_loading import CheckpointInfo, LoadedModel, load_model

    if args.checkpoint:
        return load_model(args.checkpoint)
    import torch

    from vlp.data_prep.tokenizer import train_tokenizer
    from vlp.models import UnifiedModel, load_config
    from vlp.pipeline.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(train_tokenizer(captions, OUT_DIR / "rerank_data" / "tokenizer",
                                               vocab_size=256))
    torch.manual_seed(0)
    model = UnifiedModel(load_config("tiny", vocab_size=len(tokenizer))).eval()
    return LoadedModel(model, tokenizer, CheckpointInfo("random-init tiny", "export", None, None,
                                                        model.config.to_dict()))


def run(args) -> int:
    import torch

    from vlp.models.flops import rerank_flops
    from vlp.pipeline.distributed import fast_bf16
    from vlp.pipeline.eval.encode import encode_images, encode_texts
    from vlp.pipeline.eval.images import load_images
    from vlp.pipeline.eval.retrieval.data import load_karpathy
    from vlp.pipeline.eval.retrieval.job import ItmScorer
    from vlp.pipeline.eval.retrieval.recall import captions_per_image, itc_ranks, score_pairs
    from vlp.pipeline.train.metrics import measure_peak_flops

    set_threads(args.threads)
    if args.quick:
        args.images, args.k, args.reference_pairs = 16, 4, 16
    repeats = repeats_for(args, full=3)
    dataset = load_karpathy(*_test_set(args))
    loaded = _model(args, dataset.captions)
    config, model = loaded.model.config, loaded.model
    bf16 = fast_bf16("cpu")
    with torch.inference_mode():
        image_emb = encode_images(model, dataset.images, config.image_size, args.batch, bf16)
        text_emb = encode_texts(model, loaded.tokenizer, dataset.captions, config.max_text_len,
                                args.batch * 4, bf16)
    t2i = torch.as_tensor(dataset.text_to_image)
    _, t2i_top, _ = itc_ranks(text_emb, image_emb, t2i[:, None], top_k=args.k)
    _, i2t_top, _ = itc_ranks(image_emb, text_emb, captions_per_image(t2i, len(image_emb)),
                              top_k=args.k)
    pairs = []

    def scorer(text_idx, image_idx):
        pairs.append((text_idx, image_idx))
        return ItmScorer(loaded, dataset, args.batch, bf16)(text_idx, image_idx)

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        score_pairs(scorer, t2i_top, i2t_top)
        times.append(time.perf_counter() - start)
    text_idx, image_idx = pairs[0]
    flops = rerank_flops(config, pairs=len(text_idx), images=len(torch.unique(image_idx)),
                         texts=len(torch.unique(text_idx)))
    peak = measure_peak_flops(torch.bfloat16 if bf16 else torch.float32, "cpu")
    ours_s = median(times)

    sample = torch.randperm(len(text_idx), generator=torch.Generator().manual_seed(0))
    sample = sample[:args.reference_pairs]
    tokens = ItmScorer(loaded, dataset, args.batch, bf16)  # its tokenized captions
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(sample), args.batch):
            batch = sample[lo:lo + args.batch]
            pixels = load_images([dataset.images[int(i)] for i in image_idx[batch]],
                                 config.image_size)
            texts = text_idx[batch]
            model.itm_logits(pixels, tokens.ids[texts], tokens.mask[texts])
    reference_s = (time.perf_counter() - start) * len(text_idx) / len(sample)

    result = {"pairs": len(text_idx), "images": len(torch.unique(image_idx)),
              "texts": len(torch.unique(text_idx)), "k": args.k,
              "ours_s_median": ours_s, "ours_s": times, "flops": flops, "peak_flops": peak,
              "flop_bound_s": flops / peak, "ratio_to_flop_bound": ours_s / (flops / peak),
              "per_pair_reference_s_scaled": reference_s,
              "speedup_vs_per_pair": reference_s / ours_s,
              "goal_ratio_to_flop_bound": GOAL_FLOP_BOUND_RATIO,
              "goal_met": ours_s / (flops / peak) <= GOAL_FLOP_BOUND_RATIO}
    payload = {"benchmark": "rerank", "environment": environment("cpu"),
               "setup": {"model": loaded.info.path, "config": config.to_dict(),
                         "num_images": len(dataset.images), "num_texts": len(dataset.captions),
                         "dtype": "bf16" if bf16 else "fp32", "repeats": repeats},
               "results": result}
    path = write_json(out_path(args, "rerank"), payload)
    print(format_table(
        ["pairs", "images", "captions", "ours s", "FLOP-bound s", "ratio", "per-pair s (scaled)",
         "speed-up"],
        [[result["pairs"], result["images"], result["texts"], ours_s, result["flop_bound_s"],
          result["ratio_to_flop_bound"], reference_s, result["speedup_vs_per_pair"]]],
        title=(f"bench rerank: top {args.k} both ways, {len(dataset.images)} images x "
               f"{len(dataset.captions)} captions, {payload['setup']['dtype']}, median of "
               f"{repeats}; peak {peak / 1e9:.0f} GFLOP/s")))
    print(f"re-ranking / FLOP-bound time: {result['ratio_to_flop_bound']:.2f}x (goal <= "
          f"{GOAL_FLOP_BOUND_RATIO}x: {'met' if result['goal_met'] else 'NOT met'})")
    print(f"wrote {path}")
    return 0
