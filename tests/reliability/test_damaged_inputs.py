"""Damaged crawl files and dump records are caught, never passed on quietly: an archive cut short
(inside a record it skips, inside a header) fails as a file, by name, under ``max_failed_files``;
JSONL lines that are not UTF-8 are decoded with their charset or counted; a huge JSONL line is
dropped without being held in memory."""
from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import pytest

from refinery_testlib import shared_file
from refinery.tasks.ingest import Ingest, IngestConfig, InputSpec, iter_documents
from refinery.tasks.ingest.warc import TruncatedArchive
from refinery.tasks.runtime import ShardsFailed
from refinery.tasks.store import Store

PAGE = ("<html><body><h1>Page {n}</h1><p>" + "This page is long enough to be kept as a document of its own. " * 4 +
        "</p></body></html>")


def _docs(path, cfg=None):
    stats: dict = {}
    docs = list(iter_documents({"path": str(path), "source": "test"}, cfg or IngestConfig(), stats))
    return docs, stats


# --------------------------------------------------------------------------- WARC files cut short
def _warc_record(kind: str, url: str, block: bytes) -> bytes:
    head = (f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Record-ID: <urn:uuid:{kind}-{url}>\r\n"
            f"WARC-Date: 2024-05-01T00:00:00Z\r\nWARC-Target-URI: {url}\r\n"
            f"Content-Type: application/http; msgtype={kind}\r\nContent-Length: {len(block)}\r\n\r\n").encode()
    return head + block + b"\r\n\r\n"


def crawl(pages: int = 3) -> list[bytes]:
    """A crawl's records as a crawler writes them: a request, then its response, per page."""
    out = []
    for n in range(pages):
        url = f"http://site.example/{n}"
        out.append(_warc_record("request", url, f"GET /{n} HTTP/1.1\r\nHost: site.example\r\n"
                                                f"User-Agent: test-crawler/1.0\r\n\r\n".encode()))
        body = PAGE.format(n=n).encode()
        out.append(_warc_record("response", url, b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + body))
    return out


def _shortest_prefix(member: bytes, inflated: int) -> int:
    """Bytes of a gzip member it takes to inflate to more than ``inflated`` bytes (a cut there
    ends the data just past that point)."""
    return next(n for n in range(len(member)) if len(zlib.decompressobj(31).decompress(member[:n])) > inflated)


def cut_file(records: list[bytes], gz: bool, index: int, keep: int) -> bytes:
    """The records (a gzip member each when ``gz``), cut so that record ``index`` ends after
    about ``keep`` of its bytes."""
    chunks = [gzip.compress(r, compresslevel=6, mtime=0) for r in records] if gz else records
    whole = b"".join(chunks)
    start = sum(len(c) for c in chunks[:index])
    return whole[:start + (_shortest_prefix(chunks[index], keep) if gz else keep)]


def cut_point(records: list[bytes], where: str) -> tuple[int, int]:
    """(record to cut, bytes of it to keep) for a cut inside the second request's block, or
    inside the second response's WARC header: fastwarc used to stop at either without a word."""
    if where == "inside_a_request":
        return 2, records[2].index(b"\r\n\r\n") + 4 + 10
    return 3, 40


@pytest.mark.parametrize("gz", [True, False], ids=["warc.gz", "warc"])
@pytest.mark.parametrize("where", ["inside_a_request", "inside_a_response_header"])
def test_an_archive_cut_short_fails_as_a_file(tmp_path, gz, where):
    records = crawl()
    p = tmp_path / f"cut.{'warc.gz' if gz else 'warc'}"
    p.write_bytes(cut_file(records, gz, *cut_point(records, where)))
    with pytest.raises(TruncatedArchive, match="cut short.*fetch the file again"):
        _docs(p)


def _whole_file_gzip(records: list[bytes]) -> bytes:
    return gzip.compress(b"".join(records), mtime=0)


def test_a_whole_file_gzip_cut_short_fails_as_a_file(tmp_path):
    """One gzip member for the whole file (records do not start members): the end is checked by
    reading the file again."""
    p = tmp_path / "one-member.warc.gz"
    p.write_bytes(_whole_file_gzip(crawl())[:-200])
    with pytest.raises(TruncatedArchive, match="cut short"):
        _docs(p)


@pytest.mark.parametrize("layout", ["warc.gz", "warc", "one-member.warc.gz"])
def test_a_complete_archive_is_not_taken_for_a_cut_one(tmp_path, layout):
    records = crawl()
    data = {"warc.gz": b"".join(gzip.compress(r, mtime=0) for r in records), "warc": b"".join(records),
            "one-member.warc.gz": _whole_file_gzip(records)}[layout]
    p = tmp_path / f"whole.{layout}"
    p.write_bytes(data)
    docs, stats = _docs(p)
    assert len(docs) == 3 and stats["record_errors"] == {}


def test_real_clipped_file_fails(shared_data):
    """The shared clipped.warc.gz (a real response cut mid-HTML) is a file error now, not a record
    error in a file that passes."""
    with pytest.raises(TruncatedArchive, match="cut short"):
        _docs(shared_file(shared_data, "warc/clipped.warc.gz"))


@pytest.mark.parametrize("gz", [False, True], ids=["arc", "arc.gz"])
def test_an_arc_file_cut_short_fails_as_a_file(tmp_path, gz):
    def arc(url: str, body: bytes) -> bytes:
        return f"{url} 1.2.3.4 20010203040506 text/html {len(body)}\n".encode() + body + b"\n"

    desc = b"1 0 Test\nURL IP-address Archive-date Content-type Archive-length\n"
    recs = [arc("filedesc://a.arc", desc)] + [
        arc(f"http://site.example/{n}", b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n" + PAGE.format(n=n).encode())
        for n in range(2)]
    chunks = [gzip.compress(r, mtime=0) for r in recs] if gz else recs
    p = tmp_path / ("a.arc.gz" if gz else "a.arc")
    p.write_bytes(b"".join(chunks))
    assert len(_docs(p)[0]) == 2
    p.write_bytes(b"".join(chunks)[:-40])
    with pytest.raises(TruncatedArchive, match="cut short"):
        _docs(p)


# --------------------------------------------------------------------------- JSONL encodings
LATIN1 = "Le garçon a mangé des crêpes près de l'église; très bon, à bientôt."
DAMAGED = "Größe und Qualität überzeugen, schöne Grüße aus München."


def mixed_jsonl() -> bytes:
    """UTF-8, a Latin-1 line, and a UTF-8 line with one byte broken (as a bad copy leaves it)."""
    good = json.dumps({"id": "u", "text": "A plain UTF-8 line about the weather in Zürich today."}, ensure_ascii=False)
    latin = json.dumps({"id": "l", "text": LATIN1}, ensure_ascii=False).encode("latin-1")
    damaged = json.dumps({"id": "d", "text": DAMAGED}, ensure_ascii=False).encode()
    damaged = damaged.replace("ß".encode(), b"\xdf", 1)          # a lone Latin-1 byte in UTF-8 text
    return good.encode() + b"\n" + latin + b"\n" + damaged + b"\n"


def test_jsonl_that_is_not_utf8_is_decoded_or_counted(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(mixed_jsonl())
    docs, stats = _docs(p)
    by_id = {json.loads(d["metadata"]).get("row"): d for d in docs}
    assert len(docs) == 3
    assert by_id[2]["text"] == LATIN1                                   # decoded with its charset
    assert "\ufffd" in by_id[3]["text"] and "München" in by_id[3]["text"]  # kept, marked, counted
    assert sum(stats["decoded_as"].values()) == 1 and stats["decode_errors"] == 1
    assert json.loads(by_id[3]["metadata"])["decoded"] == "replaced"


# --------------------------------------------------------------------------- a huge JSONL line
def test_a_huge_jsonl_line_is_dropped_without_being_held(tmp_path):
    cap = 100_000
    line = json.dumps({"id": "big", "text": "x" * 20_000_000})      # 20 MB on one line
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "A short first document."}) + "\n" + line + "\n" +
                 json.dumps({"id": "b", "text": "A short last document."}) + "\n")
    del line
    cfg = IngestConfig(max_record_bytes=cap)
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "A document that loads the language model first."}) + "\n")
    _docs(small, cfg)
    tracemalloc.start()
    try:
        docs, stats = _docs(p, cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [json.loads(d["metadata"])["row"] for d in docs] == [1, 3]
    assert stats["dropped"] == {"too_large": 1} and stats["docs_in"] == 3
    assert peak < 5_000_000, f"peak Python allocation {peak} bytes: the 20 MB line was held"


# --------------------------------------------------------------------------- the stage: named, counted, tolerated
def test_the_stage_names_counts_and_tolerates_damaged_files(tmp_path):
    records = crawl()
    good = tmp_path / "good.warc.gz"
    good.write_bytes(b"".join(gzip.compress(r, mtime=0) for r in records))
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(cut_file(records, True, *cut_point(records, "inside_a_request")))
    dump = tmp_path / "mixed.jsonl"
    dump.write_bytes(mixed_jsonl())
    specs = [InputSpec(path=str(p), source="s") for p in (good, cut, dump)]
    with pytest.raises(ShardsFailed, match=r"(?s)1 input file\(s\) failed.*cut\.warc\.gz.*cut short"):
        Ingest.run(Store(tmp_path / "strict"), [], IngestConfig(inputs=specs))
    ds = Ingest.run(Store(tmp_path / "store"), [], IngestConfig(inputs=specs, max_failed_files=1))
    c = ds.counts
    assert (c["files"], c["files_failed"], c["docs_out"]) == (3, 1, 6)       # nothing of the cut file
    assert [e["file"] for e in ds.manifest["file_errors"]] == [str(cut)]
    assert "TruncatedArchive" in ds.manifest["file_errors"][0]["error"]
    assert sum(c["decoded_as"].values()) == 1 and c["decode_errors"] == 1
    per_file = {f["file"]: f for f in ds.manifest["stats"]["per_file"]}
    assert per_file[str(dump)]["decode_errors"] == 1 and per_file[str(good)]["decode_errors"] == 0
