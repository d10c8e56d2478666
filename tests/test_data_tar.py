"""The shard reader on hostile and damaged tars: pax headers with bad sizes, huge members, repeated
samples, and a fuzz run over truncations, byte flips and header corruptions of valid shards.

Every read runs under a wall-clock limit (SIGALRM), so a reader that loops fails the test instead
of hanging it, and under tracemalloc, so memory that grows with a header's claims shows."""
from __future__ import annotations

import contextlib
import gzip
import io
import random
import signal
import tarfile
import tracemalloc

import pytest

from vlp.data_prep.index import build_manifest
from vlp.pipeline.data.errors import SKIP_KINDS
from vlp.pipeline.data.sources import ReadSettings
from vlp.pipeline.data.tar import SkipCounter, iter_samples

WANTED = frozenset({"jpg", "txt"})
LIMIT = 64 * 1024  # the member size limit these tests read with
BASELINE = ReadSettings().buffer_bytes + (256 << 10)  # peak traced memory of a small shard


class ReaderHung(BaseException):
    """Raised by the alarm; a BaseException, so no `except OSError` in the reader catches it
    (TimeoutError is an OSError)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ReaderHung in the main thread if the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise ReaderHung(f"still reading after {seconds} s: the reader loops")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read(path, max_member_bytes: int = LIMIT, seconds: float = 5.0):
    """(samples, skip counts, peak traced bytes) of one bounded read with iter_samples."""
    skipped = SkipCounter()
    tracemalloc.start()
    try:
        with time_limit(seconds):
            samples = list(iter_samples(str(path), WANTED, skipped, max_member_bytes))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return samples, skipped.counts, peak


def tar_bytes(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    """A tar of (name, data) or (name, data, pax records) members, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data, *pax in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:
                info.pax_headers = pax[0]
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sample(key: str, i: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", bytes([i]) * (700 + 37 * i)), (f"{key}.txt", f"caption {i}".encode())]


# ----------------------------------------------------------------- pax sizes (items 2 and 3)

@pytest.mark.parametrize("size", ["-1536", "-1", "abc", "", "1e3", "0x10", str(2**62)])
def test_a_bad_pax_size_ends_the_shard_as_corrupt(tmp_path, size):
    """-1536 on an unwanted member once made the reader seek back onto that member's own pax
    header, forever; text raised ValueError and 2^62 MemoryError out of iter_samples. Now each
    ends the shard as corrupt_tar. As for any damage, the sample being read (`pending`: its
    members may continue past the damage) is dropped and counted, and those before it are kept."""
    members = sample("good", 1) + sample("pending", 2) + [("bad.json", b"{}", {"size": size})]
    members += sample("after", 3)
    path = tmp_path / "shard.tar"
    path.write_bytes(tar_bytes(members, tarfile.PAX_FORMAT))
    samples, counts, peak = read(path)
    assert [s["__key__"] for s in samples] == ["good"]
    assert counts == {"corrupt_tar": 1, "cut_by_damage": 1}
    assert peak < BASELINE


def test_index_reports_a_bad_pax_size_instead_of_raising(tmp_path):
    members = sample("good", 1) + sample("pending", 2) + [("bad.jpg", b"x", {"size": "abc"})]
    (tmp_path / "00000.tar").write_bytes(tar_bytes(members, tarfile.PAX_FORMAT))
    manifest = build_manifest(tmp_path)  # `vlp data index`
    assert manifest["shards"][0]["samples"] == 1
    assert [(p["shard"], p["kind"]) for p in manifest["problems"]
            if p["kind"] == "corrupt_tar"] == [("00000.tar", "corrupt_tar")]


# --------------------------------------------------------------- member size limit (item 5)

def test_a_member_over_the_limit_is_never_read_into_memory(tmp_path):
    """A 4 MiB member compresses to a few KB: the reader skips it (streaming through gzip) and
    drops its sample, counted; the samples around it are read and memory stays small."""
    members = sample("before", 1) + [("huge.jpg", bytes(4 << 20)), ("huge.txt", b"a caption")]
    members += sample("after", 2)
    path = tmp_path / "shard.tar.gz"
    path.write_bytes(gzip.compress(tar_bytes(members)))
    assert path.stat().st_size < 20_000
    samples, counts, peak = read(path, max_member_bytes=1 << 20)
    assert [s["__key__"] for s in samples] == ["before", "after"]
    assert counts == {"oversized_member": 1}
    assert peak < BASELINE + (256 << 10), f"peak {peak} bytes: the 4 MiB member was read"
    samples, counts, _ = read(path, max_member_bytes=8 << 20)  # a higher limit reads it
    assert [s["__key__"] for s in samples] == ["before", "huge", "after"]


def test_the_loader_setting_reaches_the_reader():
    from vlp.pipeline.data.errors import UserError
    from vlp.pipeline.data.loader import DataConfig

    assert DataConfig().max_member_mb == 16
    with pytest.raises(UserError, match="data.max_member_mb must be a finite number > 0"):
        DataConfig(max_member_mb=0)


# ----------------------------------------------------------------- repeated samples (item 6)

def test_a_sample_repeated_in_a_row_delivers_its_first_copy(tmp_path):
    first = sample("twice", 1)
    repeat = [(name, b"second copy") for name, _ in first]
    members = sample("a", 0) + first + repeat + sample("b", 2) + sample("a", 3)
    path = tmp_path / "shard.tar"
    path.write_bytes(tar_bytes(members))
    samples, counts, _ = read(path)
    assert [s["__key__"] for s in samples] == ["a", "twice", "b"]
    assert samples[1] == {"__key__": "twice", "jpg": first[0][1], "txt": first[1][1]}
    assert counts == {"duplicate_key": 2}  # the repeat in a row, and `a` coming back later


# ---------------------------------------------------------------------------------- fuzzing

def valid_shards() -> dict[str, bytes]:
    """Three layouts of the same 8 samples: ustar, pax (forced pax headers, a 150-character
    key) and GNU (long names)."""
    members = [m for i in range(8) for m in sample(f"s{i}", i)]
    long_key = "dir/" + "k" * 150
    members[4:6] = [(f"{long_key}.jpg", members[4][1]), (f"{long_key}.txt", members[5][1])]
    paxed = [(name, data, {"comment": f"member {i}"}) for i, (name, data) in enumerate(members)]
    return {
        "ustar": tar_bytes(members[:4] + members[6:]),
        "pax": tar_bytes(paxed, tarfile.PAX_FORMAT),
        "gnu": tar_bytes(members, tarfile.GNU_FORMAT),
    }


def header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [info.offset for info in tar]
    # pax and GNU long-name members sit before the header tarfile reports: include them
    return sorted({o for o in offsets} | {o - 512 for o in offsets if o >= 512}
                  | {o - 1024 for o in offsets if o >= 1024})


def corrupt_header(data: bytearray, offset: int, rng: random.Random) -> str:
    """Overwrite one header field with a hostile value and fix the checksum, so the damage gets
    past the checksum test into the parser."""
    field, value = rng.choice([
        ("size", b"\xff" + bytes(rng.randrange(256) for _ in range(11))),  # negative base-256
        ("size", b"\x80" + b"\x7f" * 11),  # base-256, about 2^88
        ("size", b"\x80\x00\x00\x40" + bytes(8)),  # base-256, 2^62
        ("size", b"77777777777\0"),  # 8 GiB
        ("size", b"-0000001000\0"),
        ("size", bytes(rng.randrange(256) for _ in range(12))),
        ("type", rng.choice([b"x", b"L", b"5", b"2", b"g", b"K", b"\xff"])),
        ("name", bytes(rng.randrange(256) for _ in range(100))),
        ("name", b"../../" + b"a." * 40 + b"\0"),
    ])
    start, length = {"name": (0, 100), "size": (124, 12), "type": (156, 1)}[field]
    data[offset + start:offset + start + length] = value[:length].ljust(length, b"\0")
    data[offset + 148:offset + 156] = b" " * 8
    data[offset + 148:offset + 156] = b"%06o\0 " % sum(data[offset:offset + 512])
    return f"{field}={value[:12]!r}"


def corrupt_pax(data: bytearray, rng: random.Random) -> str:
    """Replace a pax record's value (keeping the record length field consistent is not needed:
    a reader must survive both)."""
    at = data.find(b" comment=")
    if at < 0:
        return "no pax record"
    value = rng.choice([b"size=-9999", b"size=abc", b"size=4611686018427387904", b"path=\0\0"])
    data[at + 1:at + 1 + len(value)] = value
    return value.decode("latin-1")


def mutations(seed: int, cases: int):
    """(name, shard bytes, gzip?) per fuzz case, deterministic from `seed`."""
    rng = random.Random(seed)
    shards = valid_shards()
    for case in range(cases):
        layout = rng.choice(sorted(shards))
        data = bytearray(shards[layout])
        kind = rng.choice(["truncate", "flip", "header", "header", "pax"])
        if kind == "truncate":
            cut = rng.randrange(len(data))
            what = f"cut at {cut}"
            del data[cut:]
        elif kind == "flip":
            spots = [rng.randrange(len(data)) for _ in range(rng.randint(1, 4))]
            for spot in spots:
                data[spot] ^= 1 << rng.randrange(8)
            what = f"flipped {spots}"
        elif kind == "header":
            offset = rng.choice(header_offsets(bytes(shards[layout])))
            what = corrupt_header(data, offset, rng) + f" at {offset}"
        else:
            what = corrupt_pax(data, rng)
        compressed = rng.random() < 0.25
        payload = gzip.compress(bytes(data)) if compressed else bytes(data)
        if compressed and rng.random() < 0.3:
            payload = payload[:rng.randrange(len(payload))]  # a cut gzip stream too
            what += ", gzip cut"
        yield f"{case}: {layout} {kind} {what}", payload, compressed


FUZZ_SEED, FUZZ_CASES = 0, 400


def test_fuzzed_shards_never_hang_raise_or_grow_memory_and_losses_are_counted(tmp_path):
    originals = {layout: {s["__key__"] for s in read_bytes(tmp_path, data, False)[0]}
                 for layout, data in valid_shards().items()}
    assert {layout: len(keys) for layout, keys in originals.items()} == {
        "gnu": 8, "pax": 8, "ustar": 7}  # ustar cannot hold the long key
    lost_cases, kinds_seen = 0, set()
    for name, payload, compressed in mutations(FUZZ_SEED, FUZZ_CASES):
        try:
            samples, counts, peak = read_bytes(tmp_path, payload, compressed)
        except BaseException as exc:  # noqa: BLE001 (the assertion is that nothing escapes)
            pytest.fail(f"case {name}: {type(exc).__name__}: {exc}")
        assert peak < BASELINE + 4 * LIMIT, f"case {name}: peak {peak} bytes"
        assert set(counts) <= set(SKIP_KINDS), name
        layout = name.split()[1]
        if not originals[layout] <= {s["__key__"] for s in samples}:
            lost_cases += 1
            assert sum(counts.values()) > 0, f"case {name}: samples lost and nothing counted"
        kinds_seen |= set(counts)
    print(f"{FUZZ_CASES} cases: {lost_cases} lost samples, skip kinds seen {sorted(kinds_seen)}")
    assert lost_cases > FUZZ_CASES // 4  # the corruptions do damage, so the check has teeth
    assert {"corrupt_tar", "oversized_member"} <= kinds_seen


def read_bytes(tmp_path, payload: bytes, compressed: bool):
    path = tmp_path / ("case.tar.gz" if compressed else "case.tar")
    path.write_bytes(payload)
    return read(path, seconds=2.0)
