"""Reading crawl archives: WARC (``response``), WET (``conversion``) and ARC records.

Everything here yields :class:`RawRecord` (a record worth turning into a document) or
:class:`RecordError` (a corrupt/truncated record that was skipped), so the caller counts errors
and carries on with the rest of the file.

WARC/WET parsing is fastwarc 2.x (``ArchiveIterator`` over a Python file object; 2.0 removed
``GZipStream``, compression is detected from the stream). Recovery: fastwarc stops a file at the
first unparsable header (``OSError: Invalid WARC header``). We then re-synchronise: scan forward from
the last good record for the next gzip member (``1f 8b 08``, compressed files) or the next
``WARC/1.`` line (plain files), and start a fresh iterator there, so one bad record costs one record.
A record whose block is shorter than its ``Content-Length`` is reported as ``truncated`` and
skipped. ARC (the Internet Archive's pre-WARC format, v1 and v2) has its own small parser below:
fastwarc does not read ARC.

A file cut short (an interrupted download or copy) is a file error, :class:`TruncatedArchive`, not
a record error: fastwarc ends quietly at a cut inside a header or inside a record it skips (a
request), which would lose the rest of the file without a word. So once the records are read,
:func:`_unfinished_end` reads the file again from its last record to its end and checks that it
ends right after a complete record and, compressed, at the end of a complete gzip member. That
costs one record per file (a whole-file gzip, whose records do not start members: the file again).
ARC files are read as one stream, so a cut shows up as a short record or gzip's ``EOFError``.

Memory per record is bounded: with ``max_record_bytes`` a record whose block (WARC
``Content-Length``, ARC length) or decoded HTTP body is larger is skipped without being read into
memory and reported as ``too_large`` (every record type: HTML, plain text, WET conversions).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import gzip
import io
import re
import zlib
from typing import IO, Any, Iterator

GZIP_MAGIC = b"\x1f\x8b\x08"
WARC_MAGIC = b"WARC/"
ARC_MAGIC = b"filedesc://"


@dataclasses.dataclass
class RawRecord:
    """One archive record with a payload to extract text from."""

    kind: str                       # "html" (needs extraction) or "text" (WET conversion, text/plain)
    payload: bytes                  # HTTP body (dechunked, decompressed) or the conversion text
    url: str | None
    record_id: str | None
    date: _dt.datetime | None
    offset: int                     # byte offset of the record in the (compressed) file
    content_type: str | None = None
    http_charset: str | None = None  # charset from the HTTP Content-Type header
    http_status: int | None = None
    record_type: str = "response"


@dataclasses.dataclass
class RecordError:
    """A record (or a stretch of the file) that could not be read; skipped."""

    reason: str                     # "truncated", "bad_header", "bad_http", ...
    offset: int
    message: str


class NotAnArchive(ValueError):
    """The file is not a WARC/WET/ARC archive at all."""


class TruncatedArchive(ValueError):
    """The file ends inside a record or a gzip member: what followed the cut is lost, so the file
    fails as a whole (a ``ValueError``: reading it again gives the same bytes)."""


# --------------------------------------------------------------------------- helpers
_TARGET_RE = re.compile(r"^<(.*)>$")


def _clean_uri(uri: str | None) -> str | None:
    if not uri:
        return None
    uri = uri.strip()
    m = _TARGET_RE.match(uri)  # some writers (wget) wrap target URIs in <...>
    return m.group(1) if m else uri


def _utc(d: _dt.datetime | None) -> _dt.datetime | None:
    if d is None:
        return None
    if d.tzinfo is None:
        return d.replace(tzinfo=_dt.timezone.utc)
    return d.astimezone(_dt.timezone.utc)


def _is_html(content_type: str | None, payload: bytes) -> bool:
    if content_type:
        ct = content_type.split(";")[0].strip().lower()
        if ct in ("text/html", "application/xhtml+xml"):
            return True
        if ct and ct not in ("application/octet-stream", "unk", "unknown", "text/plain"):
            return False
    head = payload[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<?xml")) or b"<html" in head


def _resync(f: IO[bytes], start: int, gz: bool, chunk: int = 1 << 16) -> int | None:
    """Offset of the next record boundary strictly after ``start``, or None at end of file."""
    marker = GZIP_MAGIC if gz else WARC_MAGIC
    pos = start + 1
    f.seek(pos)
    tail = b""
    while True:
        block = f.read(chunk)
        if not block:
            return None
        data = tail + block
        i = data.find(marker)
        while i >= 0:
            at = pos - len(tail) + i
            if gz:
                return at
            # a WARC header starts a line
            if i == 0 and (at == 0 or _byte_before(f, at) in (b"\n", b"")) or i > 0 and data[i - 1:i] == b"\n":
                return at
            i = data.find(marker, i + 1)
        tail = data[-(len(marker) - 1):]
        pos += len(block)


def _byte_before(f: IO[bytes], at: int) -> bytes:
    here = f.tell()
    f.seek(at - 1)
    b = f.read(1)
    f.seek(here)
    return b


# --------------------------------------------------------------------------- WARC / WET
def iter_warc(f: IO[bytes], record_types: tuple[str, ...] = ("response", "conversion"),
              max_errors: int = 1000, max_record_bytes: int | None = None) -> Iterator[RawRecord | RecordError]:
    """Records of a WARC or WET file (gzip per record, whole-file gzip, or plain).

    ``f`` must be a seekable binary file object positioned at 0 (local file or fsspec file).
    Yields :class:`RawRecord` for ``response`` records with an HTTP payload and ``conversion``
    records (WET), :class:`RecordError` for each unreadable stretch. Raises :class:`NotAnArchive`
    when not a single record could be read, :class:`TruncatedArchive` (after the records before
    the cut) when the file is cut short.
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    head = f.read(4)
    f.seek(0)
    gz = head[:3] == GZIP_MAGIC
    wanted = 0
    for t in record_types:
        wanted |= getattr(WarcRecordType, t)
    base = 0
    last_good = -1   # offset of the last record of any type: where the check of the file's end starts
    n_records = 0
    n_errors = 0
    pending: RecordError | None = None  # one error per contiguous unreadable stretch
    while True:
        f.seek(base)
        # every record type, filtered here: the last record read must be known, whatever its type
        it = ArchiveIterator(f, record_types=WarcRecordType.any_type, parse_http=False, fsspec_args=False)
        failed_at = None
        try:
            for rec in it:
                offset = base + rec.stream_pos
                last_good = offset
                n_records += 1
                if pending is not None:
                    yield pending
                    pending = None
                if rec.record_type & wanted:
                    yield _convert_warc(rec, offset, max_record_bytes)
        except OSError as e:  # unparsable header / broken compression: skip ahead
            failed_at = e
        if failed_at is None:
            break
        where = max(last_good, base)
        nxt = _resync(f, where, gz)
        if pending is None:
            n_errors += 1
            pending = RecordError("bad_record", where,
                                  f"unreadable data after offset {where}: {failed_at}; skipped to the next record")
        if nxt is None or n_errors >= max_errors:
            break
        base = nxt
    if n_records == 0 and pending is not None:
        raise NotAnArchive(f"no readable WARC record ({pending.message})")
    if pending is not None:
        yield pending
    cut = _unfinished_end(f, (last_good, base), gz)
    if cut is not None:
        raise _cut_short(cut)


def _cut_short(where: str) -> TruncatedArchive:
    return TruncatedArchive(f"the file is cut short: it ends inside {where}, so whatever followed is lost (an "
                            "interrupted download or copy?); fetch the file again, or let "
                            "ingest.max_failed_files tolerate it")


# --------------------------------------------------------------------------- is the file complete?
_MAX_HEADER_LINE = 1 << 16   # longer is not a WARC header line: the check gives up rather than guess


class _Unaligned(Exception):
    """The check did not start at a record (e.g. a gzip member that begins inside a record)."""


class _Raw(io.RawIOBase):
    """The bytes of ``f`` from ``start`` on, as a raw stream: a BufferedReader over it has
    ``readline(limit)``, which fsspec's files lack."""

    def __init__(self, f: IO[bytes], start: int):
        f.seek(start)
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)


class _Members(_Raw):
    """The decompressed bytes of the gzip members from ``start`` on, member after member;
    ``cut`` is set when the file ends inside a member."""

    def __init__(self, f: IO[bytes], start: int, chunk: int = 1 << 16):
        super().__init__(f, start)
        self.chunk = chunk
        self.d: Any = None          # the member being inflated
        self.rest = b""             # bytes after the last member that ended
        self.cut = False

    def readinto(self, b) -> int:
        while True:
            if self.d is None:
                data, self.rest = self.rest or self.f.read(self.chunk), b""
                if not data:
                    return 0                       # the end of the file, between members
                self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                data = self.d.unconsumed_tail or self.f.read(self.chunk)
                if not data:
                    self.cut = True                # the end of the file, inside a member
                    return 0
            out = self.d.decompress(data, len(b))
            if self.d.eof:
                self.rest, self.d = self.d.unused_data, None
            if out:
                b[:len(out)] = out
                return len(out)


def _unfinished_end(f: IO[bytes], starts: tuple[int, ...], gz: bool) -> str | None:
    """What the file ends inside of (a record header, a record, a gzip member), or None when it
    ends cleanly. Read from the first of ``starts`` that begins a record (and a gzip member): the
    last record read, else where the last reading pass began."""
    for start in dict.fromkeys(s for s in starts if s >= 0):
        try:
            if not gz:
                return _record_end(io.BufferedReader(_Raw(f, start)), start)
            f.seek(start)
            if f.read(3) != GZIP_MAGIC:
                continue                           # whole-file gzip: records do not start members
            members = _Members(f, start)
            cut = _record_end(io.BufferedReader(members), start)
            return cut or (f"a gzip member after offset {start}" if members.cut else None)
        except _Unaligned:
            continue
        except zlib.error:
            return None   # damaged rather than cut: the reading pass has counted it as a bad record
    return None


def _record_end(r, start: int) -> str | None:
    """Walk the records of ``r`` (decompressed bytes from ``start``, the start of a record) by
    their Content-Length: None when the bytes end between two records, else where they end."""
    first = True
    while True:
        line = r.readline(_MAX_HEADER_LINE)
        if not line:
            return None
        if not line.strip():
            continue                               # the blank lines that close a record
        if not line.endswith(b"\n"):
            if len(line) >= _MAX_HEADER_LINE:
                return None                        # not a header: the reading pass judged these bytes
            return f"a record header after offset {start}"
        if not line.startswith(WARC_MAGIC):
            if first:
                raise _Unaligned
            return None                            # junk between records: counted as a bad record
        first = False
        length = _content_length(r)
        if length is None:
            return f"a record header after offset {start}"
        if length < 0:
            return None                            # no usable Content-Length: fastwarc's call
        if _skip(r, length) < length:
            return f"a record after offset {start} (shorter than its Content-Length of {length} bytes)"


def _content_length(r) -> int | None:
    """The Content-Length of the header being read (its lines up to the blank one); -1 when the
    header has none that parses, None when the bytes end inside the header."""
    length = -1
    while True:
        line = r.readline(_MAX_HEADER_LINE)
        if not line.endswith(b"\n") and len(line) < _MAX_HEADER_LINE:
            return None
        if not line.strip():
            return length
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                length = -1


def _too_large(rtype: str, offset: int, size: int, limit: int) -> RecordError:
    return RecordError("too_large", offset, f"{rtype} record of {size} bytes is over the {limit}-byte limit")


def _convert_warc(rec, offset: int, max_bytes: int | None = None) -> RawRecord | RecordError:
    rtype = str(rec.record_type).rsplit(".", 1)[-1]
    if max_bytes is not None and rec.content_length is not None and rec.content_length > max_bytes:
        return _too_large(rtype, offset, rec.content_length, max_bytes)  # never read: the iterator skips it
    try:
        block = rec.reader.read()
    except OSError as e:
        return RecordError("bad_record", offset, f"{rtype} record: {e}")
    declared = rec.content_length
    if declared is not None and len(block) < declared:
        return RecordError("truncated", offset,
                           f"{rtype} record has {len(block)} of its {declared} bytes (file cut short?)")
    url = _clean_uri(rec.headers.get("WARC-Target-URI"))
    rid = rec.record_id
    try:
        date = _utc(rec.record_date)
    except Exception:  # noqa: BLE001 - invalid WARC-Date (ClueWeb quirk)
        date = None
    if rtype == "conversion":
        return RawRecord("text", block, url, rid, date, offset,
                         content_type=rec.headers.get("Content-Type"), http_charset="utf-8",
                         record_type=rtype)
    status = None
    ctype = charset = None
    payload = block
    if rec.headers.get("Content-Type", "").lower().startswith("application/http") or block[:5] == b"HTTP/":
        # Our own small HTTP parser on the record block: fastwarc's parse_http on a record that the
        # iterator still owns can leave the iterator out of step when it fails (ClueWeb quirks).
        try:
            status, headers, payload = parse_http_message(block, lenient=True, max_bytes=max_bytes)
        except BodyTooLarge as e:
            return _too_large(rtype, offset, e.size, max_bytes or 0)
        except ValueError as e:
            return RecordError("bad_http", offset, f"{rtype} record: bad HTTP message: {e}")
        ctype = headers.get("content-type")
        charset = charset_from_content_type(ctype)
    else:
        ctype = rec.headers.get("Content-Type")
    if status is not None and not (200 <= status < 300):
        return RecordError("http_status", offset, f"HTTP status {status}")
    kind = "html" if _is_html(ctype, payload) else ("text" if (ctype or "").startswith("text/plain") else "other")
    return RawRecord(kind, payload, url, rid, date, offset, content_type=ctype, http_charset=charset,
                     http_status=status, record_type=rtype)


# --------------------------------------------------------------------------- ARC
_ARC_DATE = "%Y%m%d%H%M%S"
# Damaged compressed data: counted as a bad record. Other OSErrors are I/O errors: they propagate,
# so the file is read again (``sources.with_retries``) rather than silently cut short.
_ARC_DAMAGE = (gzip.BadGzipFile, zlib.error)


def iter_arc(f: IO[bytes], max_record_bytes: int | None = None) -> Iterator[RawRecord | RecordError]:
    """Records of an ARC file (v1 or v2; plain or gzip, one member per record or whole file).
    A file that ends inside a record or a gzip member raises :class:`TruncatedArchive`."""
    head = f.read(3)
    f.seek(0)
    stream: Any = gzip.GzipFile(fileobj=f) if head == GZIP_MAGIC else f
    reader = io.BufferedReader(stream) if not isinstance(stream, io.BufferedReader) else stream
    offset = 0
    first = True
    while True:
        try:
            line = reader.readline()
        except EOFError:   # gzip's word for a member cut short
            raise _cut_short(f"a gzip member after offset {offset}") from None
        except _ARC_DAMAGE as e:
            yield RecordError("bad_record", offset, f"ARC: {e}")
            return
        if not line:
            return
        offset += len(line)
        if not line.strip():
            continue
        if not line.endswith(b"\n"):
            raise _cut_short(f"a record header after offset {offset - len(line)}")
        parts = line.decode("latin-1").strip().split(" ")
        if first:
            if not parts[0].startswith("filedesc://"):
                raise NotAnArchive("not an ARC file: it does not start with a filedesc:// record")
        try:
            length = int(parts[-1])
            url, date_s, ctype = parts[0], parts[2], parts[3]
        except (ValueError, IndexError):
            yield RecordError("bad_header", offset, f"ARC: bad record header {line[:100]!r}")
            return  # no length: cannot find the next record reliably
        rec_offset = offset - len(line)
        if max_record_bytes is not None and length > max_record_bytes and not first:
            try:
                skipped = _skip(reader, length)
            except _ARC_DAMAGE as e:
                yield RecordError("bad_record", offset, f"ARC: {e}")
                return
            except EOFError:
                skipped = -1
            if skipped < length:
                raise _cut_short(f"a record of {length} bytes at offset {rec_offset}")
            offset += skipped
            yield _too_large("arc", rec_offset, length, max_record_bytes)
            continue
        try:
            body = reader.read(length)
        except _ARC_DAMAGE as e:
            yield RecordError("bad_record", offset, f"ARC: {e}")
            return
        except EOFError:
            body = b""
        offset += len(body)
        if len(body) < length:
            raise _cut_short(f"a record of {length} bytes at offset {rec_offset}")
        if first:
            first = False
            continue  # the filedesc (version block) record
        try:
            date = _dt.datetime.strptime(date_s[:14], _ARC_DATE).replace(tzinfo=_dt.timezone.utc)
        except ValueError:
            date = None
        yield _convert_arc(url, date, ctype, body, rec_offset, max_record_bytes)


def _skip(reader, n: int, chunk: int = 1 << 20) -> int:
    """Read and drop ``n`` bytes in chunks (a record too large to hold); the count actually read."""
    done = 0
    while done < n:
        block = reader.read(min(chunk, n - done))
        if not block:
            break
        done += len(block)
    return done


def _convert_arc(url: str, date, ctype: str, body: bytes, offset: int,
                 max_bytes: int | None = None) -> RawRecord | RecordError:
    status = charset = None
    payload = body
    if body[:5] == b"HTTP/":
        try:
            status, headers, payload = parse_http_message(body, max_bytes=max_bytes)
        except BodyTooLarge as e:
            return _too_large("arc", offset, e.size, max_bytes or 0)
        except ValueError as e:
            return RecordError("bad_http", offset, f"ARC record: {e}")
        ctype = headers.get("content-type", ctype)
        charset = charset_from_content_type(ctype)
        if status is not None and not (200 <= status < 300):
            return RecordError("http_status", offset, f"HTTP status {status}")
    kind = "html" if _is_html(ctype, payload) else ("text" if ctype.startswith("text/plain") else "other")
    return RawRecord(kind, payload, url, None, date, offset, content_type=ctype, http_charset=charset,
                     http_status=status, record_type="arc")


def charset_from_content_type(ctype: str | None) -> str | None:
    if not ctype:
        return None
    m = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", ctype, re.I)
    return m.group(1).lower() if m else None


class BodyTooLarge(ValueError):
    """An HTTP body that decodes to more than the record size limit (a compression bomb)."""

    def __init__(self, size: int):
        super().__init__(f"decoded body over {size} bytes")
        self.size = size


def parse_http_message(data: bytes, lenient: bool = False,
                       max_bytes: int | None = None) -> tuple[int | None, dict, bytes]:
    """(status, lower-cased headers, decoded body) of a raw HTTP response (ARC records).

    ``lenient``: a body that does not decode with its declared Content-Encoding is kept as is
    (archives that stored the decoded body but kept the header). ``max_bytes``: a body that
    decodes to more raises :class:`BodyTooLarge` (decoding stops there)."""
    sep = data.find(b"\r\n\r\n")
    n = 4
    if sep < 0:
        sep, n = data.find(b"\n\n"), 2
    if sep < 0:
        raise ValueError("no end of HTTP headers")
    lines = data[:sep].decode("latin-1").splitlines()
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise ValueError(f"bad HTTP status line {lines[0][:80]!r}") from None
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = data[sep + n:]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    enc = headers.get("content-encoding", "").lower().strip()
    if enc in ("gzip", "x-gzip", "deflate", "br"):
        try:
            body = _decode_body(body, enc, max_bytes)
        except BodyTooLarge:
            raise
        except Exception as e:  # noqa: BLE001 - zlib.error, brotli.error, ImportError
            if not lenient:
                raise ValueError(f"bad {enc} body: {e}") from None
    if max_bytes is not None and len(body) > max_bytes:
        raise BodyTooLarge(len(body))
    return status, headers, body


def _inflate(body: bytes, wbits: int, max_bytes: int | None) -> bytes:
    d = zlib.decompressobj(wbits)
    out = d.decompress(body, (max_bytes + 1) if max_bytes is not None else 0)
    if max_bytes is not None and len(out) > max_bytes:
        raise BodyTooLarge(max_bytes)
    return out


def _decode_body(body: bytes, enc: str, max_bytes: int | None = None) -> bytes:
    if enc == "br":
        import brotli  # optional; without it the body stays as is (lenient) or is an error

        out = brotli.decompress(body)
        if max_bytes is not None and len(out) > max_bytes:
            raise BodyTooLarge(len(out))
        return out
    if enc == "deflate":
        try:
            return _inflate(body, zlib.MAX_WBITS, max_bytes)
        except zlib.error:
            return _inflate(body, -zlib.MAX_WBITS, max_bytes)  # raw deflate, as some servers send
    return _inflate(body, 47, max_bytes)


def _dechunk(body: bytes) -> bytes:
    out, i = [], 0
    while i < len(body):
        j = body.find(b"\r\n", i)
        if j < 0:
            break
        try:
            size = int(body[i:j].split(b";")[0], 16)
        except ValueError:
            return body  # not really chunked
        if size == 0:
            break
        out.append(body[j + 2:j + 2 + size])
        i = j + 2 + size + 2
    return b"".join(out)
