"""`vlp data synth|serve|download|index|tokenizer|reshard`: the data stage's subcommands.

Each long step ends with a one-screen summary of its counts. Bad arguments and bad input files
raise UserError, which `vlp` prints as a one-line error (exit 2) instead of a traceback.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

# Only light constants at the top: every `vlp` command imports this module to build its parser,
# so the data modules (torch, webdataset, transformers, pandas) are imported by the command
# that uses them.
from vlp.data_prep.download import DISTRIBUTORS, RESIZE_MODES
from vlp.data_prep.url_lists import CAPTION_NAMES, FORMATS, URL_NAMES
from vlp.pipeline.cli_help import nonnegative_int, positive_int

MAX_PROBLEM_LINES = 10
INPUT_FORMATS = sorted(set(FORMATS.values()))


def print_summary(title: str, summary: dict) -> None:
    """Print nested counts one per line; long problem lists are cut (the manifest has them all)."""
    print(f"== {title} ==")

    def show(value, indent):
        for key, item in value.items():
            if isinstance(item, dict):
                print(f"{indent}{key}:" + ("" if item else " none"))
                show(item, indent + "  ")
            elif isinstance(item, list):
                print(f"{indent}{key}: {len(item)}")
                for entry in item[:MAX_PROBLEM_LINES]:
                    print(f"{indent}  - {json.dumps(entry) if isinstance(entry, dict) else entry}")
                if len(item) > MAX_PROBLEM_LINES:
                    print(f"{indent}  ... {len(item) - MAX_PROBLEM_LINES} more")
            else:
                print(f"{indent}{key}: {item}")

    show(summary, "  ")


def synth(args) -> int:
    from vlp.data_prep.synth import generate_world

    world = generate_world(
        args.out, args.train, args.test, seed=args.seed, base_url=args.base_url,
        n_vqa_train=args.vqa_train, n_vqa_val=args.vqa_val, render_size=args.render_size,
        n_classify=args.classify,
    )  # fmt: skip
    summary = {"base_url": world["base_url"], **world["counts"],
               "classification (shape, colour)": world["classification"]["counts"]}
    print_summary(f"synthetic world in {args.out}", summary)
    return 0


def serve(args) -> int:
    from vlp.data_prep.server import serve_directory, serve_world

    directory = Path(args.dir)
    server = (
        serve_world(directory)
        if (directory / "world.json").exists()
        else serve_directory(directory, args.port)
    )
    with server as base_url:
        print(f"serving {directory} at {base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def download(args) -> int:
    from vlp.data_prep.download import download_shards
    from vlp.data_prep.img2dataset_options import check_set_by_vlp, passed_options

    for name in ("output_format", "incremental_mode"):
        check_set_by_vlp(name, getattr(args, name))
    options = passed_options(args.img2dataset_option)
    options.update({name: getattr(args, name) for name in ("encode_quality", "enable_wandb")
                    if getattr(args, name) is not None})
    summary = download_shards(
        args.url_list,
        args.out,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        processes=args.processes,
        threads=args.threads,
        number_sample_per_shard=args.samples_per_shard,
        timeout=args.timeout,
        allow_private_hosts=args.allow_private_hosts,
        distributor=args.distributor,
        incremental=not args.no_resume,
        retries=args.retries,
        images=args.images,
        url_col=args.url_col,
        caption_col=args.caption_col,
        input_format=args.input_format,
        save_additional_columns=tuple(args.save_additional_columns),
        max_image_mb=args.max_image_mb,
        img2dataset_options=options,
    )
    print_summary(f"download into {args.out}", summary)
    return 0


def index(args) -> int:
    from vlp.data_prep.index import build_manifest

    manifest = build_manifest(args.shard_dir, args.from_stats, args.processes)
    summary = {key: value for key, value in manifest.items() if key != "shards"}
    print_summary(f"index of {args.shard_dir} (manifest.json, sizes.json)", summary)
    return 0


def tokenizer(args) -> int:
    from vlp.data_prep.tokenizer import iter_vqa_questions, sample_shard_captions, train_tokenizer

    counts = Counter()
    sample = {"sample_size": args.sample_size} if args.sample_size else {}
    texts = [sample_shard_captions(args.shard_dir, counts=counts, seed=args.seed, **sample)]
    texts += [iter_vqa_questions(path) for path in args.extra_text]
    path = train_tokenizer((t for source in texts for t in source), args.out, args.vocab_size)
    print_summary(f"tokenizer {path}", {"texts_from_shards": dict(counts)})
    return 0


def reshard_command(args) -> int:
    from vlp.data_prep.reshard import reshard

    summary = reshard(args.in_dir, args.out, args.samples_per_shard)
    print_summary(f"reshard {args.in_dir} -> {args.out}", summary)
    return 0


def register(subparsers) -> None:
    """Add `data` and its subcommands to the `vlp` parser.

    `download` wraps img2dataset: its option spellings (--thread_count, --processes_count,
    --number_sample_per_shard, ...) are accepted as aliases. Defaults that differ from
    img2dataset's are listed in docs/data_prep.md."""
    from vlp.pipeline.cli_help import add_command

    data = subparsers.add_parser("data", help="prepare data: synthetic world, shards, tokenizer")
    commands = data.add_subparsers(dest="data_command", required=True)

    p = add_command(commands, "synth", "render the synthetic world",
                    ["vlp data synth --out world --train 12000 --test 1000 --seed 0"])
    p.add_argument("--out", required=True, help="world directory to write")
    p.add_argument("--train", type=int, required=True, help="training images (URL list rows)")
    p.add_argument("--test", type=int, required=True, help="retrieval (and captioning) test images, 5 captions each")
    p.add_argument("--seed", type=int, default=0, help="everything in the world derives from it")
    p.add_argument("--vqa-train", type=int, default=None,
                   help="VQA train images (default: train/2)")
    p.add_argument("--vqa-val", type=int, default=None, help="VQA val images (default: test/2)")
    p.add_argument("--base-url", default="http://127.0.0.1:8765",
                   help="where `vlp data serve` will serve the world's images")
    p.add_argument("--render-size", type=int, default=128, help="image side in pixels")
    p.add_argument("--classify", type=int, default=None,
                   help="classification train and test images, val half (default test/2)")
    p.set_defaults(func=synth)

    p = add_command(commands, "serve", "serve a world (at its base URL) or any directory",
                    ["vlp data serve world"])
    p.add_argument("dir", help="a synthetic world (served at its base URL) or any directory")
    p.add_argument("--port", type=int, default=8765, help="port for a directory that is no world")
    p.set_defaults(func=serve)

    _add_download(commands)

    p = add_command(commands, "index", "write manifest.json and sizes.json for a shard directory",
                    ["vlp data index shards"])
    p.add_argument("shard_dir", metavar="SHARD_DIR",
                   help="directory or object-store prefix (s3://bucket/shards) holding the "
                        "NNNNN.tar shards (and their stats)")
    p.add_argument("--from-stats", action="store_true",
                   help="count samples from img2dataset's NNNNN_stats.json and check each tar's "
                        "end only (no sha256, no caption checks)")
    p.add_argument("--processes", type=positive_int, default=1, help="shards indexed at once")
    p.set_defaults(func=index)

    p = add_command(commands, "tokenizer", "train a WordPiece tokenizer on shard captions",
                    ["vlp data tokenizer --shard-dir shards --out tokenizer --vocab-size 8000"])
    p.add_argument("--shard-dir", "--shards", dest="shard_dir", required=True,
                   help="directory holding the NNNNN.tar shards")
    p.add_argument("--out", required=True, help="directory for tokenizer.json")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="WordPiece vocabulary size, special tokens included")
    p.add_argument("--extra-text", nargs="*", default=[], metavar="VQA_QUESTIONS_JSON",
                   help="VQAv2 question files whose questions are added to the training text")
    p.add_argument("--sample-size", type=positive_int, default=None,
                   help="train on a random sample of this many captions at most, drawn from the "
                        "first 4 x as many read, shards in random order (default: 1,000,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the caption sample")
    p.set_defaults(func=tokenizer)

    p = add_command(commands, "reshard", "rewrite shards with K samples per shard, then index",
                    ["vlp data reshard --in shards --out shards_256 --samples-per-shard 256"])
    p.add_argument("--in", dest="in_dir", required=True,
                   help="directory or object-store prefix holding the NNNNN.tar shards to read")
    p.add_argument("--out", required=True,
                   help="empty directory or object-store prefix for the new shards")
    p.add_argument("--samples-per-shard", type=int, required=True,
                   help="samples per output shard (the last one may hold fewer)")
    p.set_defaults(func=reshard_command)


def _add_download(commands) -> None:
    """`vlp data download` and its options (img2dataset's spellings as aliases)."""
    from vlp.pipeline.cli_help import add_command

    p = add_command(
        commands, "download", "img2dataset a URL list into webdataset shards, then index them",
        ["vlp data download --url-list world/train/url_list.parquet --out shards "
         "--image-size 64 --allow-private-hosts"])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--url-list", "--url_list",
                        help="a parquet, csv, tsv or jsonl file, a folder or a glob of such "
                             "parts, with a URL and a caption column")
    source.add_argument("--images", metavar="DIR",
                        help="ingest the images of a local folder, each captioned by the .txt "
                             "file of the same name beside it (no server; file URLs only here)")
    p.add_argument("--out", "--output_folder", required=True,
                   help="shard directory or object-store prefix (s3://bucket/shards): NNNNN.tar + "
                        "_stats.json + .parquet, then manifest.json")
    p.add_argument("--url-col", "--url_col", default=None,
                   help=f"URL column of the list (default: the first of {', '.join(URL_NAMES)})")
    p.add_argument("--caption-col", "--caption_col", default=None,
                   help="caption column of the list (default: the first of "
                        f"{', '.join(CAPTION_NAMES)})")
    p.add_argument("--input-format", "--input_format", choices=INPUT_FORMATS, default=None,
                   help="read only the parts in this format (default: all four)")
    p.add_argument("--image-size", "--image_size", type=positive_int, default=256,
                   help="images are resized to this side")
    p.add_argument("--resize-mode", "--resize_mode", choices=RESIZE_MODES, default="center_crop",
                   help="img2dataset resize mode (img2dataset's default: border)")
    p.add_argument("--processes", "--processes_count", type=positive_int, default=1,
                   help="download processes")
    p.add_argument("--threads", "--thread_count", type=positive_int, default=8,
                   help="download threads per process (img2dataset's default: 256)")
    p.add_argument("--samples-per-shard", "--number_sample_per_shard",
                   "--number-sample-per-shard", dest="samples_per_shard", type=positive_int,
                   default=1000,
                   help="samples per output shard (img2dataset's default: 10000)")
    p.add_argument("--timeout", type=positive_int, default=10, help="seconds per HTTP request")
    p.add_argument("--retries", type=nonnegative_int, default=0, help="retries per failed URL")
    p.add_argument("--max-image-mb", type=float, default=32,
                   help="refuse an image larger than this while fetching (MiB)")
    p.add_argument("--distributor", choices=DISTRIBUTORS, default="multiprocessing",
                   help="img2dataset distributor (pyspark: install .[spark])")
    p.add_argument("--allow-private-hosts", action="store_true",
                   help="fetch from loopback/private/link-local addresses (the synthetic world "
                        "needs this)")
    p.add_argument("--no-resume", action="store_true",
                   help="delete the shards already in --out instead of resuming the job")
    _add_img2dataset_options(p)
    p.set_defaults(func=download)


def _add_img2dataset_options(p) -> None:
    """img2dataset's own options: passed through, or accepted when they agree with vlp."""
    from vlp.data_prep.img2dataset_options import parse_bool

    p.add_argument("--save-additional-columns", "--save_additional_columns", default=[],
                   type=lambda text: [t for t in text.split(",") if t], metavar="COL,COL",
                   help="list columns saved in each sample's .json")
    p.add_argument("--encode-quality", "--encode_quality", type=positive_int, default=None,
                   help="JPEG quality of the stored images (img2dataset's default: 95)")
    p.add_argument("--enable-wandb", "--enable_wandb", type=parse_bool, nargs="?", const=True,
                   default=None, help="log the download to Weights & Biases")
    for name in ("output_format", "incremental_mode"):
        p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)  # vlp's value only
    p.add_argument("--img2dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other img2dataset option, e.g. min_image_size=64 (repeatable)")
