"""Record readers, charset decoding, extraction and language id on the real shared files."""
from __future__ import annotations

import gzip
import io
import json
import re

import pytest

from refinery.tasks.ingest import IngestConfig, iter_documents
from refinery.tasks.ingest.sources import UnknownFormat


def _docs(path, cfg=None, **item):
    stats: dict = {}
    docs = list(iter_documents({"path": str(path), "source": "test", **item}, cfg or IngestConfig(), stats))
    return docs, stats


# file -> (docs_out, docs_in, record errors by reason)
EXPECTED = {
    "warcfile.warc.gz": (16, 16, {}),
    "clueweb-quirk.warc.gz": (29, 29, {}),                  # LF-only HTTP headers, bogus gzip header
    "whirlwind.warc.gz": (1, 1, {}),
    "whirlwind.warc.wet.gz": (1, 1, {}),                    # one conversion record
    "whirlwind.warc.wat.gz": (0, 0, {}),                    # metadata only
    "jwarc-cc.warc.gz": (1, 1, {}),
    "example.warc.gz": (1, 1, {}),                          # the revisit record is not a document
    "example-trunc.warc": (1, 1, {"bad_record": 1}),        # then a broken header: counted, skipped
    "example-bad-non-chunked.warc.gz": (1, 1, {}),
    "example-wrong-chunks.warc.gz": (1, 1, {}),
    "example-iana.org-chunked.warc": (1, 1, {}),            # chunked HTTP body
    "example-bad.warc.gz.bad": (1, 2, {}),                  # fastwarc reads it; 2nd response is a 3xx
    "sample-0000.warc.gz": (22, 22, {}),
    "sample-0001.warc.gz": (15, 15, {}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_warc_files(shared_data, name):
    docs, stats = _docs(shared_data / "warc" / name)
    out, din, errs = EXPECTED[name]
    assert (len(docs), stats["docs_in"], dict(stats["record_errors"])) == (out, din, errs)
    for d in docs:
        assert d["text"] and "\ufffd" not in d["text"][:2000]
        assert d["lang"] and 0.0 <= d["lang_score"] <= 1.0
        assert re.fullmatch(r"[0-9a-f]{32}", d["id"])
        assert json.loads(d["metadata"])["file"].endswith(name)
    if errs:
        assert stats["error_samples"], "record errors come with a message"


def _count(text, pred):
    return sum(1 for ch in text if pred(ch))


def _is_cjk(ch):
    return "\u4e00" <= ch <= "\u9fff"


def _is_cyrillic(ch):
    return "\u0400" <= ch <= "\u04ff"


def test_charsets_gb2312_and_windows1251(shared_data):
    docs, _ = _docs(shared_data / "warc" / "warcfile.warc.gz")
    by_url = {d["url"]: d for d in docs}
    meta = {u: json.loads(d["metadata"]) for u, d in by_url.items()}
    gbk = [u for u, m in meta.items() if m["charset"] == "gbk"]
    assert len(gbk) >= 5, meta  # pages declared gb2312/gbk decoded with the GBK superset
    for u in gbk:
        text = by_url[u]["text"]
        latin_ext = _count(text, lambda ch: "\u00c0" <= ch <= "\u024f")  # mojibake of GBK read as latin-1
        assert latin_ext == 0 and "\ufffd" not in text, (u, text[:200])
        if by_url[u]["lang"] == "zh":
            assert _count(text, _is_cjk) > 20, (u, text[:200])
    assert sum(by_url[u]["lang"] == "zh" for u in gbk) >= 4
    assert "企业公告" in by_url["http://041696.com/15477/list_6_4.html"]["text"]
    ru = by_url["http://01spb.ru/company/"]
    assert meta["http://01spb.ru/company/"]["charset"] == "cp1251"
    assert "О компании" in ru["text"] and _count(ru["text"], _is_cyrillic) > 100
    assert ru["lang"] == "ru" and ru["lang_score"] > 0.9
    zh = [d for d in docs if d["lang"] == "zh"]
    assert len(zh) >= 8


def test_clueweb_euc_jp(shared_data):
    docs, _ = _docs(shared_data / "warc" / "clueweb-quirk.warc.gz")
    assert all(d["lang"] == "ja" for d in docs)
    assert all(_count(d["text"], lambda ch: "\u3040" <= ch <= "\u30ff" or _is_cjk(ch)) > 10 for d in docs)
    assert all(d["crawl_date"] is None or d["crawl_date"].year >= 2008 for d in docs)


def test_wet_conversion_and_warc_format_filter(shared_data):
    wet = shared_data / "warc" / "whirlwind.warc.wet.gz"
    docs, stats = _docs(wet, format="wet")
    (d,) = docs
    assert json.loads(d["metadata"])["record_type"] == "conversion"
    assert d["url"] == "https://an.wikipedia.org/wiki/Escopete" and "Escopete" in d["text"]
    assert stats["format"] == "wet"
    # format=warc reads response records only: a WET file has none
    docs, _ = _docs(wet, format="warc")
    assert docs == []
    # the WARC of the same page gives the main text without the WET's navigation
    (w,) = _docs(shared_data / "warc" / "whirlwind.warc.gz")[0]
    assert w["url"] == d["url"] and w["crawl_date"] == d["crawl_date"]
    assert len(w["text"]) < len(d["text"])


def test_trafilatura_selectable(shared_data):
    docs, _ = _docs(shared_data / "warc" / "sample-0001.warc.gz", IngestConfig(extractor="trafilatura"))
    assert 10 <= len(docs) <= 15
    assert all(json.loads(d["metadata"])["extractor"] == "trafilatura" for d in docs)


def test_not_an_archive_is_a_clear_error(shared_data, tmp_path):
    with pytest.raises(UnknownFormat, match="not a WARC/WET/ARC/JSONL/Parquet file"):
        _docs(shared_data / "warc" / "LICENSE.warcio")
    bad = tmp_path / "x.warc.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate" * 10)
    with pytest.raises(UnknownFormat, match="does not decompress"):
        _docs(bad)
    with pytest.raises(UnknownFormat, match="configured as jsonl but the content is warc"):
        _docs(shared_data / "warc" / "example.warc.gz", format="jsonl")


def _arc_record(url, date, ctype, body: bytes) -> bytes:
    return f"{url} 93.184.216.34 {date} {ctype} {len(body)}\n".encode() + body + b"\n"


def make_arc(gz: bool) -> bytes:
    desc = b"1 0 Test\nURL IP-address Archive-date Content-type Archive-length\n"
    html = ("<html><head><meta http-equiv='Content-Type' content='text/html; charset=windows-1251'>"
            "<title>t</title></head><body><h1>Новости</h1><p>" + "Это тестовая страница на русском языке. " * 5 +
            "</p></body></html>").encode("cp1251")
    http = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n" + html
    recs = [_arc_record("filedesc://test.arc", "20010101000000", "text/plain", desc),
            _arc_record("http://example.ru/", "20010203040506", "text/html", http),
            _arc_record("http://example.ru/missing", "20010203040507", "text/html",
                        b"HTTP/1.0 404 Not Found\r\nContent-Type: text/html\r\n\r\n<html>gone</html>")]
    if gz:
        return b"".join(gzip.compress(r, mtime=0) for r in recs)
    return b"".join(recs)


@pytest.mark.parametrize("gz", [False, True])
def test_arc(tmp_path, gz):
    p = tmp_path / ("a.arc.gz" if gz else "a.arc")
    p.write_bytes(make_arc(gz))
    docs, stats = _docs(p)
    assert stats["format"] == "arc" and stats["dropped"] == {"http_status": 1}
    (d,) = docs
    assert d["url"] == "http://example.ru/" and "Новости" in d["text"] and d["lang"] == "ru"
    assert d["crawl_date"].isoformat() == "2001-02-03T04:05:06+00:00"


def test_jsonl_and_parquet_dumps(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"content": "The quick brown fox jumps over the lazy dog. " * 3, "id": "b1", "title": "fox"},
            {"content": "Der schnelle braune Fuchs springt über den faulen Hund. " * 3, "id": "b2"},
            {"content": "", "id": "b3"},
            {"title": "no text field"}]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    jl = tmp_path / "books.jsonl.gz"
    jl.write_bytes(gzip.compress("\n".join(lines).encode(), mtime=0))
    docs, stats = _docs(jl, text_field="content")
    assert [d["lang"] for d in docs] == ["en", "de"]
    assert stats["dropped"] == {"empty_text": 1}
    assert stats["record_errors"] == {"bad_json": 1, "missing_text_field": 1}
    assert json.loads(docs[0]["metadata"])["fields"] == {"title": "fox"}
    pqf = tmp_path / "code.data"  # no extension: the format comes from the magic bytes
    pq.write_table(pa.Table.from_pylist(rows[:3]), pqf)
    pdocs, pstats = _docs(pqf, text_field="content")
    assert pstats["format"] == "parquet"
    assert [d["id"] for d in pdocs] == [d["id"] for d in docs]  # same source + record id -> same id
    with pytest.raises(ValueError, match="no column 'body'"):
        _docs(pqf, text_field="body")


def test_langid_backends(shared_data):
    from refinery.tasks.ingest.langid import LangIdConfig, LanguageIdentifier

    for backend in ("py3langid", "fasttext"):
        lid = LanguageIdentifier(LangIdConfig(backend=backend))
        assert lid.identify("Это простое предложение на русском языке.")[0] == "ru"
        lang, score = lid.identify("This is a plain English sentence about the weather today.")
        assert lang == "en" and 0.5 < score <= 1.0
        assert lid.identify("12345 !!! ...") == ("und", 0.0)
    # accuracy floor of the default on a slice of the labelled sentences (first 20 per language)
    rows = [ln.split("\t", 1) for ln in (shared_data / "langid" / "lingua-sentences.tsv").read_text().splitlines()[1:]]
    seen: dict = {}
    sample = [r for r in rows if len(r) == 2 and seen.setdefault(r[0], []).append(1) is None and len(seen[r[0]]) <= 20]
    lid = LanguageIdentifier()
    acc = sum(lid.identify(t)[0] == lang for lang, t in sample) / len(sample)
    assert acc > 0.85, acc


def test_corrupt_member_and_garbage_are_skipped(shared_data):
    from fastwarc.warc import ArchiveIterator

    from refinery.tasks.ingest.warc import RawRecord, RecordError, iter_warc

    raw = (shared_data / "warc" / "warcfile.warc.gz").read_bytes()
    recs = [(r.stream_pos, str(r.record_type).rsplit(".", 1)[-1])
            for r in ArchiveIterator(io.BytesIO(raw), parse_http=False, fsspec_args=False)]
    i = next(k for k, (_, t) in enumerate(recs) if t == "response" and k > 3)
    start = recs[i][0]
    bad = bytearray(raw)
    for k in range(start + 200, start + 260):  # flip bytes inside one response's gzip member
        bad[k] ^= 0xFF
    out = list(iter_warc(io.BytesIO(bytes(bad))))
    errors = [r for r in out if isinstance(r, RecordError)]
    assert len(errors) == 1 and errors[0].reason == "bad_record"
    assert sum(isinstance(r, RawRecord) for r in out) == 15  # the other responses all survive
    # plain WARC with junk between two records
    plain = gzip.decompress(raw)
    j = plain.find(b"WARC/1.0", 20000)
    out = list(iter_warc(io.BytesIO(plain[:j] + b"GARBAGE\r\nmore junk\r\n\r\n" + plain[j:])))
    assert sum(isinstance(r, RawRecord) for r in out) == 16
    assert [r.reason for r in out if isinstance(r, RecordError)] == ["bad_record"]
