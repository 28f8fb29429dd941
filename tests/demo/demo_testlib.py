"""Helpers of the demo-data tests (a uniquely named module: ``conftest`` is ambiguous across folders)."""
from __future__ import annotations

from pathlib import Path

N_PAGES = 120
N_FILES = 3


def read_responses(files: list[Path]) -> dict[str, dict]:
    """url -> {status, charset, content_type, body, content_length, digest_ok, file, index} of every response."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    out: dict[str, dict] = {}
    for f in files:
        with open(f, "rb") as fh:
            for i, r in enumerate(ArchiveIterator(fh, parse_http=True, record_types=WarcRecordType.response)):
                digest_ok = r.verify_payload_digest(consume=False)
                body = r.reader.read()
                out[r.headers["WARC-Target-URI"]] = {
                    "status": r.http_headers.status_code, "charset": r.http_charset,
                    "content_type": r.http_content_type, "body": body,
                    "http_length": int(r.http_headers.get("Content-Length")), "digest_ok": digest_ok,
                    "file": f.name, "index": i,
                }
    return out
