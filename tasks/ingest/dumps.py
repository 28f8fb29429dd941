"""Other sources: JSONL (optionally gzip/bz2/xz/zstd compressed) and Parquet dumps.

Each row becomes a :class:`DumpRecord` with the configured text field; rows whose text field is
missing or not a string are reported as errors (counted, skipped). Records are numbered from 1: the
line number in a JSONL file (blank lines count), the row number in a Parquet file. A Parquet file
whose text column is not a string column is rejected as a whole (every row would be an error). Other scalar fields travel to the
document's ``metadata`` (minus the text, id, url and date fields).

JSONL lines are read in bounded chunks (:func:`iter_lines`): a line longer than the record size cap
is read past, never held whole, and reported as ``too_large``. Each line is decoded as UTF-8; a line
that is not UTF-8 (a Latin-1 or GBK dump, a damaged byte) is decoded with the charset detected for
it, or, when none decodes it, as UTF-8 with U+FFFD replacement characters; the record says which
(:attr:`DumpRecord.decoded`), so the stage counts it rather than passing altered text silently.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from typing import IO, Any, Iterator


@dataclasses.dataclass
class DumpRecord:
    text: str
    url: str | None
    record_id: str | None
    date: _dt.datetime | None
    offset: int                 # line number (JSONL) or row number (Parquet), 1-based
    fields: dict
    decoded: str | None = None  # JSONL line not UTF-8: the charset that decoded it, or REPLACED


@dataclasses.dataclass
class DumpError:
    reason: str
    offset: int
    message: str


def _to_date(v: Any) -> _dt.datetime | None:
    if v is None:
        return None
    if isinstance(v, _dt.datetime):
        return v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)
    if isinstance(v, _dt.date):
        return _dt.datetime(v.year, v.month, v.day, tzinfo=_dt.timezone.utc)
    if isinstance(v, (int, float)):
        return _dt.datetime.fromtimestamp(v, tz=_dt.timezone.utc)
    try:
        d = _dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=_dt.timezone.utc)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (_dt.datetime, _dt.date)):
        return v.isoformat()
    if isinstance(v, bytes):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def _record(row: dict, offset: int, text_field: str, id_field: str | None, url_field: str | None,
            date_field: str | None, unit: str = "line") -> DumpRecord | DumpError:
    if not isinstance(row, dict):
        return DumpError("bad_record", offset, f"{unit} {offset}: not a JSON object")
    text = row.get(text_field)
    if text is None:
        return DumpError("missing_text_field", offset, f"{unit} {offset}: no field {text_field!r}")
    if not isinstance(text, str):
        return DumpError("bad_text_field", offset, f"{unit} {offset}: field {text_field!r} is {type(text).__name__}")
    url = row.get(url_field) if url_field else None
    rid = row.get(id_field) if id_field else None
    date = _to_date(row.get(date_field)) if date_field else None
    skip = {text_field, id_field, url_field, date_field}
    fields = {k: _jsonable(v) for k, v in row.items() if k not in skip}
    return DumpRecord(text, str(url) if url is not None else None, str(rid) if rid is not None else None,
                      date, offset, fields)


REPLACED = "replaced"   # DumpRecord.decoded of a line no charset decodes: invalid bytes became U+FFFD
_BOM = b"\xef\xbb\xbf"


def iter_lines(f: IO[bytes], max_bytes: int | None = None,
               chunk: int = 1 << 20) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, line)`` of a binary stream split at ``\\n``, numbered from 1. A line over
    ``max_bytes`` is ``None``: it is read past chunk by chunk, so memory stays about ``chunk +
    max_bytes`` whatever the line's length (a 100 MB line would otherwise be held, then parsed)."""
    n = 0
    parts: list[bytes] = []     # the line so far, when it spans chunks
    held = 0                    # its length
    too_long = False            # the current line went over max_bytes: its bytes are dropped
    while block := f.read(chunk):
        start = 0
        while (end := block.find(b"\n", start)) >= 0:
            n += 1
            if too_long or (max_bytes is not None and held + end - start > max_bytes):
                yield n, None
            else:
                piece = block[start:end]
                yield n, b"".join([*parts, piece]) if parts else piece
            parts, held, too_long, start = [], 0, False, end + 1
        if not too_long and start < len(block):
            parts.append(block[start:])
            held += len(block) - start
            if max_bytes is not None and held > max_bytes:
                parts, held, too_long = [], 0, True
    if too_long or parts:
        yield n + 1, None if too_long else b"".join(parts)


def decode_line(line: bytes) -> tuple[str, str | None]:
    """``(text, decoded)``: UTF-8 when the line is (``decoded`` None); UTF-8 with U+FFFD for the
    invalid bytes when it mostly is (a damaged byte: ``decoded`` = :data:`REPLACED`); else the
    charset detected for this line (Latin-1, GBK ... dumps; per line, as files mix them)."""
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    replaced = line.decode("utf-8", "replace")
    bad = replaced.count("\ufffd")
    non_ascii = len(replaced) - len(replaced.encode("ascii", "ignore"))
    if non_ascii - bad > bad:
        # more valid multi-byte UTF-8 characters than broken ones: damaged UTF-8, where a detector
        # would pick a single-byte charset and turn every correct character into mojibake
        return replaced, REPLACED
    from refinery.tasks.ingest.extract import detect_charset

    charset = detect_charset(line)
    if charset and charset != "utf-8":
        try:
            return line.decode(charset), charset
        except UnicodeDecodeError:
            pass
    return replaced, REPLACED


def iter_jsonl(f: IO[bytes], text_field: str = "text", id_field: str | None = "id",
               url_field: str | None = "url", date_field: str | None = None,
               max_line_bytes: int | None = None) -> Iterator[DumpRecord | DumpError]:
    """Rows of a JSONL stream (already decompressed). A bad line is one error, not the end; a line
    over ``max_line_bytes`` is a ``too_large`` error, skipped unread."""
    for n, line in iter_lines(f, max_line_bytes):
        if line is None:
            yield DumpError("too_large", n, f"line {n} is over the {max_line_bytes}-byte limit")
            continue
        if n == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        if not line.strip():
            continue
        text, decoded = decode_line(line)
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            yield DumpError("bad_json", n, f"line {n}: {e}")
            continue
        rec = _record(row, n, text_field, id_field, url_field, date_field)
        if isinstance(rec, DumpRecord):
            rec.decoded = decoded
        yield rec


def iter_parquet(f: IO[bytes], text_field: str = "text", id_field: str | None = "id",
                 url_field: str | None = "url", date_field: str | None = None,
                 batch_size: int = 1024) -> Iterator[DumpRecord | DumpError]:
    import pyarrow.parquet as pq

    import pyarrow as pa

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"parquet file has no column {text_field!r} (columns: {names})")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise ValueError(f"parquet column {text_field!r} is {kind}, not text: no row can become a document "
                         "(set text_field to the column holding the text)")
    n = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            n += 1
            yield _record(row, n, text_field, id_field, url_field, date_field, unit="row")
