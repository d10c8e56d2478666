"""`vlp deploy prune`: magnitude pruning to a target sparsity, then an optional recovery
fine-tune through the normal trainer.

    checkpoint -> zero the smallest |w| of the blocks' Linear layers (global or per layer)
               -> pruned export (zeros in the weights, a "pruning" record in config.json)
    [--recover-steps N] -> `vlp train` warm-started from it (model.init_from): the trainer masks
               the pruned layers in forward, so their zeros survive the fine-tune exactly
               -> the last checkpoint exported to --out, its zeros checked against the pruned ones

Unstructured zeros keep the dense shapes: the files and the dense kernels are as large and as
fast as before; what pruning buys here is the sparsity a sparse kernel or a compressor can use.
"""
from __future__ import annotations

from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.deploy.export import add_io_arguments, add_launch_arguments


def prune_checkpoint(checkpoint: str | Path, out_dir: str | Path, sparsity: float,
                     scope: str = "global") -> dict:
    """Write the pruned export of `checkpoint` to `out_dir`; returns the pruning record."""
    from vlp.models.sparsity import prune
    from vlp.pipeline.data.model_loading import load_float_model
    from vlp.pipeline.deploy.export import save_export

    if not 0 < sparsity < 1:
        raise UserError(f"sparsity must be in (0, 1), got {sparsity}")
    loaded = load_float_model(checkpoint, "pruning")
    record = prune(loaded.model, sparsity, scope)
    save_export(loaded, out_dir)
    return record


def recovery_overrides(pruned_dir: Path, run_dir: Path, steps: int,
                       user_overrides: list[str]) -> list[str]:
    """Training overrides for the recovery run: the pruned export's tokenizer (unless the user
    names one), the user's settings, then what the recovery needs: warm start from the pruned
    export with exactly its model config (written to run_dir/model_config.json), `steps` steps,
    a fresh run directory."""
    from vlp.pipeline.data.files import write_json_atomic
    from vlp.pipeline.data.model_loading import load_model

    model_config = run_dir / "model_config.json"
    write_json_atomic(model_config, load_model(pruned_dir).info.config)
    return [f"data.tokenizer={pruned_dir / 'tokenizer.json'}", *user_overrides,
            f"run_dir={run_dir}", f"model.init_from={pruned_dir}", f"model.name={model_config}",
            "model.overrides={}", f"optim.max_steps={steps}", "checkpoint.resume=none"]


def recover(pruned_dir: Path, out_dir: Path, run_dir: Path, steps: int, recipe: str | None,
            overrides: list[str], **launch) -> dict:
    """Fine-tune the pruned export for `steps` steps and export the result to `out_dir`;
    UserError if training fails or a pruned weight came back."""
    from vlp.models.sparsity import pruning_record, zero_masks
    from vlp.pipeline.data.model_loading import load_model
    from vlp.pipeline.deploy.export import export_checkpoint
    from vlp.pipeline.train.launch import run_training

    code = run_training(recipe, recovery_overrides(pruned_dir, run_dir, steps, overrides),
                        **launch)
    if code != 0:
        raise UserError(f"the recovery fine-tune failed (exit status {code}); see its output "
                        f"above and {run_dir}")
    export_checkpoint(run_dir / "checkpoints", out_dir)
    pruned, recovered = load_model(pruned_dir).model, load_model(out_dir).model
    if pruning_record(recovered) is None:
        raise UserError(f"{out_dir} has no pruning record: was {run_dir} a run of its own?")
    nonzero = zero_masks(recovered)
    revived = {name: int((~kept & nonzero[name]).sum())
               for name, kept in zero_masks(pruned).items()}
    if any(revived.values()):
        raise UserError(f"the recovery fine-tune revived pruned weights: {revived}")
    return pruning_record(recovered)


def _cmd_prune(args) -> int:
    out = Path(args.out)
    pruned_dir = out.with_name(out.name + ".pruned") if args.recover_steps else out
    record = prune_checkpoint(args.checkpoint, pruned_dir, args.sparsity, args.scope)
    print(f"pruned {args.checkpoint} -> {pruned_dir}: sparsity {record['sparsity']:.4f} over "
          f"{len(record['layers'])} layers ({record['scope']})")
    if args.recover_steps:
        run_dir = Path(args.run_dir) if args.run_dir else out.with_name(out.name + ".recovery")
        record = recover(pruned_dir, out, run_dir, args.recover_steps, args.recipe, args.set,
                         nproc=args.nproc, master_port=args.master_port)
        print(f"recovered {args.recover_steps} steps -> {out}: sparsity {record['sparsity']:.4f}")
    return 0


def register(subparsers) -> None:
    from vlp.pipeline.cli_help import add_command

    p = add_command(subparsers, "prune", "magnitude pruning, optionally a recovery fine-tune",
                    ["vlp deploy prune --checkpoint runs/tiny/checkpoints --out export/tiny-50 "
                     "--sparsity 0.5"])
    add_io_arguments(p, "output export directory")
    p.add_argument("--sparsity", type=float, required=True,
                   help="share of the pruned layers' weights zeroed, e.g. 0.5")
    p.add_argument("--scope", choices=("global", "layer"), default="global",
                   help="one magnitude threshold over all pruned layers, or one per layer")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="fine-tune this many steps with the normal trainer (0: no recovery); "
                        "the pruned export goes to OUT.pruned, the run to OUT.recovery")
    p.add_argument("--recipe", help="training recipe for the recovery (data, optimizer)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="training overrides for the recovery, e.g. data.shards=... optim.lr=3e-4")
    p.add_argument("--run-dir", help="the recovery run's directory (default OUT.recovery)")
    add_launch_arguments(p)
    p.set_defaults(func=_cmd_prune)
