"""The script the `deepspeed` launcher starts on every rank: `deepspeed --module vlp.pipeline.train`."""
from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys

from vlp.pipeline.distributed import adopt_handed_over_devices, shutdown_distributed
from vlp.pipeline.train.status import keep_one_copy_of_warnings
from vlp.pipeline.train.trainer import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp.pipeline.train",
                                     description="Pretrain the unified model (run under deepspeed).")
    parser.add_argument("--recipe", help="YAML training recipe")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.lr=3e-4 run_dir=runs/x")
    parser.add_argument("--resume", help="shorthand for --set checkpoint.resume=MODE")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by deepspeed
    args = parser.parse_args(argv)
    atexit.register(gc.freeze)  # no collection over torch's objects at exit (about 4 s per rank)
    # before DeepSpeed is imported (it asks CUDA for its devices); srun sets SLURM_PROCID,
    # launchers RANK
    adopt_handed_over_devices()
    keep_one_copy_of_warnings(int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))))
    overrides = list(args.set) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        return train(args.recipe, overrides)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
