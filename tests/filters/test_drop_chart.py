"""Curation's drop chart: kept and dropped documents per rule and per language, in the filter dataset."""
from __future__ import annotations

from pathlib import Path

from refinery.tasks.filters import Filter, FilterConfig
from refinery.tasks.report import drop_chart
from refinery.tasks.store import Store

from tests.filters.test_filter_stage import EMAIL, GOOD, SHORT, SPAM_URL, _docs, _input


def test_the_chart_draws_the_counts_it_is_given(tmp_path):
    counts = {"docs_in": 12, "docs_out": 5,
              "dropped_by_rule": {"url": 1, "gopher_quality": 4, "input": 1, "c4": 1, "pii": 0},
              "by_language": {"en": {"docs_in": 7, "docs_out": 4}, "de": {"docs_in": 4, "docs_out": 1},
                              "fr": {"docs_in": 1, "docs_out": 0}}}
    path = tmp_path / "drops.png"
    drawn = drop_chart(counts, path, ["url", "gopher_quality", "c4", "pii"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    # kept first, then the rules in the chain's order (input last, rules that dropped nothing left out)
    assert list(drawn["rules"].items()) == [("kept", 5), ("url", 1), ("gopher_quality", 4), ("c4", 1), ("input", 1)]
    assert drawn["languages"] == {"en": {"kept": 4, "dropped": 3}, "de": {"kept": 1, "dropped": 3},
                                  "fr": {"kept": 0, "dropped": 1}}
    # many languages: the smallest share one bar
    drawn = drop_chart(counts, path, max_languages=2)
    assert drawn["languages"]["other (1)"] == {"kept": 0, "dropped": 1}


def test_the_filter_dataset_holds_the_chart_and_its_card_shows_it(tmp_path):
    store = Store(tmp_path / "store")
    src = _input(store, [_docs([("a", GOOD, "https://a.org/1"), ("b", SHORT, "https://a.org/2")]),
                         _docs([("c", EMAIL, "https://a.org/3"), ("d", GOOD, SPAM_URL), ("e", None, None)])])
    ds = Filter.run(store, [src], FilterConfig())
    assert ds.manifest["chart"] == "drops.png"
    chart = Path(ds.path) / "drops.png"
    assert chart.stat().st_size > 1000
    assert "drops.png" in {f["path"] for f in ds.manifest["files"]}
    assert "![drops.png](drops.png)" in (Path(ds.path) / "README.md").read_text()
    # the numbers drawn are the stage's counts: 2 kept of 5, one dropped at input, one by url
    drawn = drop_chart(ds.counts, tmp_path / "again.png", ds.manifest["config"]["rules"])
    assert drawn["rules"]["kept"] == 2 and drawn["rules"]["input"] == 1 and drawn["rules"]["url"] == 1
    assert sum(drawn["rules"].values()) == 5
    assert drawn["languages"] == {"en": {"kept": 2, "dropped": 2}}   # the corrupt one has no language
    assert (tmp_path / "again.png").read_bytes() == chart.read_bytes()
