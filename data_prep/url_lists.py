"""Find the parts of a URL list and stream them in row batches.

A URL list is one file, a folder of parts or a glob of parts, each CSV, TSV, parquet or JSONL.
Columns are named with --url-col/--caption-col, or recognised among the names LAION, COYO,
DataComp and the Conceptual Captions lists use. Parts are read a batch at a time, so memory
does not grow with the size of a part.
"""
from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vlp.pipeline.data.errors import UserError

# pyarrow is imported where it is used: `vlp` imports this module for its constants on every
# command.

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
DELIMITERS = {"csv": ",", "tsv": "\t"}
URL_NAMES = ("url", "URL", "image_url", "img_url")
CAPTION_NAMES = ("caption", "TEXT", "text", "alt_text", "alt")
BATCH_ROWS = 1 << 16
CSV_BLOCK_BYTES = 8 << 20


@dataclass(frozen=True)
class Columns:
    """The list's url and caption columns, and the columns carried into the shards as they are."""

    url: str
    caption: str
    extra: tuple[str, ...] = ()

    @property
    def all(self) -> list[str]:
        return [self.url, self.caption, *self.extra]


def list_parts(source, input_format: str | None = None) -> list[Path]:
    """The part files of a file, folder or glob, sorted; `input_format` keeps one format."""
    text = str(source)
    if any(ch in text for ch in "*?["):
        candidates = [Path(p) for p in glob.glob(text)]
    elif Path(text).is_dir():
        candidates = list(Path(text).iterdir())
    elif Path(text).is_file():
        candidates = [Path(text)]
    else:
        raise UserError(f"URL list {text} not found (give a file, a folder of parts or a glob)")
    parts = sorted(p for p in candidates if p.is_file() and _format(p) is not None
                   and (input_format is None or _format(p) == input_format))
    if not parts:
        wanted = [input_format] if input_format else sorted(set(FORMATS.values()))
        raise UserError(f"URL list {text}: no part in the formats {wanted} (names ending "
                        f"{', '.join(FORMATS)})")
    return parts


def _format(path: Path) -> str | None:
    return FORMATS.get(path.suffix.lower())


def _column_names(path: Path) -> list[str]:
    """The column names of a part, read from its header (parquet schema, CSV header, first
    JSON record)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = _format(path)
    try:
        if kind == "parquet":
            return pq.read_schema(path).names
        return next(_batches(path, None), pa.table({})).schema.names
    except (pa.ArrowInvalid, OSError) as exc:  # not the format it is named after, or unreadable
        raise UserError(f"URL list {path} cannot be read as {kind}: {exc}") from exc


def find_columns(path: Path, url_col: str | None, caption_col: str | None,
                 extra: tuple[str, ...] = ()) -> Columns:
    """The columns of a part: those named, else the first recognised; a missing one is an
    error that names the flag that sets it."""
    names = _column_names(path)
    chosen = []
    for given, known, flag in ((url_col, URL_NAMES, "--url-col"),
                               (caption_col, CAPTION_NAMES, "--caption-col")):
        found = [given] if given else [n for n in known if n in names][:1]
        if not found or found[0] not in names:
            wanted = repr(given) if given else f"any of {list(known)}"
            raise UserError(f"URL list {path} has no column {wanted} (it has {names}); name the "
                            f"right one with {flag}")
        chosen += found
    missing = [n for n in extra if n not in names]
    if missing:
        raise UserError(f"URL list {path} has no column {missing} to save (it has {names})")
    return Columns(chosen[0], chosen[1], tuple(extra))


def iter_batches(path: Path, columns: Columns) -> Iterator:
    """The part's rows as pyarrow RecordBatches of about `BATCH_ROWS`, with `columns.all` in
    that order. CSV url and caption cells come as bytes, so that text that is not UTF-8 is
    counted instead of failing."""
    import pyarrow as pa

    try:
        for batch in _batches(path, columns):
            yield pa.RecordBatch.from_arrays([batch.column(n) for n in columns.all], columns.all)
    except (pa.ArrowInvalid, KeyError) as exc:  # a part without the columns, or broken
        raise UserError(f"URL list {path} cannot be read as {_format(path)}: {exc}") from exc


def _batches(path: Path, columns: Columns | None) -> Iterator:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    kind = _format(path)
    if kind == "parquet":
        yield from pq.ParquetFile(path).iter_batches(BATCH_ROWS, columns=columns and columns.all)
    elif kind == "jsonl":
        yield from pa_json.open_json(path, read_options=pa_json.ReadOptions(CSV_BLOCK_BYTES))
    else:
        types = {n: pa.binary() for n in (columns.url, columns.caption)} if columns else {}
        yield from pa_csv.open_csv(
            path, read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=pa_csv.ParseOptions(delimiter=DELIMITERS[kind]),
            convert_options=pa_csv.ConvertOptions(column_types=types,
                                                  include_columns=columns and columns.all))
