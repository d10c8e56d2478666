"""`vlp bench eval`: chunked retrieval recall (pipeline.eval.recall) vs a naive full-matrix one.

Data: N images and 5 captions each (default 5,000 x 25,000) as random unit embeddings of size
256; each caption is its image's embedding plus Gaussian noise (norm ~4.5), renormalised, so
recalls sit mid-range (R@1 about 0.4-0.8 at 5k images) and the equality check between the two
implementations compares ranks that actually vary.

Naive (what one writes first): the full (captions x images) score matrix, a full descending
argsort per direction, and the position of the first positive. Chunked: retrieval_recalls,
which scores `--chunk` queries at a time and counts the candidates that beat the best positive.

Each measurement runs in a fresh subprocess (`python -m pipeline.bench.eval_recall --worker`),
so one implementation's freed memory cannot hide the other's peak. Peak memory is the growth of
the process's peak RSS (ru_maxrss) over its value after the embeddings were made (made without
temporaries, so that baseline is their steady size). The two run alternately, `repeats` times
each; time is the median call time inside the worker, excluding start-up. `--quick` runs small
sizes in this process instead (a smoke test: its memory figures mean little).
"""
from __future__ import annotations

import json
import subprocess
import sys

from vlp.pipeline.bench.common import (
    environment,
    format_table,
    median,
    out_path,
    repeats_for,
    write_json,
)

IMPLEMENTATIONS = ("chunked", "naive")


def add_arguments(p) -> None:
    p.add_argument("--images", type=int, default=5000, help="synthetic test images")
    p.add_argument("--captions-per-image", type=int, default=5,
                   help="captions per test image")
    p.add_argument("--dim", type=int, default=256, help="embedding width")
    p.add_argument("--noise", type=float, default=4.5,
                   help="caption = normalise(image + noise * N(0, I/dim)); sets recall levels")
    p.add_argument("--chunk", type=int, default=1024, help="queries per block (chunked)")
    p.add_argument("--threads", type=int, help="torch CPU threads in the workers")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic embeddings")


# ---- the two implementations ---------------------------------------------------------------------

def naive_recalls(image_emb, text_emb, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
    """Full score matrix + full argsort in both directions (the memory-hungry baseline)."""
    import torch

    from vlp.pipeline.eval.retrieval.recall import recalls_from_ranks

    scores = text_emb @ image_emb.T  # (N_txt, N_img)
    order = scores.argsort(dim=1, descending=True)  # (N_txt, N_img) int64
    t2i_ranks = (order == text_to_image[:, None]).int().argmax(dim=1)
    del order
    order = scores.T.argsort(dim=1, descending=True)  # (N_img, N_txt) int64
    hits = text_to_image[order] == torch.arange(len(image_emb))[:, None]  # (N_img, N_txt)
    i2t_ranks = hits.int().argmax(dim=1)  # first retrieved caption of this image
    return recalls_from_ranks(t2i_ranks, i2t_ranks, ks)


def make_embeddings(images: int, captions_per_image: int, dim: int, noise: float, seed: int):
    """(image_emb, text_emb, text_to_image), L2-normalised, built in place (no temporaries)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    image_emb = torch.randn(images, dim, generator=g)
    image_emb /= image_emb.norm(dim=1, keepdim=True)
    text_to_image = torch.arange(images).repeat_interleave(captions_per_image)
    text_emb = torch.randn(len(text_to_image), dim, generator=g)
    text_emb.mul_(noise / dim**0.5).add_(image_emb[text_to_image])
    text_emb /= text_emb.norm(dim=1, keepdim=True)
    return image_emb, text_emb, text_to_image


def _maxrss_bytes() -> int:
    import resource

    # Linux reports KiB; macOS bytes
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def worker(argv: list[str], quiet: bool = False) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    import argparse
    import time

    import torch

    p = argparse.ArgumentParser()
    p.add_argument("impl", choices=IMPLEMENTATIONS)
    add_arguments(p)  # the same options as `vlp bench eval`, passed on by _run_worker
    a = p.parse_args([str(x) for x in argv])
    if a.threads:
        torch.set_num_threads(a.threads)
    from vlp.pipeline.eval.retrieval.recall import retrieval_recalls

    image_emb, text_emb, t2i = make_embeddings(a.images, a.captions_per_image, a.dim, a.noise,
                                               a.seed)
    # warm the code paths on a tiny problem so lazy initialisation is not counted
    small = make_embeddings(8, 2, a.dim, a.noise, a.seed)
    retrieval_recalls(*small, chunk=4) if a.impl == "chunked" else naive_recalls(*small)
    before = _maxrss_bytes()
    start = time.perf_counter()
    if a.impl == "chunked":
        recalls = retrieval_recalls(image_emb, text_emb, t2i, chunk=a.chunk)
    else:
        recalls = naive_recalls(image_emb, text_emb, t2i)
    seconds = time.perf_counter() - start
    result = {"impl": a.impl, "seconds": seconds, "peak_rss_growth_bytes": _maxrss_bytes() - before,
              "rss_before_bytes": before, "recalls": recalls,
              "embedding_bytes": (image_emb.numel() + text_emb.numel()) * 4}
    if not quiet:
        print(json.dumps(result), flush=True)
    return result


def _run_worker(impl: str, args) -> dict:
    argv = [impl, "--images", str(args.images),
            "--captions-per-image", str(args.captions_per_image), "--dim", str(args.dim),
            "--noise", str(args.noise), "--chunk", str(args.chunk), "--seed", str(args.seed)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.quick:  # smoke test: in this process (memory figures then mean little)
        return worker(argv, quiet=True)
    cmd = [sys.executable, "-m", "vlp.pipeline.bench.eval_recall", "--worker", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"eval worker {impl} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> int:
    if args.quick:
        args.images = min(args.images, 200)
    repeats = repeats_for(args, full=3)
    runs = {impl: [] for impl in IMPLEMENTATIONS}
    for _ in range(repeats):
        for impl in IMPLEMENTATIONS:
            runs[impl].append(_run_worker(impl, args))

    results = {}
    for impl, measurements in runs.items():
        results[impl] = {
            "seconds_median": median([m["seconds"] for m in measurements]),
            "seconds": [m["seconds"] for m in measurements],
            "peak_memory_bytes_median": median([m["peak_rss_growth_bytes"]
                                                for m in measurements]),
            "peak_memory_bytes": [m["peak_rss_growth_bytes"] for m in measurements],
            "recalls": measurements[0]["recalls"],
        }
    recalls_agree = all(m["recalls"] == runs["naive"][0]["recalls"]
                        for impl in IMPLEMENTATIONS for m in runs[impl])
    n_txt = args.images * args.captions_per_image
    chunked, naive = results["chunked"], results["naive"]
    summary = {
        "recalls_identical": recalls_agree,
        "speedup": naive["seconds_median"] / chunked["seconds_median"],
        "memory_ratio_naive_over_chunked": (naive["peak_memory_bytes_median"]
                                            / max(1, chunked["peak_memory_bytes_median"])),
        "full_score_matrix_bytes": n_txt * args.images * 4,
    }
    payload = {"benchmark": "eval", "environment": environment("cpu"),
               "setup": {"images": args.images, "captions": n_txt, "dim": args.dim,
                         "noise": args.noise, "chunk": args.chunk, "repeats": repeats,
                         "memory": "ru_maxrss growth in a fresh subprocess"},
               "results": results, "summary": summary}
    path = write_json(out_path(args, "eval"), payload)
    rows = [[impl, r["seconds_median"], r["peak_memory_bytes_median"] / 2**20,
             r["recalls"]["image_retrieval_recall@1"], r["recalls"]["text_retrieval_recall@1"],
             r["recalls"]["mean_recall"]] for impl, r in results.items()]
    print(format_table(["implementation", "seconds", "peak MiB", "t2i R@1", "i2t R@1",
                        "mean recall"], rows,
                       title=(f"bench eval: {args.images} images x {n_txt} captions, dim "
                              f"{args.dim}, median of {repeats}")))
    print(f"chunked vs naive: {summary['speedup']:.2f}x faster, "
          f"{summary['memory_ratio_naive_over_chunked']:.1f}x less peak memory; recalls "
          f"identical: {recalls_agree}")
    print(f"wrote {path}")
    return 0 if recalls_agree else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        raise SystemExit("run through `vlp bench eval`")
