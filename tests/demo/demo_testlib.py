"""Helpers of the demo-data tests (a uniquely named module: ``conftest`` is ambiguous across folders)."""
from __future__ import annotations

import zlib
from pathlib import Path

N_PAGES = 120
N_FILES = 3


def read_responses(files: list[Path]) -> dict[str, dict]:
    """url -> {status, charset, content_type, body, content_length, digest_ok, file, index} of every response."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    out: dict[str, dict] = {}
    for f in files:
        with open(f, "rb") as fh:
            try:
                for i, r in enumerate(ArchiveIterator(fh, parse_http=True, record_types=WarcRecordType.response)):
                    digest_ok = r.verify_payload_digest(consume=False)
                    body = r.reader.read()
                    out[r.headers["WARC-Target-URI"]] = {
                        "status": r.http_headers.status_code, "charset": r.http_charset,
                        "content_type": r.http_content_type, "body": body,
                        "http_length": int(r.http_headers.get("Content-Length")), "digest_ok": digest_ok,
                        "file": f.name, "index": i,
                    }
            except OSError:   # the demo's damaged record, the last of its file: nothing follows it
                pass
    return out


def gzip_members(data: bytes) -> tuple[list[bytes], bytes | None]:
    """The decompressed gzip members of ``data`` and, when the last one is damaged, what inflates
    of it before the error (None when every member is whole)."""
    members, pos = [], 0
    while pos < len(data):
        d, out, end = zlib.decompressobj(wbits=31), [], pos
        try:
            while not d.eof and end < len(data):   # small steps: an error keeps what came before
                chunk = data[end:end + 256]
                end += len(chunk)
                out.append(d.decompress(chunk))
        except zlib.error:   # inflate the damaged member again a byte at a time: all that precedes the error
            d, out = zlib.decompressobj(wbits=31), []
            for k in range(pos, end):
                try:
                    out.append(d.decompress(data[k:k + 1]))
                except zlib.error:
                    return members, b"".join(out)
            raise
        members.append(b"".join(out))
        pos = end - len(d.unused_data)
    return members, None
