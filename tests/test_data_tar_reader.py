"""The shard reader on tars built block by block, where every header field, offset and count is
known: what each member type yields, where a span lies, each limit at its boundary, each damage's
exact message, and how members group into samples. Hostile and fuzzed shards are in
tests/test_data_tar.py."""
from __future__ import annotations

import gzip
import io
import logging
import tarfile

import pytest

from vlp.pipeline.data import tar
from vlp.pipeline.data.errors import BadData, UserError
from vlp.pipeline.data.sources import ReadSettings
from vlp.pipeline.data.tar import (
    MemberSpan,
    SkipCounter,
    group_samples,
    iter_members,
    iter_samples,
    iter_shard,
    list_shards,
    read_samples,
)

END = bytes(1024)  # the end-of-archive marker: two zero blocks


def header(name: bytes, size: int, kind: bytes = b"0", prefix: bytes = b"",
           size_field: bytes | None = None, signed_checksum: bool = False) -> bytes:
    """One ustar header block with a correct checksum (summed over signed bytes if asked)."""
    block = bytearray(512)
    block[:len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[345:345 + len(prefix)] = prefix
    total = sum((b - 256 if b > 127 else b) if signed_checksum else b for b in block)
    block[148:156] = b"%06o\0 " % (total & 0o777777)
    return bytes(block)


def member(name: bytes, data: bytes, kind: bytes = b"0", **fields) -> bytes:
    """A header and its data padded to whole blocks."""
    return header(name, len(data), kind, **fields) + data + bytes(-len(data) % 512)


def pax(records: dict[str, str]) -> bytes:
    """A pax extended header member ('x') with `records`, each `LENGTH key=value\\n`."""
    body = b""
    for key, value in records.items():
        line = f" {key}={value}\n".encode()
        length = len(line) + len(str(len(line)))
        length += len(str(length)) - len(str(len(line)))
        body += str(length).encode() + line
    return member(b"././@PaxHeader", body, b"x")


def members(data: bytes, wanted=None, spans=frozenset(), limit=tar.MAX_MEMBER_BYTES) -> list:
    return list(iter_members(io.BytesIO(data), wanted, spans, limit))


def refused(data: bytes, **kwargs) -> BadData:
    with pytest.raises(BadData) as error:
        members(data, **kwargs)
    return error.value


class Unseekable(io.RawIOBase):
    """A stream that cannot seek and hands out at most `chunk` bytes per read, recording each
    read's size (a socket's short reads)."""

    def __init__(self, data: bytes, chunk: int = 1 << 30):
        self.data, self.pos, self.chunk, self.reads = data, 0, chunk, []

    def readable(self):
        return True

    def read(self, size=-1):
        self.reads.append(size)
        size = min(size, self.chunk)
        out = self.data[self.pos:self.pos + size]
        self.pos += len(out)
        return out


# ------------------------------------------------------------------------- members and names

def test_regular_members_yield_key_lower_case_extension_and_data_others_are_skipped():
    data = (member(b"d/000001.JPG", b"pixels") + member(b"d/000001.cls.txt", b"3")
            + member(b"d/", b"", b"5") + member(b"d/link.jpg", b"", b"2")
            + member(b"d/old.jpg", b"old", b"\0") + member(b"d/contig.jpg", b"c", b"7")
            + member(b"d/__meta__/x.txt", b"meta") + member(b"__index__/0.txt", b"meta")
            + member(b"d/.hidden", b"h") + member(b"d/noext", b"n")
            + member(b"d/fifo.txt", b"", b"6") + END)
    assert members(data) == [("d/000001", "jpg", b"pixels"), ("d/000001", "cls.txt", b"3"),
                             ("d/old", "jpg", b"old"), ("d/contig", "jpg", b"c")]
    assert members(data, wanted=frozenset({"cls.txt"})) == [("d/000001", "cls.txt", b"3")]
    assert members(data, wanted=frozenset()) == []


def test_the_key_ends_at_the_first_dot_of_the_file_name_not_of_the_directory():
    data = (member(b"a.b/c/00.x.Y", b"1") + member(b"a.b/.c", b"2")
            + member(b"d/v1.2/000.jpg", b"3") + END)
    assert members(data) == [("a.b/c/00", "x.y", b"1"), ("d/v1.2/000", "jpg", b"3")]


def test_names_that_fill_their_fields_end_with_the_field():
    """A 100-byte name and a 155-byte prefix have no NUL: the next field's bytes (the mode, the
    header's padding, here not zero) are not part of them."""
    name, prefix = b"n" * 96 + b".jpg", b"p" * 155
    block = bytearray(header(name, 1, prefix=prefix))
    block[500] = ord("Z")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    got = members(bytes(block) + b"1" + bytes(511) + END)
    assert got == [("p" * 155 + "/" + "n" * 96, "jpg", b"1")]


def test_a_member_of_511_bytes_is_followed_by_one_byte_of_padding():
    data = member(b"a.txt", b"x" * 511) + member(b"b.txt", b"y") + END
    assert members(data) == [("a", "txt", b"x" * 511), ("b", "txt", b"y")]
    assert list(iter_members(Unseekable(data), None)) == members(data)


def test_names_from_the_ustar_prefix_gnu_long_names_and_pax_paths():
    long_dir = b"p" * 120
    data = (member(b"000001.jpg", b"a", prefix=long_dir)
            + member(b"././@LongLink", long_dir + b"/000002.jpg\0", b"L")
            + member(b"truncated-name", b"b")
            + pax({"path": "pax/000003.jpg", "comment": "x=y"}) + member(b"ignored.jpg", b"c")
            + member(b"plain/000004.jpg", b"d") + END)
    assert members(data) == [(long_dir.decode() + "/000001", "jpg", b"a"),
                             (long_dir.decode() + "/000002", "jpg", b"b"),
                             ("pax/000003", "jpg", b"c"), ("plain/000004", "jpg", b"d")]


def test_without_the_ustar_magic_the_prefix_field_is_not_part_of_the_name():
    block = bytearray(header(b"000001.jpg", 1, prefix=b"pre"))
    block[257:265] = bytes(8)
    block[148:156] = b"%06o\0 " % (sum(block[:148]) + 8 * 32 + sum(block[156:]))
    assert members(bytes(block) + b"a" + bytes(511) + END) == [("000001", "jpg", b"a")]


def test_a_pax_size_overrides_the_header_size_for_one_member():
    data = (pax({"size": "3"}) + header(b"a.txt", 9) + b"abc" + bytes(509)
            + member(b"b.txt", b"0123456789") + END)
    assert members(data) == [("a", "txt", b"abc"), ("b", "txt", b"0123456789")]


def test_spans_give_each_member_s_data_range_in_the_tar():
    first, second = b"x" * 700, b"y" * 5
    data = (member(b"k.txt", b"t") + member(b"k.jpg", first) + member(b"m.jpg", second)
            + member(b"skip.png", b"p") + END)
    got = members(data, wanted=frozenset({"txt"}), spans=frozenset({"jpg"}))
    assert got == [("k", "txt", b"t"), ("k", "jpg", MemberSpan("k.jpg", 1536, 700)),
                   ("m", "jpg", MemberSpan("m.jpg", 3072, 5))]
    assert data[1536:1536 + 700] == first and data[3072:3077] == second


# --------------------------------------------------------------------------------- the limits

def test_a_member_at_the_limit_is_read_one_byte_over_is_skipped_unread():
    data = member(b"a.jpg", b"1234") + member(b"b.jpg", b"12345") + member(b"c.jpg", b"9") + END
    assert members(data, limit=4) == [("a", "jpg", b"1234"), ("b", "jpg", None),
                                      ("c", "jpg", b"9")]


def test_on_a_stream_a_member_too_large_to_read_past_ends_the_shard(monkeypatch):
    monkeypatch.setattr(tar, "MAX_STREAM_SKIP", 600)
    big = member(b"big.jpg", b"z" * 601)
    at_limit = member(b"ok.jpg", b"z" * 600)
    stream = Unseekable(at_limit + big + END)
    got = iter_members(stream, None, frozenset(), 100)
    assert next(got) == ("ok", "jpg", None)
    with pytest.raises(BadData) as error:
        next(got)
    assert error.value.kind == "oversized_member"
    assert str(error.value) == ("big.jpg is 601 bytes at byte 2048: too large to read past on "
                                "a stream; the rest is skipped")
    assert members(big + END, limit=100) == [("big", "jpg", None)]  # a file seeks past it
    gz = gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(big + END)))
    with pytest.raises(BadData, match="too large to read past on a stream"):
        list(iter_members(gz, None, frozenset(), 100))


def test_an_implausible_member_size_is_corrupt():
    base256 = bytes([0x80]) + (tar.MAX_TAR_MEMBER + 1).to_bytes(11, "big")
    error = refused(member(b"a.jpg", b"") + header(b"b.jpg", 0, size_field=base256) + END)
    assert (error.kind, str(error)) == ("corrupt_tar",
                                        f"implausible member size {(1 << 40) + 1} at byte 512")
    at_limit = bytes([0x80]) + tar.MAX_TAR_MEMBER.to_bytes(11, "big")
    error = refused(header(b"b.jpg", 0, size_field=at_limit) + END)  # taken: seeks past it
    assert str(error) == (f"truncated: ends at byte {512 + (1 << 40)} without the "
                          "end-of-archive marker")


def test_an_extended_header_over_a_mebibyte_is_corrupt():
    size = tar.MAX_HEADER_DATA
    ok = header(b"././@LongLink", size, b"L") + b"n.jpg".ljust(size, b"\0") + member(b"x", b"")
    assert members(ok + END) == [("n", "jpg", b"")]  # member "x" under its long name
    error = refused(header(b"././@LongLink", size + 1, b"L") + bytes(size + 1))
    assert str(error) == f"implausible {size + 1}-byte extended header at byte 512"
    error = refused(header(b"x", size + 1, b"x") + bytes(size + 1))
    assert str(error) == f"implausible {size + 1}-byte extended header at byte 512"


# ------------------------------------------------------------------------------ damaged tars

def test_a_cut_extended_header_names_where_its_data_ends():
    error = refused(header(b"././@LongLink", 10, b"L") + b"abc")
    assert str(error) == "truncated: member data at byte 512 ends after 3 of 10 bytes"


def test_an_empty_file_and_a_cut_header_and_a_missing_end_marker():
    error = refused(b"")
    assert (error.kind, str(error)) == ("empty_shard", "file is empty (0 bytes)")
    error = refused(member(b"a.jpg", b"1") + bytes(100))
    assert (error.kind, str(error)) == (
        "corrupt_tar", "truncated: ends at byte 1124 without the end-of-archive marker")
    error = refused(member(b"a.jpg", b"1"))
    assert str(error) == "truncated: ends at byte 1024 without the end-of-archive marker"
    error = refused(bytes(10))
    assert str(error) == "truncated: ends at byte 10 without the end-of-archive marker"
    assert members(bytes(512)) == []  # one zero block ends the archive


@pytest.mark.parametrize("kind", [b"0", b"L", b"x", b"5"])
def test_a_stream_cut_in_a_member_s_padding_names_the_byte(kind):
    """Kept data, a long name, a pax header or another type: the cut is after 5 of the
    padding's bytes (a skipped member: of its data and padding), at byte 512 + 10."""
    data = header(b"a.txt", 10, kind) + b"10 p=0123\n" + bytes(5)
    with pytest.raises(BadData) as error:
        list(iter_members(Unseekable(data), frozenset({"txt"})))
    cut = "5 of 502" if kind in (b"0", b"L", b"x") else "15 of 512"
    at = 522 if kind in (b"0", b"L", b"x") else 512
    assert str(error.value) == f"truncated: member data at byte {at} ends after {cut} bytes"
    skipped = header(b"a.png", 10) + bytes(15)  # not wanted: data and padding skipped at once
    with pytest.raises(BadData, match="at byte 512 ends after 15 of 512 bytes"):
        list(iter_members(Unseekable(skipped), frozenset({"txt"})))
    spanned = iter_members(Unseekable(skipped), frozenset(), frozenset({"png"}))
    with pytest.raises(BadData, match="at byte 512 ends after 15 of 512 bytes"):
        list(spanned)  # a span's data is skipped the same way


def test_other_member_types_with_data_are_skipped_whole():
    data = (member(b"pax_global_header", b"9 a=bcd\n", b"g") + member(b"d/link", b"x" * 600, b"K")
            + member(b"a.txt", b"kept") + END)
    assert members(data) == [("a", "txt", b"kept")]


def test_bad_numbers_in_later_headers_name_their_byte():
    size_field = bytearray(header(b"b.jpg", 0))
    size_field[124:136] = b"00000000001x"
    size_field[148:156] = b" " * 8
    size_field[148:156] = b"%06o\0 " % sum(size_field)
    error = refused(member(b"a.jpg", b"1") + bytes(size_field) + END)
    assert str(error) == "malformed header at byte 1024"
    error = refused(member(b"a.jpg", b"1") + pax({"size": "abc"}) + header(b"b.jpg", 0) + END)
    assert str(error) == "malformed pax size 'abc' at byte 2048"  # the header it sizes
    error = refused(member(b"a.jpg", b"1") + member(b"././@PaxHeader", b"x path=a\n", b"x")
                    + header(b"b.jpg", 0) + END)
    assert str(error) == "malformed pax header at byte 1536"  # where its records begin


def test_long_names_keep_bytes_that_are_not_utf8_and_trailing_letters():
    name = b"d" * 101 + b"/\xff01.TXX"
    data = member(b"././@LongLink", name + b"\0\0", b"L") + member(b"x", b"1") + END
    assert members(data) == [("d" * 101 + "/\udcff01", "txx", b"1")]


def test_a_read_that_fails_mid_shard_is_an_unreadable_shard(tmp_path, monkeypatch):
    class Failing(io.BytesIO):
        def read(self, size=-1):
            if self.tell() >= 512:
                raise OSError("connection reset")
            return super().read(size)

    monkeypatch.setattr(tar, "open_shard", lambda url, reading, on_retry: Failing(
        member(b"a.txt", b"x" * 600) + END))
    with pytest.raises(BadData) as error:
        list(read_samples("s3://bucket/s.tar", None, SkipCounter()))
    assert (error.value.kind, str(error.value)) == ("unreadable_shard",
                                                    "read failed: connection reset")


def test_cut_member_data_names_where_and_how_much():
    data = header(b"a.jpg", 1000) + b"q" * 300
    error = refused(data)
    assert (error.kind, str(error)) == (
        "corrupt_tar", "truncated: member data at byte 512 ends after 300 of 1000 bytes")
    with pytest.raises(BadData, match="at byte 512 ends after 300 of 1000 bytes"):
        list(iter_members(Unseekable(data), None))


def test_a_stream_cut_while_skipping_names_the_byte_of_the_cut_read():
    data = header(b"a.png", (1 << 20) + 100) + b"s" * ((1 << 20) + 10)
    with pytest.raises(BadData) as error:
        list(iter_members(Unseekable(data), frozenset({"txt"})))
    assert str(error.value) == (f"truncated: member data at byte {512 + (1 << 20)} ends after 10 "
                                f"of {100 + 412} bytes")


def test_short_reads_are_joined_and_skips_read_a_mebibyte_at_a_time():
    assert tar._read_exact(Unseekable(b"0123456789", chunk=3), 10, 0) == b"0123456789"
    assert tar._read_exact(Unseekable(b"0123456789more", chunk=3), 10, 0) == b"0123456789"
    with pytest.raises(BadData) as error:
        tar._read_exact(Unseekable(b"0123456789", chunk=3), 11, 40)
    assert str(error.value) == "truncated: member data at byte 40 ends after 10 of 11 bytes"
    skipped = b"s" * ((1 << 20) + 5)
    data = member(b"a.png", skipped) + member(b"b.txt", b"0123456789") + END
    stream = Unseekable(data)
    assert list(iter_members(stream, frozenset({"txt"}))) == [("b", "txt", b"0123456789")]
    # header, the unwanted 1 MiB + 5 bytes skipped a MiB per read (then 5 + 507 padding),
    # header, data, padding, end marker
    assert stream.reads == [512, 1 << 20, 512, 512, 10, 502, 512]


def test_checksums_as_writers_store_them_and_a_malformed_one():
    """Six digits, NUL, space (GNU, Python) or seven digits and a space (POSIX allows both); a
    header whose bytes sum past 0o77777 needs the field's first digit."""
    block = bytearray(header(b"a.jpg", 0, prefix=b"\xfe" * 150))
    assert int(bytes(block[148:154]), 8) > 0o77777
    assert members(bytes(block) + END) == [("\udcfe" * 150 + "/a", "jpg", b"")]
    seven = bytearray(header(b"a.jpg", 0))
    seven[148:156] = b"%07o " % int(bytes(seven[148:154]), 8)
    assert members(bytes(seven) + END) == [("a", "jpg", b"")]
    malformed = bytearray(header(b"a.jpg", 0))
    malformed[148:156] = b"12x4\0   "
    error = refused(member(b"b.jpg", b"1") + bytes(malformed) + END)
    assert str(error) == "malformed header at byte 1024"


def test_a_bad_checksum_is_corrupt_and_an_old_signed_checksum_is_accepted():
    good = header("é/0.jpg".encode(), 0, signed_checksum=True)
    assert members(good + END) == [("é/0", "jpg", b"")]
    damaged = bytearray(header(b"a.jpg", 0))
    damaged[0] ^= 1
    error = refused(member(b"b.jpg", b"1") + bytes(damaged) + END)
    assert (error.kind, str(error)) == ("corrupt_tar", "bad header checksum at byte 1024")


@pytest.mark.parametrize("field, value", [
    (b"00000000017\0", 15), (b"        17 \0", 15), (b"17\0garbage99", 15), (b"\0" * 12, 0),
    (b" " * 11 + b"\0", 0), (bytes([0x80]) + (5).to_bytes(11, "big"), 5),
    (bytes([0xBF]) + bytes(11), 0x3F << 88),
])
def test_header_numbers_in_octal_and_base_256(field, value):
    assert tar._number(field, 0) == value


@pytest.mark.parametrize("field, message", [
    (b"00000000018\0", "malformed header at byte 7"), (b"+0000000017\0", "malformed header"),
    (b"0o17\0\0\0\0\0\0\0\0", "malformed header"), (b"1_7\0" + bytes(8), "malformed header"),
    (bytes([0xC0]) + bytes(11), "negative number in header at byte 7"),
    (b"X0000000017\0", "malformed header at byte 7"),
])
def test_malformed_and_negative_header_numbers_are_corrupt(field, message):
    with pytest.raises(BadData) as error:
        tar._number(field, 7)
    assert error.value.kind == "corrupt_tar" and str(error.value).startswith(message)


def test_pax_records_are_length_prefixed_and_a_bad_length_is_corrupt():
    assert tar._parse_pax(b"18 path=a/b/c.jpg\n11 size=42\n\0\0\0", 0) == {
        "path": "a/b/c.jpg", "size": "42"}
    assert tar._parse_pax(b"15 k=v=with=eq\n", 0) == {"k": "v=with=eq"}
    for bad in (b"x path=a\n", b"0 path=a\n", b"-5 path=a\n", b"12path=a.jpg"):
        with pytest.raises(BadData) as error:
            tar._parse_pax(bad, 99)
        assert str(error.value) == "malformed pax header at byte 99"
    # a key that is not UTF-8 is replaced, a value kept byte for byte (surrogate escapes)
    assert tar._parse_pax(b"8 \xffk=v\xfe\n", 0) == {"\ufffdk": "v\udcfe"}
    assert tar._pax_size("12", 0) == 12
    with pytest.raises(BadData) as error:
        tar._pax_size("１２" + "9" * 40, 5)
    assert str(error.value) == f"malformed pax size {('１２' + '9' * 40)[:30]!r} at byte 5"


# ----------------------------------------------------------------------- grouping into samples

def test_members_group_by_key_and_repeats_are_skipped_and_counted():
    skipped = SkipCounter()
    stream = [("a", "jpg", b"1"), ("a", "txt", b"2"), ("b", "jpg", b"3"),
              ("b", "jpg", b"3 again"), ("b", "txt", b"4"), ("a", "jpg", b"later"),
              ("a", "txt", b"later"), ("c", "txt", b"5")]
    assert list(group_samples(iter(stream), skipped)) == [
        {"__key__": "a", "jpg": b"1", "txt": b"2"}, {"__key__": "b", "jpg": b"3"},
        {"__key__": "c", "txt": b"5"}]
    assert skipped.counts == {"duplicate_key": 2}


def test_an_oversized_member_drops_its_sample_unless_kept():
    stream = [("a", "jpg", None), ("a", "txt", b"1"), ("b", "txt", b"2")]
    skipped = SkipCounter()
    assert list(group_samples(iter(stream), skipped)) == [{"__key__": "b", "txt": b"2"}]
    assert skipped.counts == {"oversized_member": 1}
    skipped = SkipCounter()
    assert list(group_samples(iter(stream), skipped, keep_oversized=True)) == [
        {"__key__": "a", "jpg": None, "txt": b"1"}, {"__key__": "b", "txt": b"2"}]
    assert skipped.counts == {}


def test_damage_mid_sample_drops_and_counts_it_once():
    def broken(items):
        yield from items
        raise BadData("corrupt_tar", "broken")

    for items, counts in (([("a", "txt", b"1"), ("b", "txt", b"2")], {"cut_by_damage": 1}),
                          ([("a", "txt", b"1"), ("a", "txt", b"1")], {"duplicate_key": 1}),
                          ([], {})):
        skipped, got = SkipCounter(), []
        with pytest.raises(BadData):
            for sample in group_samples(broken(items), skipped):
                got.append(sample["__key__"])
        assert got == ["a"][:len(items)] and skipped.counts == counts


def test_a_paused_counter_counts_nothing_and_warns_of_nothing(caplog):
    skipped = SkipCounter()
    skipped.paused = True
    with caplog.at_level(logging.WARNING, logger="vlp.pipeline.data.tar"):
        skipped.add("duplicate_key")
        skipped.shard_failed("s.tar", "corrupt_tar", "bad")
        assert skipped.counts == {} and caplog.records == []
        skipped.paused = False
        skipped.shard_failed("s.tar", "corrupt_tar", "bad header")
        skipped.add("corrupt_tar")
    assert skipped.counts == {"corrupt_tar": 2}
    assert [r.getMessage() for r in caplog.records] == [
        "shard s.tar: bad header (corrupt_tar); continuing with the next shard"]


# ------------------------------------------------------------------------------- whole shards

def test_a_shard_file_reads_to_samples_and_damage_is_counted_not_raised(tmp_path, caplog):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(member(b"a.jpg", b"1") + member(b"a.txt", b"x") + member(b"b.jpg", b"2")
                      + member(b"b.txt", b"y"))  # no end marker
    skipped = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="vlp.pipeline.data.tar"):
        got = list(iter_samples(str(shard), frozenset({"txt"}), skipped))
    assert got == [{"__key__": "a", "txt": b"x"}]
    assert skipped.counts == {"corrupt_tar": 1, "cut_by_damage": 1}
    assert [r.getMessage() for r in caplog.records] == [
        f"shard {shard}: truncated: ends at byte 4096 without the end-of-archive marker "
        "(corrupt_tar); continuing with the next shard"]
    skipped = SkipCounter()
    with pytest.raises(BadData, match="without the end-of-archive marker"):
        list(read_samples(str(shard), None, skipped))


def test_an_unreadable_or_broken_gzip_shard_names_its_kind(tmp_path):
    with pytest.raises(BadData) as error:
        list(read_samples(str(tmp_path / "missing.tar"), None, SkipCounter()))
    assert error.value.kind == "unreadable_shard"
    assert str(error.value).startswith("cannot open: [Errno 2] No such file or directory")
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(member(b"a.txt", b"x") + END)[:-30])
    with pytest.raises(BadData) as error:
        list(read_samples(str(tmp_path / "cut.tar.gz"), None, SkipCounter()))
    assert error.value.kind == "corrupt_tar"
    assert str(error.value).startswith("compressed stream broken: ")
    (tmp_path / "notgz.tar.gz").write_bytes(b"plain bytes, not gzip" * 40)
    with pytest.raises(BadData, match="^compressed stream broken: "):
        list(read_samples(str(tmp_path / "notgz.tar.gz"), None, SkipCounter()))
    (tmp_path / "dir.tar").mkdir()
    with pytest.raises(BadData) as error:
        list(read_samples(str(tmp_path / "dir.tar"), None, SkipCounter()))
    assert error.value.kind == "unreadable_shard"


def test_the_read_settings_reach_the_stream_and_retried_reads_are_counted(tmp_path,
                                                                          monkeypatch):
    (tmp_path / "s.tar").write_bytes(member(b"a.txt", b"x") + END)
    opened = []

    def open_shard(url, reading, on_retry):
        opened.append((url, reading))
        on_retry()
        on_retry()
        return open(url, "rb")

    monkeypatch.setattr(tar, "open_shard", open_shard)
    settings = ReadSettings(buffer_bytes=4096, concurrency=3, retries=2)
    skipped = SkipCounter()
    assert list(iter_samples(str(tmp_path / "s.tar"), frozenset({"txt"}), skipped,
                             reading=settings)) == [{"__key__": "a", "txt": b"x"}]
    assert opened == [(str(tmp_path / "s.tar"), settings)]
    assert skipped.counts == {"read_retries": 2}


def test_a_local_shard_lists_and_iterates_with_every_member(tmp_path):
    for name in ("00001.tar", "00000.tar", "notes.txt", "00002.tar.gz"):
        (tmp_path / name).write_bytes(member(b"k.JPG", b"1") + member(b"k.txt", b"t")
                                      + member(b"k.jpg", b"again") + END)
    (tmp_path / "sub").mkdir()
    assert list_shards(tmp_path) == [tmp_path / "00000.tar", tmp_path / "00001.tar"]
    with pytest.raises(UserError) as error:
        list_shards(tmp_path / "notes.txt")
    assert str(error.value) == (f"shard directory {tmp_path / 'notes.txt'} is a file, not a "
                                "directory")
    skipped = SkipCounter()
    assert list(iter_shard(tmp_path / "00000.tar", skipped)) == [("k", {"jpg": b"1", "txt": b"t"})]
    assert skipped.counts == {"duplicate_key": 1}
    big = tmp_path / "big.tar"
    big.write_bytes(member(b"k.jpg", b"123") + member(b"k.txt", b"t") + END)
    assert list(iter_shard(big, max_member_bytes=2)) == []
    assert list(iter_shard(big, max_member_bytes=2, keep_oversized=True)) == [
        ("k", {"jpg": None, "txt": b"t"})]


def test_the_reader_agrees_with_tarfile_on_each_format(tmp_path):
    names = ["d/000001.jpg", "d/000001.txt", "d/" + "x" * 150 + ".jpg"]
    for fmt, expected in ((tarfile.GNU_FORMAT, 3), (tarfile.PAX_FORMAT, 3)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
            for i, name in enumerate(names):
                info = tarfile.TarInfo(name)
                info.size = i + 1
                archive.addfile(info, io.BytesIO(b"v" * (i + 1)))
        got = members(buffer.getvalue())
        assert [(k + "." + e, d) for k, e, d in got] == [
            (n, b"v" * (i + 1)) for i, n in enumerate(names)][:expected]
