"""The demo crawl: real WARC files, deterministic, with every planted item where ground truth says."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from html import escape
from pathlib import Path

import pytest
from demo_testlib import N_FILES, N_PAGES, gzip_members

from refinery.tasks.demo import texts as T
from refinery.tasks.demo.crawl import BASE_DATE, MIN_PAGES, make_demo_crawl

ROOT = Path(__file__).resolve().parents[2]
UUID_ID = re.compile(r"^<urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}>$")


def _digest_dir(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _shingles(text: str, n: int = 5) -> set:
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def test_byte_identical_across_runs_and_processes(demo_crawl, tmp_path):
    files, _ = demo_crawl
    first = _digest_dir(files[0].parent)
    assert set(first) == {f.name for f in files} | {"ground_truth.json"}

    again = make_demo_crawl(tmp_path / "again", seed=0, n_pages=N_PAGES, n_files=N_FILES)
    assert [p.name for p in again] == [p.name for p in files]
    assert _digest_dir(tmp_path / "again") == first

    # The subprocess imports what a flow run imports first: the prose must not depend on it.
    code = ("import sys, prefect, torch, transformers; from refinery.tasks.demo.crawl import make_demo_crawl; "
            f"make_demo_crawl(sys.argv[1], seed=0, n_pages={N_PAGES}, n_files={N_FILES})")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "proc")], cwd=ROOT, env=env, check=True, timeout=120)
    assert _digest_dir(tmp_path / "proc") == first

    make_demo_crawl(tmp_path / "seed1", seed=1, n_pages=N_PAGES, n_files=N_FILES)
    other = _digest_dir(tmp_path / "seed1")
    assert all(other[name] != digest for name, digest in first.items())


def test_regeneration_keeps_files_and_drops_stale_ones(tmp_path):
    files = make_demo_crawl(tmp_path, seed=3, n_pages=MIN_PAGES, n_files=3)
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    assert make_demo_crawl(tmp_path, seed=3, n_pages=MIN_PAGES, n_files=3) == files
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes          # identical content is not rewritten
    fewer = make_demo_crawl(tmp_path, seed=3, n_pages=MIN_PAGES, n_files=1)
    assert sorted(tmp_path.glob("*.warc.gz")) == fewer
    assert json.loads((tmp_path / "ground_truth.json").read_text())["n_files"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_invalid_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n_pages"):
        make_demo_crawl(tmp_path, n_pages=MIN_PAGES - 1)
    with pytest.raises(ValueError, match="n_files"):
        make_demo_crawl(tmp_path, n_pages=100, n_files=0)


def test_warc_structure_with_fastwarc(demo_crawl):
    from fastwarc.warc import ArchiveIterator

    files, truth = demo_crawl
    assert len(files) == N_FILES and all(f.name.endswith(".warc.gz") for f in files)
    assert truth["totals"]["response"] == N_PAGES == truth["totals"]["request"]
    assert sum(truth["kinds"].values()) == N_PAGES
    ids: set[str] = set()
    concurrent: dict[str, str] = {}
    damaged = {c["file"] for c in truth["corrupt"]}
    for f in files:
        counts: Counter = Counter()
        records = []
        with open(f, "rb") as fh:
            try:
                records.extend(ArchiveIterator(fh, parse_http=False))
            except OSError:   # the planted damaged member, the last record of its file
                assert f.name in damaged
        assert records[0].headers["WARC-Type"] == "warcinfo"
        assert records[0].headers["WARC-Filename"] == f.name
        for r in records:
            h = r.headers
            counts[h["WARC-Type"]] += 1
            assert h["WARC-Record-ID"] not in ids and UUID_ID.match(h["WARC-Record-ID"])
            ids.add(h["WARC-Record-ID"])
            assert h["WARC-Date"].startswith(BASE_DATE.strftime("%Y-%m-%d"))
            if h["WARC-Type"] == "request":
                concurrent[h["WARC-Concurrent-To"]] = h["WARC-Target-URI"]
                assert h["Content-Type"] == "application/http; msgtype=request"
            if h["WARC-Type"] == "response":
                assert h["Content-Type"] == "application/http; msgtype=response"
                assert concurrent.get(h["WARC-Record-ID"]) == h["WARC-Target-URI"]
        counts["response"] += f.name in damaged
        assert dict(counts) == truth["records"][f.name]
        assert records[0].headers.get("WARC-Date") <= records[-1].headers.get("WARC-Date")


def test_one_gzip_member_per_record(demo_crawl):
    files, truth = demo_crawl
    damaged = {c["file"] for c in truth["corrupt"]}
    for f in files:
        data = f.read_bytes()
        members, partial = gzip_members(data)
        assert (partial is not None) == (f.name in damaged)   # only the planted member is damaged
        assert all(m.startswith(b"WARC/1.1\r\n") for m in members + ([partial] if partial else []))
        assert len(members) + (partial is not None) == sum(truth["records"][f.name].values())
        for m in members:
            head, _, rest = m.partition(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            assert len(rest) == length + 4 and rest.endswith(b"\r\n\r\n")   # exact Content-Length
        assert data[4:8] == b"\x00\x00\x00\x00"                              # gzip mtime 0


def test_corrupt_record_is_visible(demo_crawl, responses):
    """The damaged record is the last of its file: its header and the first part of its block
    inflate, then the data is invalid (readers see every record before it)."""
    files, truth = demo_crawl
    (bad,) = truth["corrupt"]
    assert bad["file"] == files[-1].name and bad["kind"] == "damaged_gzip_member"
    _, partial = gzip_members(files[-1].read_bytes())
    head, _, block = partial.partition(b"\r\n\r\n")
    assert bad["url"].encode() in head and bad["record_id"].encode() in head
    assert len(block) == bad["block_bytes_present"] < bad["content_length"]
    assert bad["url"] not in responses
    good = list(responses)
    assert len(good) == truth["totals"]["complete_responses"] == N_PAGES - 1
    assert all(responses[u]["digest_ok"] and len(responses[u]["body"]) == responses[u]["http_length"] for u in good)


def test_charsets_decode(demo_crawl, responses, main_texts):
    _, truth = demo_crawl
    langs = {v["lang"] for v in truth["foreign"].values()}
    assert langs == {"de", "es", "fr", "ru", "zh"}
    for url, info in truth["foreign"].items():
        r = responses[url]
        spec = T.FOREIGN[info["lang"]]
        assert r["charset"] == spec["charset"] == info["charset"]
        html = r["body"].decode(spec["charset"])
        assert f'<meta charset="{spec["charset"]}">' in html
        title = truth["pages"][url]["title"]
        paras = dict(spec["articles"])[title]
        assert all(escape(p) in html for p in paras)
        assert paras[0] in main_texts[url]
        if spec["charset"] != "utf-8":
            with pytest.raises(UnicodeDecodeError):
                r["body"].decode("utf-8")


def test_main_text_extraction_removes_boilerplate(demo_crawl, responses, main_texts):
    _, truth = demo_crawl
    normal = [u for u, v in truth["pages"].items() if v["kind"] == "normal"]
    assert len(normal) >= N_PAGES // 2
    for url in normal:
        html = responses[url]["body"].decode("utf-8")
        text = main_texts[url]
        assert "We use cookies" in html and "All rights reserved" in html
        assert "<nav" in html or '<div id="menu">' in html
        assert "We use cookies" not in text and "All rights reserved" not in text and "Privacy Policy" not in text
        assert truth["pages"][url]["title"] in text
        assert len(text.split()) >= 80
        assert len(text) < len(html) / 2


def test_exact_and_near_duplicates(demo_crawl, responses, main_texts):
    _, truth = demo_crawl
    assert truth["exact_duplicates"] and truth["near_duplicates"]
    for group in truth["exact_duplicates"]:
        assert len(set(group)) == len(group) >= 2
        assert len({responses[u]["body"] for u in group}) == 1
        assert truth["pages"][group[0]]["kind"] == "normal"
        assert all(truth["pages"][u]["kind"] == "duplicate" for u in group[1:])
    assert {n["edit"] for n in truth["near_duplicates"]} == {"date_changed", "words_changed", "sentence_added"}
    for n in truth["near_duplicates"]:
        a, b = main_texts[n["url"]], main_texts[n["of"]]
        assert a != b
        assert 0.75 < _jaccard(a, b) < 1.0, n
        if n["edit"] == "sentence_added":
            assert n["sentence"] in a and n["sentence"] not in b
    # no unplanned near-duplicates among the ordinary pages
    plain = [u for u, v in truth["pages"].items() if v["kind"] in ("normal", "pii", "blocklisted")]
    sh = {u: _shingles(main_texts[u]) for u in plain}
    for i, a in enumerate(plain):
        for b in plain[i + 1:]:
            assert len(sh[a] & sh[b]) / len(sh[a] | sh[b]) < 0.5, (a, b)


def test_spam_pii_blocklist_and_errors(demo_crawl, responses, main_texts):
    _, truth = demo_crawl
    assert set(truth["spam"].values()) == {"keyword_list", "link_farm", "lorem_ipsum", "short", "repeated_lines",
                                          "gambling", "adult"}
    for url, kind in truth["spam"].items():
        text = main_texts[url]
        if kind == "short":
            assert len(text.split()) < 10
        if kind == "lorem_ipsum":
            assert "Lorem ipsum" in text
        if kind == "repeated_lines":
            assert Counter(text.splitlines()).most_common(1)[0][1] >= 10
        if kind == "gambling":
            assert "casino" in text.lower()
    assert len(truth["pii"]) >= 2
    for url, found in truth["pii"].items():
        text = main_texts[url]
        for values in found.values():
            assert values and all(v in text for v in values)
        assert re.search(r"[\w.]+@[\w.]+\.\w+", text) and re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", text)
    assert truth["blocklisted"]
    assert all(u.split("/")[2] in truth["blocklist_domains"] for u in truth["blocklisted"])
    assert not [u for u, v in truth["pages"].items() if u.split("/")[2] in truth["blocklist_domains"]
                and v["kind"] != "blocklisted"]
    assert set(truth["non_200"].values()) == {301, 404}
    for url, status in truth["non_200"].items():
        assert responses[url]["status"] == status
    for url, ctype in truth["non_html"].items():
        assert responses[url]["content_type"] == ctype.split(";")[0] and url.endswith("/robots.txt")
    # no personal data outside the planted pages (in the main text)
    for url, text in main_texts.items():
        if url not in truth["pii"]:
            assert not re.search(r"[\w.]+@[\w-]+\.[a-z]{2,}", text), url


def test_standard_library_prose():
    from refinery.tasks.demo.prose import stdlib_prose

    prose = stdlib_prose()
    assert len(prose) > 1000
    assert len({p.module.split(".")[0] for p in prose}) > 50
    assert len({p.text for p in prose}) == len(prose)
    for p in prose:
        assert p.text[0].isupper() and p.text.endswith(".") and ">>>" not in p.text and "{" not in p.text
