"""`vlp bench train | attention | loader | zero | eval | rerank | caption | compress | comms |
scaling | smoke | prep`: benchmarks.

Each benchmark times our implementation and a reference in the same run, reports the ratio of
medians over `--repeats`, prints a table and writes JSON (`--out`, default bench_out/NAME.json).
`--quick` is a smoke test (tiny sizes, one repeat). Benchmark modules import only the standard
library at module level (torch, deepspeed, transformers inside `run`), so `vlp` starts fast.
"""
from __future__ import annotations

import importlib

# (subcommand, module, help); each module defines add_arguments(parser) and run(args) -> int
BENCHMARKS = [
    ("train", "vlp.pipeline.bench.train",
     "training-step samples/s and MFU: ours (ITC, full) vs HF CLIPModel"),
    ("attention", "vlp.pipeline.bench.attention", "attention backends sdpa vs reference, fwd+bwd"),
    ("loader", "vlp.pipeline.bench.loader", "our loader vs a plain webdataset+PIL pipeline"),
    ("zero", "vlp.pipeline.bench.zero", "ZeRO-3 memory per rank and step time vs ZeRO-2 / 1 process"),
    ("eval", "vlp.pipeline.bench.eval_recall", "chunked retrieval recall vs full score matrix"),
    ("rerank", "vlp.pipeline.bench.rerank",
     "ITM re-ranking of the top k both ways vs its FLOP-bound time and the per-pair path"),
    ("caption", "vlp.pipeline.bench.caption",
     "caption decoding tokens/s with the key/value cache vs without"),
    ("compress", "vlp.pipeline.bench.compress",
     "int8 / pruned / distilled / ONNX exports vs fp32: size, encode speed, accuracy"),
    ("comms", "vlp.pipeline.bench.comms",
     "collectives per ZeRO step on a 2-node loopback world, measured vs predicted; hook time"),
    ("scaling", "vlp.pipeline.bench.scaling",
     "docs/scaling.md's projection for base on 1/8/64 H100 nodes (no GPU needed)"),
    ("smoke", "vlp.pipeline.bench.smoke",
     "a short real training run on this machine's devices, resumed, then evaluated"),
    ("prep", "vlp.pipeline.bench.prep",
     "URL-list sanitisation rows/s per core and memory vs row by row; LAION-400M projection"),
]


def _lazy(module_name: str):
    def run(args) -> int:
        return int(importlib.import_module(module_name).run(args) or 0)
    return run


def register(subparsers) -> None:
    from vlp.pipeline.cli_help import add_command

    p = subparsers.add_parser("bench", help="performance benchmarks (each vs a reference)")
    sub = p.add_subparsers(dest="bench", required=True)
    for name, module_name, help_text in BENCHMARKS:
        q = add_command(sub, name, help_text, [f"vlp bench {name} --quick   # a smoke test",
                                               f"vlp bench {name} --out bench_out/{name}.json"])
        q.add_argument("--quick", action="store_true", help="tiny smoke-test sizes, 1 repeat")
        q.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
        q.add_argument("--out", default=None, help=f"JSON result (default bench_out/{name}.json)")
        try:
            importlib.import_module(module_name).add_arguments(q)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
        q.set_defaults(func=_lazy(module_name))
