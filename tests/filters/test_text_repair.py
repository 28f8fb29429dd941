"""ftfy text repair as an ingest option: mojibake of real pages fixed and counted, clean text untouched."""
from __future__ import annotations

import json

import pytest

from refinery.tasks.ingest import IngestConfig, iter_documents
from refinery.tasks.ingest.repair import repair_text
from refinery_testlib import shared_file

pytest.importorskip("ftfy")


def _real_texts(shared_data) -> list[str]:
    """German, Dutch and Russian page text from the shared WARC (accents, umlauts, Cyrillic, quotes)."""
    path = shared_file(shared_data, "warc/warcfile.warc.gz")
    docs = iter_documents({"path": str(path), "source": "t"}, IngestConfig(), {})
    return [d["text"] for d in docs if d["lang"] in ("de", "nl", "ru")]


def test_repair_undoes_mojibake_of_real_pages(shared_data):
    texts = _real_texts(shared_data)
    assert len(texts) == 4
    for t in texts:
        assert repair_text(t) == t                       # clean text is left alone
        broken = t.encode("utf-8").decode("cp1252", errors="replace") if t.isascii() else \
            t.encode("utf-8").decode("latin-1")
        if broken != t:
            assert repair_text(broken) == t
    assert repair_text("ﬁne", "off", "NFKC") == "fine"
    with pytest.raises(ValueError, match="unknown text repair"):
        repair_text("x", "nope")


def test_ingest_option_repairs_and_counts(shared_data, tmp_path):
    texts = [t for t in _real_texts(shared_data) if not t.isascii()]
    assert len(texts) >= 3
    # every other document arrives as UTF-8 bytes read as Latin-1 (the classic mojibake)
    broken = [t.encode("utf-8").decode("latin-1") if i % 2 else t for i, t in enumerate(texts)]
    dump = tmp_path / "dump.jsonl"
    dump.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(broken)),
                    encoding="utf-8")
    item = {"path": str(dump), "source": "t"}
    stats: dict = {}
    plain = [d["text"] for d in iter_documents(item, IngestConfig(), stats)]
    assert "repaired" not in stats and plain == broken          # off by default: nothing changes
    stats = {}
    fixed = [d["text"] for d in iter_documents(item, IngestConfig(repair_text="ftfy"), stats)]
    assert fixed == texts and stats["repaired"] == len(texts) // 2
