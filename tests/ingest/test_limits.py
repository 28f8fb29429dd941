"""Bounded input handling: record size caps for every record type, no file bytes in errors,
1-based record numbers, schema problems fail the file, credentials refused in configs."""
from __future__ import annotations

import gzip
import json
import tracemalloc

import pytest
from pydantic import ValidationError

from refinery.tasks.ingest import Ingest, IngestConfig, InputSpec, iter_documents
from refinery.tasks.ingest.sources import UnknownFormat
from refinery.tasks.runtime import ShardsFailed
from refinery.tasks.store import Store

CAP = 100_000


def _docs(path, cfg=None, **item):
    stats: dict = {}
    docs = list(iter_documents({"path": str(path), "source": "test", **item}, cfg or IngestConfig(), stats))
    return docs, stats


def warc_record(url: str, ctype: str, body: bytes, headers: str = "") -> bytes:
    """One WARC response record (HTTP message in its block), gzip-compressed on its own."""
    http = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n{headers}\r\n".encode() + body
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:{abs(hash(url)):032x}>\r\n"
            f"WARC-Date: 2024-05-01T00:00:00Z\r\nWARC-Target-URI: {url}\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http)}\r\n\r\n").encode()
    return gzip.compress(head + http + b"\r\n\r\n", compresslevel=1, mtime=0)


PAGE = b"<html><body><p>" + b"A small page that is kept because it is well under the limit. " * 5 + b"</p></body></html>"


def test_large_plain_text_record_is_skipped_unread(tmp_path):
    big = b"plain text line that repeats until the record is far over the cap\n" * 300_000   # ~20 MB
    p = tmp_path / "big.warc.gz"
    p.write_bytes(warc_record("http://big.example/", "text/plain", big) +
                  warc_record("http://small.example/", "text/html", PAGE) +
                  warc_record("http://text.example/", "text/plain", b"A short plain text document. " * 10))
    cfg = IngestConfig(max_record_bytes=CAP)
    small = tmp_path / "small.warc.gz"
    small.write_bytes(warc_record("http://small.example/", "text/html", PAGE))
    _docs(small, cfg)                       # load the extractor and language models first
    tracemalloc.start()
    docs, stats = _docs(p, cfg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [d["url"] for d in docs] == ["http://small.example/", "http://text.example/"]
    assert stats["dropped"] == {"too_large": 1} and stats["docs_in"] == 3
    assert peak < 5_000_000, f"peak Python allocation {peak} bytes: the large record was read into memory"
    # without a tight cap the same record is a document, and memory grows with it
    tracemalloc.start()
    docs, stats = _docs(p, IngestConfig(max_record_bytes=30_000_000))
    _, uncapped = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(docs) == 3 and "too_large" not in stats["dropped"] and uncapped > 20_000_000


def test_compression_bomb_body_is_too_large(tmp_path):
    bomb = gzip.compress(b"<html><body>" + b"x" * 5_000_000 + b"</body></html>")   # ~5 KB -> 5 MB
    p = tmp_path / "bomb.warc.gz"
    p.write_bytes(warc_record("http://bomb.example/", "text/html", bomb, "Content-Encoding: gzip\r\n") +
                  warc_record("http://small.example/", "text/html", PAGE))
    docs, stats = _docs(p, IngestConfig(max_record_bytes=CAP))
    assert [d["url"] for d in docs] == ["http://small.example/"]
    assert stats["dropped"] == {"too_large": 1}


def test_large_arc_record_and_dump_row_are_too_large(tmp_path):
    def arc(url, body):
        return f"{url} 1.2.3.4 20010203040506 text/plain {len(body)}\n".encode() + body + b"\n"

    desc = b"1 0 Test\nURL IP-address Archive-date Content-type Archive-length\n"
    p = tmp_path / "a.arc"
    p.write_bytes(arc("filedesc://a.arc", desc) + arc("http://big/", b"y" * 300_000) +
                  arc("http://small/", b"A short plain text document in an ARC file. " * 5))
    docs, stats = _docs(p, IngestConfig(max_record_bytes=CAP))
    assert [d["url"] for d in docs] == ["http://small/"] and stats["dropped"] == {"too_large": 1}

    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "z " * 100_000}) + "\n" + json.dumps({"text": "short enough text"}) + "\n")
    docs, stats = _docs(j, IngestConfig(max_record_bytes=CAP))
    assert len(docs) == 1 and stats["dropped"] == {"too_large": 1}


def test_sniff_errors_do_not_echo_file_bytes(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"SECRET-TOKEN-abc123 this is not an archive\n" * 3)
    with pytest.raises(UnknownFormat) as e:
        _docs(p)
    assert "notes.txt" in str(e.value) and "SECRET" not in str(e.value) and "abc123" not in str(e.value)
    b = tmp_path / "blob.bin"
    b.write_bytes(b"\x00\x01PRIVATE\xff" * 10)
    with pytest.raises(UnknownFormat) as e:
        _docs(b)
    assert "PRIVATE" not in str(e.value) and "binary" in str(e.value)
    g = tmp_path / "x.warc.gz"
    g.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate" * 10)
    with pytest.raises(UnknownFormat, match="looks gzip-compressed") as e:
        _docs(g)
    assert "garbage" not in str(e.value)


def test_records_are_numbered_from_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "first document text"}) + "\n{not json\n\n" + json.dumps({"txt": "x"}) + "\n")
    docs, stats = _docs(j)
    assert json.loads(docs[0]["metadata"])["row"] == 1
    assert stats["error_samples"][0].startswith("@2: line 2:")
    assert stats["error_samples"][1].startswith("@4: line 4: no field 'text'")   # blank line 3 counts
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one document", None, "three documents"]}), p)
    docs, stats = _docs(p)
    assert [json.loads(d["metadata"])["row"] for d in docs] == [1, 3]
    assert stats["error_samples"] == ["@2: row 2: no field 'text'"]


def test_rows_without_a_text_column_fail_the_stage(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "id": ["a", "b", "c"]}), p)
    with pytest.raises(ValueError, match="column 'text' is int64, not text"):
        _docs(p)
    j = tmp_path / "ints.jsonl"
    j.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(4)))
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"text": "a real document"}) + "\n")
    cfg = IngestConfig(inputs=[InputSpec(path=str(x), source="s") for x in (p, j, ok)])
    with pytest.raises(ShardsFailed) as e:
        Ingest.run(Store(tmp_path / "w"), [], cfg)
    msg = str(e.value)
    assert "2 input file(s) failed" in msg and "ints.parquet" in msg and "int64" in msg
    assert "ints.jsonl" in msg and "none has a text field 'text'" in msg and "bad_text_field=4" in msg


@pytest.mark.parametrize("opts", [
    {"key": "AKIAIOSFODNN7EXAMPLE", "secret": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},
    {"client_kwargs": {"endpoint_url": "http://minio:9000", "aws_secret_access_key": "wJalrXUtnFEMI"}},
    {"token": "ghp_abcdef"}, {"password": "hunter2"}, {"headers": {"Authorization": "Bearer abc.def"}},
    {"profile_name": "AKIAIOSFODNN7EXAMPLE"},
])
def test_credentials_in_storage_options_are_refused(opts):
    with pytest.raises(ValidationError) as e:
        IngestConfig(storage_options=opts)
    msg = str(e.value)
    assert "environment" in msg and "AWS_" in msg
    for secret in ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "ghp_abcdef", "hunter2", "abc.def"):
        assert secret not in msg


def test_harmless_storage_options_and_password_urls():
    IngestConfig(storage_options={"client_kwargs": {"endpoint_url": "http://minio:9000"}, "anon": False,
                                  "use_ssl": True, "config_kwargs": {"retries": {"max_attempts": 10}}})
    with pytest.raises(ValidationError, match="password") as e:
        InputSpec(path="https://bob:hunter2@example.org/crawl.warc.gz", source="x")
    assert "hunter2" not in str(e.value)
    InputSpec(path="s3://bucket/crawl/*.warc.gz", source="x")
    InputSpec(path="https://example.org/a@b.warc.gz", source="x")
