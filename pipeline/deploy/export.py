"""`vlp export`: a training checkpoint -> the `vlp.models` export format (no DeepSpeed needed to load).

ZeRO-3 shards are consolidated with DeepSpeed's own zero_to_fp32 path (fp32 master weights).
"""
from __future__ import annotations

from pathlib import Path


def save_export(loaded, out_dir: str | Path) -> Path:
    """Write a LoadedModel (its model, possibly changed in memory, and the tokenizer it was
    loaded with) to `out_dir` in the export format."""
    from vlp.models.export import save_pretrained

    tokenizer_path = Path(loaded.info.path) / "tokenizer.json"
    return save_pretrained(loaded.model, out_dir, tokenizer_path=tokenizer_path)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Consolidate `checkpoint` (tag dir, checkpoints dir or export dir) into `out_dir`."""
    from vlp.pipeline.data.model_loading import load_model

    return save_export(load_model(checkpoint), out_dir)


def add_io_arguments(parser, out_help: str) -> None:
    """--checkpoint (what a deploy command reads) and --out (what it writes)."""
    parser.add_argument("--checkpoint", required=True,
                        help="export, tag or checkpoints directory (uses `latest`)")
    parser.add_argument("--out", required=True, help=out_help)


def add_launch_arguments(parser) -> None:
    """The launcher options of a deploy command that trains (as `vlp train` has them)."""
    parser.add_argument("--nproc", type=int, help="ranks on this node (as `vlp train --nproc`)")
    parser.add_argument("--master-port", type=int,
                        help="the launcher's rendezvous port (default: a free port, as "
                             "`vlp train --master-port`)")


def _cmd_export(args) -> int:
    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def register(subparsers) -> None:
    from vlp.pipeline.cli_help import add_command

    p = add_command(subparsers, "export", "export a checkpoint to config.json + model.safetensors",
                    ["vlp export --checkpoint runs/tiny/checkpoints --out export/tiny"])
    p.add_argument("--checkpoint", required=True,
                   help="runs/NAME/checkpoints (uses `latest`) or one tag directory")
    p.add_argument("--out", required=True, help="output directory (loadable without DeepSpeed)")
    p.set_defaults(func=_cmd_export)
