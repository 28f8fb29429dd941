"""Fixtures of the demo-data tests: one generated crawl per session and its extracted documents."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo_testlib import N_FILES, N_PAGES, read_responses


@pytest.fixture(scope="session")
def demo_crawl(tmp_path_factory) -> tuple[list[Path], dict]:
    from refinery.tasks.demo.crawl import make_demo_crawl

    out = tmp_path_factory.mktemp("demo_crawl")
    files = make_demo_crawl(out, seed=0, n_pages=N_PAGES, n_files=N_FILES)
    truth = json.loads((out / "ground_truth.json").read_text(encoding="utf-8"))
    return files, truth


@pytest.fixture(scope="session")
def responses(demo_crawl) -> dict[str, dict]:
    return read_responses(demo_crawl[0])


@pytest.fixture(scope="session")
def main_texts(responses) -> dict[str, str]:
    """url -> resiliparse main-content text of every complete HTML 200 response."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str

    out = {}
    for url, r in sorted(responses.items()):
        if r["status"] == 200 and r["content_type"] == "text/html" and r["digest_ok"]:
            out[url] = extract_plain_text(bytes_to_str(r["body"], r["charset"] or "utf-8"), main_content=True)
    return out


@pytest.fixture(scope="session")
def curated_docs(main_texts, demo_crawl) -> list[dict]:
    """What a curation run would keep: English non-spam pages, one per duplicate group."""
    truth = demo_crawl[1]
    drop = {"spam", "foreign", "duplicate", "near_duplicate", "blocklisted"}
    return [{"id": str(i), "url": u, "text": t} for i, (u, t) in enumerate(sorted(main_texts.items()))
            if truth["pages"][u]["kind"] not in drop]
