"""Building blocks of the fault tests: damaged shards written beside good ones, the training
overrides they share, incremental reads of the run logs, and finding one rank's process."""
from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from train_helpers import pattern_overrides

from vlp.data_prep.index import build_manifest
from vlp.pipeline.data.tar import iter_shard

# Every skip kind the fault shards hold, and how often one pass over them meets it.
EXPECTED_SKIPS = {
    "bad_image": 1, "decompression_bomb": 1, "missing_image": 1, "missing_caption": 0,
    "non_utf8_caption": 1, "empty_caption": 1, "duplicate_key": 1, "corrupt_tar": 1,
    "empty_shard": 1, "unreadable_shard": 0, "oversized_member": 0,
    "extreme_aspect_ratio": 0, "cut_by_damage": 1,  # trunc_2, complete when trunc_3 broke
}
# Keys of samples that must never reach a batch.
BAD_KEYS = {"mixed_notimage", "mixed_bomb", "mixed_latin1", "mixed_empty", "mixed_pickle"}
TRAVERSAL_KEY = "../../evil"  # a usable sample whose member names climb out of any directory


def jpeg(seed: int, size: int = 64) -> bytes:
    """A small JPEG written with Pillow."""
    pixels = (np.random.RandomState(seed).rand(8, 8, 3) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((size, size)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height pixels (10^10: ~30 GB if decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


class _RunsCommand:
    """Unpickling this runs a shell command: proof that nothing unpickles shard members."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_fault_shards(good_dir: Path, out: Path, pickle_marker: Path) -> str:
    """Write to `out`, with tarfile + Pillow, 7 shards and index them (manifest.json, sizes.json):
        00000..00003.tar  4 good samples each, taken from an img2dataset shard of `good_dir`
        00004.tar  good samples mixed with a non-image, a decompression bomb, a latin-1 caption,
                   an empty caption, a repeated key, pickle members only (no image) and a sample
                   named ../../evil.*
        00005.tar  5 good samples, cut inside the 4th image (truncated tar)
        00006.tar  0 bytes
    Small on purpose: 6 steps of 4 samples per rank read every rank's share more than once.
    Returns the brace pattern of all 7."""
    out.mkdir(parents=True)
    source = iter_shard(sorted(good_dir.glob("*.tar"))[0])
    for shard in range(4):
        members = [(f"{key}.{ext}", data) for key, sample in itertools.islice(source, 4)
                   for ext, data in sample.items()]
        (out / f"{shard:05d}.tar").write_bytes(tar_bytes(members))

    caption = b"a red circle on the left"
    payload = pickle.dumps(_RunsCommand(f"touch {pickle_marker}"))
    mixed = []
    for i in range(4):
        mixed += [(f"mixed_good_{i}.jpg", jpeg(i)), (f"mixed_good_{i}.txt", caption)]
    mixed += [
        ("mixed_notimage.jpg", b"<html>a server error page, not an image</html>"),
        ("mixed_notimage.txt", caption),
        ("mixed_bomb.png", bomb_png()), ("mixed_bomb.txt", caption),
        ("mixed_latin1.jpg", jpeg(10)), ("mixed_latin1.txt", "café au lait".encode("latin-1")),
        ("mixed_empty.jpg", jpeg(11)), ("mixed_empty.txt", b"  \n"),
        ("mixed_good_0.jpg", jpeg(12)), ("mixed_good_0.txt", b"the same key a second time"),
        ("mixed_pickle.pyd", payload), ("mixed_pickle.pth", payload),
        ("mixed_pickle.txt", caption),
        (f"{TRAVERSAL_KEY}.jpg", jpeg(13)), (f"{TRAVERSAL_KEY}.txt", b"a blue square"),
    ]
    (out / "00004.tar").write_bytes(tar_bytes(mixed))

    members = []
    for i in range(5):
        members += [(f"trunc_{i}.jpg", jpeg(20 + i)), (f"trunc_{i}.txt", caption)]
    whole = tar_bytes(members)
    fourth_image = whole.index(b"trunc_3.jpg")  # its header; cut 100 bytes into its data
    (out / "00005.tar").write_bytes(whole[:fourth_image + 512 + 100])
    (out / "00006.tar").write_bytes(b"")
    build_manifest(out)
    return f"{out}/{{00000..00006}}.tar"


def fault_overrides(run_dir: Path, shards: str, tokenizer_dir: Path, *extra: str) -> list[str]:
    """6 steps of 2 ranks x 4 samples, a checkpoint every 3 steps. The shuffle buffer holds a
    rank's whole epoch, so every shard is read (and every skip counted) before the first batch,
    and 6 steps stay inside epoch 0: the skip counts are exact at every logged step."""
    return pattern_overrides(
        run_dir, shards, tokenizer_dir, "data.shuffle_buffer=200", "optim.batch_size=4",
        # Far longer than any bound asserted here: a run that ends quickly was not ended by it.
        "dist_timeout_s=600", *extra)


class JsonlTail:
    """Records appended to a JSONL file since the last call (one launch's share of a run log)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lines = 0

    def new(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        fresh, self.lines = lines[self.lines:], len(lines)
        return [json.loads(line) for line in fresh]


class RunLogs:
    """metrics.jsonl and both ranks' sample-key logs of one run directory, read per launch."""

    def __init__(self, run_dir: Path):
        self.metrics = JsonlTail(run_dir / "metrics.jsonl")
        self.keys = [JsonlTail(run_dir / "samples" / f"rank{rank}.jsonl") for rank in (0, 1)]

    def new(self) -> tuple[dict[int, dict], list[dict[int, list[str]]]]:
        """({step: metrics}, [{step: keys} per rank]) written since the previous call; a step's
        keys are those of all its micro-batches, in order."""
        metrics = {r["step"]: r for r in self.metrics.new()}
        keys = []
        for tail in self.keys:
            by_step: dict[int, list[str]] = {}
            for record in tail.new():
                by_step.setdefault(record["step"], []).extend(record["keys"])
            keys.append(by_step)
        return metrics, keys


def rank_process(launcher_pid: int, local_rank: int):
    """The training process of `local_rank` under a deepspeed launcher (not its loader workers,
    which are forks with the same command line), or None while it is not started yet."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            parent = child.parent()
            if (f"--local_rank={local_rank}" in child.cmdline() and parent is not None
                    and "deepspeed.launcher.launch" in " ".join(parent.cmdline())):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def metric_differences(got: dict, expected: dict, steps) -> list[str]:
    """Names of losses or skip counts that differ between two runs' records at `steps`."""
    names = [n for n in expected[min(steps)]
             if n.startswith(("loss/", "data/skipped_")) or n == "train/lr"]
    return [f"step {s} {n}: {got[s].get(n)} != {expected[s][n]}"
            for s in steps for n in names if got[s].get(n) != expected[s][n]]
