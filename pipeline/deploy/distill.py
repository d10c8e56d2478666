"""`vlp deploy distill`: train a student with a frozen teacher through the normal trainer, then
export it.

The student is whatever the recipe and `--set` describe (e.g. the teacher's size at half the
width: `model.overrides={width: 96, heads: 3}`); the teacher is any float checkpoint or export
with the same image size and tokenizer. The run is `vlp train` with `distill.teacher` set
(vlp.models.distill for the losses): DeepSpeed ZeRO-3 and the launcher as for pretraining.
"""
from __future__ import annotations

from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.deploy.export import add_launch_arguments


def distill_overrides(teacher: str | Path, run_dir: Path, user_overrides: list[str]) -> list[str]:
    """The teacher's tokenizer unless the user names one, the user's settings, then the run
    directory and the teacher."""
    from vlp.pipeline.data.model_loading import resolve_checkpoint

    _, teacher_dir = resolve_checkpoint(teacher)
    return [f"data.tokenizer={teacher_dir / 'tokenizer.json'}", *user_overrides,
            f"run_dir={run_dir}", f"distill.teacher={teacher_dir}"]


def _cmd_distill(args) -> int:
    from vlp.pipeline.deploy.export import export_checkpoint
    from vlp.pipeline.train.launch import run_training

    out = Path(args.out)
    run_dir = Path(args.run_dir) if args.run_dir else out.with_name(out.name + ".run")
    code = run_training(args.recipe, distill_overrides(args.teacher, run_dir, args.set),
                        nproc=args.nproc, master_port=args.master_port)
    if code != 0:
        raise UserError(f"the distillation run failed (exit status {code}); see {run_dir}")
    export_checkpoint(run_dir / "checkpoints", out)
    print(f"distilled student of {args.teacher} -> {out} (run: {run_dir})")
    return 0


def register(subparsers) -> None:
    from vlp.pipeline.cli_help import add_command

    p = add_command(subparsers, "distill", "train a student with a frozen teacher, export it",
                    ["vlp deploy distill --teacher runs/tiny/checkpoints --out export/student "
                     "--recipe tiny_synth.yaml --set 'model.overrides={width: 96, heads: 3}'"])
    p.add_argument("--teacher", required=True, help="export, tag or checkpoints directory")
    p.add_argument("--out", required=True, help="output export directory (the student)")
    p.add_argument("--recipe", help="training recipe for the student (data, model, optimizer)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="training overrides, e.g. model.overrides={width: 96, heads: 3} "
                        "distill.temperature=2")
    p.add_argument("--run-dir", help="the student's run directory (default OUT.run)")
    add_launch_arguments(p)
    p.set_defaults(func=_cmd_distill)
