"""`vlp bench caption`: caption decoding tokens/s with the key/value cache vs without it.

An untrained model of the chosen size decodes a batch of random images to a fixed length (the end
token is suppressed, so every caption has exactly `length` tokens): with the cache each step runs
one position through every block; without it every step recomputes the image side of the top
blocks and the whole prefix, so its cost per token grows with the length. Both variants run
interleaved and must produce the same tokens.
"""
from __future__ import annotations

from vlp.pipeline.bench.common import (
    environment,
    format_table,
    interleaved_timings,
    load_model_config,
    median,
    out_path,
    repeats_for,
    resolve_device,
    set_threads,
    write_json,
)

END_TOKEN = 2  # [SEP] in our tokenizers; suppressed so captions run to the full length


def add_arguments(p) -> None:
    p.add_argument("--config", default="tiny", help="named model size or JSON (default tiny)")
    p.add_argument("--lengths", default="8,16,31", help="comma-separated caption lengths")
    p.add_argument("--batch", type=int, default=32, help="images decoded together")
    p.add_argument("--beam-size", type=int, default=1, help="1 = greedy")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary size of the model")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")


def run(args) -> int:
    import torch

    from vlp.models import DecodingConfig, UnifiedModel, generate

    set_threads(args.threads)
    device = resolve_device(args.device)
    config = load_model_config(args.config, vocab=args.vocab, quick=args.quick)
    lengths = [int(x) for x in args.lengths.split(",")]
    batch = args.batch
    if args.quick:
        lengths, batch = [4, 8], 2
    lengths = [min(n, config.max_text_len - 1) for n in lengths]
    repeats = repeats_for(args, full=5)
    torch.manual_seed(0)
    model = UnifiedModel(config).to(device).eval()
    images = torch.randint(0, 256, (batch, 3, config.image_size, config.image_size),
                           dtype=torch.uint8, device=device)

    def decode(length: int, use_cache: bool):
        decoding = DecodingConfig(max_length=length, beam_size=args.beam_size,
                                  use_cache=use_cache)
        return generate(model, images, 1, END_TOKEN, decoding, suppress_ids=(END_TOKEN,))

    cases, rows = [], []
    for length in lengths:
        timings = interleaved_timings({"cached": lambda n=length: decode(n, True),
                                       "uncached": lambda n=length: decode(n, False)},
                                      repeats, warmup=1, device=device)
        same = decode(length, True) == decode(length, False)
        tokens = batch * length
        cached_s = median(timings["cached"]["wall_s"])
        uncached_s = median(timings["uncached"]["wall_s"])
        case = {"length": length, "tokens": tokens, "cached_s_median": cached_s,
                "uncached_s_median": uncached_s, "cached_tokens_per_s": tokens / cached_s,
                "uncached_tokens_per_s": tokens / uncached_s, "speedup": uncached_s / cached_s,
                "same_tokens": same, "cached_s": timings["cached"]["wall_s"],
                "uncached_s": timings["uncached"]["wall_s"]}
        cases.append(case)
        rows.append([length, case["cached_tokens_per_s"], case["uncached_tokens_per_s"],
                     case["speedup"], cached_s * 1e3 / length, uncached_s * 1e3 / length, same])
    payload = {"benchmark": "caption", "environment": environment(device),
               "setup": {"config": args.config, "batch": batch, "beam_size": args.beam_size,
                         "repeats": repeats, "device": device, "vocab_size": config.vocab_size,
                         "call": "generate(): image encoding + decoding of every step"},
               "results": cases,
               "summary": {"speedup_at_longest": cases[-1]["speedup"],
                           "all_same_tokens": all(c["same_tokens"] for c in cases)}}
    path = write_json(out_path(args, "caption"), payload)
    print(format_table(
        ["length", "cached tok/s", "uncached tok/s", "speed-up", "cached ms/step",
         "uncached ms/step", "same tokens"], rows,
        title=(f"bench caption: {args.config}, batch {batch}, beam {args.beam_size}, {device}, "
               f"median of {repeats}")))
    print(f"wrote {path}")
    return 0
