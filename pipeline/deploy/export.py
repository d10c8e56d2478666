"""`vlp export`: a training checkpoint -> the `vlp.models` export format (no DeepSpeed needed to load).

ZeRO-3 shards are consolidated with DeepSpeed's own zero_to_fp32 path (fp32 master weights).
"""
from __future__ import annotations

import math
from pathlib import Path

from vlp.pipeline.data.files import read_json


def save_export(loaded, out_dir: str | Path) -> Path:
    """Write a LoadedModel (its model, possibly changed in memory, and the tokenizer it was
    loaded with) to `out_dir` in the export format, with a model card that records where the
    weights come from and the evaluation results found beside the checkpoint."""
    from vlp.models.export import save_pretrained

    source = Path(loaded.info.path)
    special = {role: token for role, token in loaded.tokenizer.special_tokens_map.items()
               if isinstance(token, str)}
    return save_pretrained(loaded.model, out_dir, tokenizer_path=source / "tokenizer.json",
                           special_tokens=special, provenance=provenance(loaded.info),
                           evaluation=evaluation(loaded.info))


def provenance(info) -> dict | None:
    """Source, step, data and global batch of a training tag (from its run's train_config.json
    and vlp_state.json); for an export, what it recorded itself."""
    from vlp.pipeline.data.checkpoints import load_state

    path = Path(info.path)
    if info.kind != "deepspeed":
        return read_json(path / "config.json", "export config").get("provenance")
    run_config = path.parent.parent / "train_config.json"  # runs/NAME/checkpoints/<tag>
    train = read_json(run_config, "training config") if run_config.is_file() else {}
    data, optim = train.get("data", {}), train.get("optim", {})
    factors = (optim.get("batch_size"), optim.get("grad_accum"), load_state(path).get("world_size"))
    shards = data.get("shards")
    return {"source": str(path), "step": info.step,
            "data": f"shards {shards} ({data.get('sampling')})" if shards else None,
            "global_batch": math.prod(factors) if all(factors) else None}


def evaluation(info) -> dict[str, dict[str, float]]:
    """{benchmark: {metric: value}} of the evaluation results beside the checkpoint: the run's
    eval/<tag>/ for a training tag, eval/<path in the run>/ for an export inside a run (where
    `vlp eval nightly` writes them)."""
    path = Path(info.path).resolve()
    if info.kind == "deepspeed":
        folders = [path.parent.parent / "eval" / path.name]
    else:
        folders = [run / "eval" / path.relative_to(run) for run in path.parents]
    folder = next((f for f in folders if f.is_dir()), None)
    results = {}
    for file in sorted(folder.glob("*.json")) if folder else []:
        if file.name.endswith(".results.json"):  # per-example predictions
            continue
        result = read_json(file, "evaluation result")
        metrics = result.get("metrics") if isinstance(result, dict) else None
        if isinstance(metrics, dict):
            results[file.stem] = {k: v for k, v in metrics.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return results


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
