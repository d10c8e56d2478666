"""`vlp export`: a training checkpoint -> the `vlp.models` export format (no DeepSpeed needed to load).

ZeRO-3 shards are consolidated with DeepSpeed's own zero_to_fp32 path (fp32 master weights).
"""
from __future__ import annotations

from pathlib import Path


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Consolidate `checkpoint` (tag dir, checkpoints dir or export dir) into `out_dir`."""
    from vlp.models.export import save_pretrained
    from vlp.pipeline.data.checkpoints import load_model

    loaded = load_model(checkpoint)
    tokenizer_path = Path(loaded.info.path) / "tokenizer.json"
    return save_pretrained(loaded.model, out_dir, tokenizer_path=tokenizer_path)


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
