"""Resuming on another world size through DeepSpeed's universal checkpoint.

ZeRO-3 partitions every parameter and its Adam moments over the ranks that wrote a tag, so a tag
loads only on that many ranks. DeepSpeed's `ds_to_universal` rewrites a tag as one file per
parameter (fp32 weights, exp_avg, exp_avg_sq) plus the model states, which an engine of any
world size loads with `"checkpoint": {"load_universal": true}` in its config. Rank 0 converts in
a subprocess (DeepSpeed's pickles loaded weights-only, as everywhere) into
`global_step{N}.universal` beside the tag; the other ranks wait for it, and it is deleted once
every rank has loaded it (pruning removes one left by a crash).

    python -m vlp.pipeline.train.universal TAG_DIR OUT_DIR     # what rank 0 runs
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vlp.pipeline.data.checkpoints import (
    PARTIAL_SUFFIX,
    UNIVERSAL_SUFFIX,
    CheckpointError,
    weights_only_loads,
)

WAIT_POLL_S = 1.0


def universal_copy(tag_dir: Path, rank: int, wait_s: float) -> Path:
    """The universal form of `tag_dir`: converted by rank 0, waited for (up to `wait_s`, by
    polling the directory, so a long conversion does not hit a collective's timeout) by the
    other ranks."""
    target = tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)
    if rank == 0:
        _convert(tag_dir, target)
        return target
    deadline = time.monotonic() + wait_s
    while not target.is_dir():
        if time.monotonic() > deadline:
            raise CheckpointError(f"rank 0 did not convert {tag_dir} to {target} within "
                                  f"{wait_s:.0f} s")
        time.sleep(WAIT_POLL_S)
    return target


def _convert(tag_dir: Path, target: Path) -> None:
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    for stale in (partial, target):
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", __name__, str(tag_dir), str(partial)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
        raise CheckpointError(f"converting {tag_dir} to DeepSpeed's universal checkpoint "
                              f"failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    os.replace(partial, target)
    print(f"converted {tag_dir} to a universal checkpoint in {time.monotonic() - started:.1f} s",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp.pipeline.train.universal",
                                     description="ds_to_universal with weights-only loading")
    parser.add_argument("input_folder")
    parser.add_argument("output_folder")
    args = parser.parse_args(argv)
    from deepspeed.checkpoint import ds_to_universal

    # One worker each: DeepSpeed's worker processes would not inherit the weights-only allowlist
    # under a spawn or forkserver start method.
    options = argparse.Namespace(input_folder=args.input_folder, output_folder=args.output_folder,
                                 num_extract_workers=1, num_merge_workers=1,
                                 keep_temp_folder=False, strict=True, inject_missing_state=False)
    with weights_only_loads():
        ds_to_universal.main(options)
    # It also names its output in `latest_universal` beside it; the copy is loaded by its name.
    (Path(args.output_folder).parent / "latest_universal").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
