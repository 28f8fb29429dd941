"""Other sources: JSONL (optionally gzip/bz2/xz/zstd compressed) and Parquet dumps.

Each row becomes a :class:`DumpRecord` with the configured text field; rows whose text field is
missing or not a string are reported as errors (counted, skipped). Records are numbered from 1: the
line number in a JSONL file (blank lines count), the row number in a Parquet file. A Parquet file
whose text column is not a string column is rejected as a whole (every row would be an error). Other scalar fields travel to the
document's ``metadata`` (minus the text, id, url and date fields).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import io
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


def iter_jsonl(f: IO[bytes], text_field: str = "text", id_field: str | None = "id",
               url_field: str | None = "url", date_field: str | None = None) -> Iterator[DumpRecord | DumpError]:
    """Rows of a JSONL stream (already decompressed). A bad line is one error, not the end."""
    for n, line in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield DumpError("bad_json", n, f"line {n}: {e}")
            continue
        yield _record(row, n, text_field, id_field, url_field, date_field)


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
