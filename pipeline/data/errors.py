"""The two kinds of failure every stage handles the same way, and the one way to warn.

UserError: input the user can fix (a bad path, config value or file). The `vlp` command prints it
as one line, `error_line`'s `vlp <command>: error: <message>`, on stderr and exits with status 2.
StageFailed: a stage that a command ran (training, evaluation) failed and said why in its own
output; printed the same way, exit status 1.
BadData: one sample or shard that cannot be used. Long jobs skip it and count it by `kind`;
they never stop for it.
warn: something that works, but not as the user may expect (a vocabulary smaller than asked,
fewer shards than a run will need): one line, `warning: <what and why>`, on stderr, the moment
it happens.
"""
from __future__ import annotations

import sys

# Why a sample (or a whole shard) was skipped. Sample kinds count samples, shard kinds count
# shard reads (the samples a damaged shard still held before the damage are used).
SKIP_KINDS = {
    "bad_image": "image member PIL cannot decode (corrupt, not an image, unsupported format)",
    "decompression_bomb": "image header claims more pixels than transforms.MAX_IMAGE_PIXELS",
    "extreme_aspect_ratio": "image sides differ more than transforms.MAX_ASPECT_RATIO times",
    "missing_image": "sample has no member with an image extension",
    "missing_caption": "sample has no caption member",
    "non_utf8_caption": "caption bytes are not UTF-8",
    "empty_caption": "caption is empty or whitespace",
    "duplicate_key": "key seen earlier in the same shard, or a sample's files repeated (the first "
                     "copy is used)",
    "oversized_member": "sample with an image or caption member over data.max_member_mb (never "
                        "read into memory)",
    "cut_by_damage": "sample being read when its shard broke (its members may continue past the "
                     "damage)",
    "corrupt_tar": "shard read: truncated, bad header checksum or malformed (rest of shard lost)",
    "empty_shard": "shard read: the file has 0 bytes",
    "unreadable_shard": "shard read: could not be opened or read (I/O or HTTP error)",
}


# What the loader counts beside the skips (the same counters, logged as data/shard_reads and
# data/retries): the reads that the unreadable_shard share is taken of, and the retries behind them.
READ_COUNTS = {
    "shard_reads": "shards opened for reading",
    "read_retries": "ranged reads from an object store that failed and were tried again",
}


class UserError(ValueError):
    """Bad input the user can fix; the message names the value and, where it can, the fix."""


class StageFailed(RuntimeError):
    """A stage run by a command failed (its own output above says why)."""


def error_line(command: str, exc: BaseException) -> str:
    """`vlp <command>: error: <message>`, the message's lines joined into one (a weights/config
    mismatch lists its problems on separate lines)."""
    message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"vlp {command}: error: {message}"


class BadData(Exception):
    """A sample or shard that is skipped and counted under `kind` (a key of SKIP_KINDS)."""

    def __init__(self, kind: str, message: str):
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown skip kind {kind!r}")
        super().__init__(message)
        self.kind = kind


def warn(message: str) -> None:
    """Print `warning: <message>` as one line on stderr."""
    print("warning: " + " ".join(message.split()), file=sys.stderr, flush=True)
