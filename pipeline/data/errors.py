"""The two kinds of failure every stage handles the same way.

UserError: input the user can fix (a bad path, config value or file). The `vlp` command prints it
as one line, `vlp <command>: error: <message>`, on stderr and exits with status 2.
BadData: one sample or shard that cannot be used. Long jobs skip it and count it by `kind`;
they never stop for it.
"""
from __future__ import annotations

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


class UserError(ValueError):
    """Bad input the user can fix; the message names the value and, where it can, the fix."""


class BadData(Exception):
    """A sample or shard that is skipped and counted under `kind` (a key of SKIP_KINDS)."""

    def __init__(self, kind: str, message: str):
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown skip kind {kind!r}")
        super().__init__(message)
        self.kind = kind
