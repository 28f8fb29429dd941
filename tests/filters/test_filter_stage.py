"""The sharded filter stage: outputs, exclusions, counts, caching, determinism, bad input."""
from __future__ import annotations

import pyarrow as pa
import pytest

from refinery.tasks.filters import Filter, FilterConfig, read_exclusions, table_rows
from refinery.tasks.store import Store

from tests.filters.test_filter_rules import PROSE

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("url", pa.string()), ("source", pa.string()),
                    ("crawl_date", pa.timestamp("s")), ("lang", pa.string()), ("lang_score", pa.float64()),
                    ("metadata", pa.string())])


def _docs(rows: list[tuple[str, str | None, str | None]]):
    n = len(rows)
    return pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows], "url": [r[2] for r in rows],
                     "source": ["test"] * n, "crawl_date": [None] * n, "lang": ["en"] * n,
                     "lang_score": [0.99] * n, "metadata": ["{}"] * n}, schema=SCHEMA)


def _input(store: Store, parts: list[pa.Table]):
    b = store.builder("docs", "input0123456789a")
    for i, t in enumerate(parts):
        b.write_table(f"part-{i:05d}.parquet", t)
    return b.publish(version="1", config={}, inputs=[], counts={"docs": sum(t.num_rows for t in parts)})


def read_exec_log(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


GOOD = PROSE
EMAIL = PROSE + " Contact jane.doe@mail.example.com for details."
SHORT = "Too short. Really."
SPAM_URL = "https://example.org/free-porn-videos"


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


def test_stage_outputs_exclusions_and_counts(store, exec_log):
    src = _input(store, [_docs([("a", GOOD, "https://a.org/1"), ("b", SHORT, "https://a.org/2")]),
                         _docs([("c", EMAIL, "https://a.org/3"), ("d", GOOD, SPAM_URL), ("e", None, None)])])
    ds = Filter.run(store, [src], FilterConfig())
    kept = ds.read_table()
    assert kept.schema.remove_metadata() == src.read_table().schema.remove_metadata()   # same document schema
    assert kept.column("id").to_pylist() == ["a", "c"]
    assert "jane.doe" not in kept.column("text")[1].as_py()   # PII redacted in the output
    assert len(ds.files) == 2                               # one part per input part
    paths = [f["path"] for f in ds.manifest["files"]]
    assert [p for p in paths if p.startswith("excluded/")] == ["excluded/excluded-00000.parquet",
                                                               "excluded/excluded-00001.parquet"]
    ex = read_exclusions(ds)
    got = {r["id"]: (r["reason"], r["rule"]) for r in ex.to_pylist()}
    assert got["b"][0].startswith("gopher_quality:") or got["b"][0].startswith("gopher_repetition:")
    assert got["d"] == ("url:hard_blacklisted", "url")
    assert got["e"] == ("input:corrupt", "input")
    c = ds.counts
    assert (c["docs_in"], c["docs_out"], c["dropped"], c["corrupt"], c["modified"]) == (5, 2, 3, 1, 1)
    assert c["dropped_by_rule"]["url"] == 1 and c["dropped_by_reason"]["url:hard_blacklisted"] == 1
    assert c["rules"]["pii"]["emails"] == 1
    rows = table_rows(c, ds.manifest["config"]["rules"])
    assert rows[-1] == {"rule": "total", "reason": "kept", "dropped": 2, "pct_of_input": 40.0}
    assert ds.manifest["stats"]["table"] == rows
    # shards + reduce ran once; a second run is a cache hit
    assert len(read_exec_log(exec_log)) == 3
    again = Filter.run(store, [src], FilterConfig())
    assert again.path == ds.path and len(read_exec_log(exec_log)) == 3


def test_stage_config_changes_fingerprint_and_is_deterministic(tmp_path):
    rows = [(str(i), GOOD if i % 2 else SHORT, f"https://a.org/{i}") for i in range(10)]
    paths = []
    for k in range(2):
        store = Store(tmp_path / f"s{k}")
        src = _input(store, [_docs(rows)])
        ds = Filter.run(store, [src], FilterConfig())
        paths.append(ds)
    a, b = paths
    assert a.fingerprint == b.fingerprint
    assert [f["sha256"] for f in a.manifest["files"]] == [f["sha256"] for f in b.manifest["files"]]
    store = Store(tmp_path / "s0")
    other = Filter.run(store, [a.manifest["inputs"][0]["path"]], FilterConfig(rules=["gopher_quality"]))
    assert other.fingerprint != a.fingerprint


def test_stage_without_exclusions(store):
    src = _input(store, [_docs([("a", GOOD, None), ("b", SHORT, None)])])
    ds = Filter.run(store, [src], FilterConfig(write_exclusions=False))
    assert not any(f["path"].startswith("excluded") for f in ds.manifest["files"])
    assert read_exclusions(ds).num_rows == 0
    assert ds.counts["dropped"] == 1


def test_shard_that_keeps_nothing_writes_no_part(store, exec_log, monkeypatch):
    """An input part whose documents are all dropped (or that drops none) writes no empty table,
    is still counted, and a rerun after a crash in the reduce step does not redo its shard."""
    src = _input(store, [_docs([("a", SHORT, None), ("b", None, None)]), _docs([("c", GOOD, None)])])
    ds = Filter.run(store, [src], FilterConfig())
    paths = [f["path"] for f in ds.manifest["files"]]
    assert [p for p in paths if p.startswith("part-")] == ["part-00001.train.parquet"]
    assert [p for p in paths if p.startswith("excluded/")] == ["excluded/excluded-00000.parquet"]
    assert all(f["rows"] for f in ds.manifest["files"] if f["rows"] is not None)
    assert ds.read_table().column("id").to_pylist() == ["c"]
    assert (ds.counts["docs_in"], ds.counts["docs_out"]) == (3, 1)

    class Crash(Exception):
        pass

    def crash(*args):
        raise Crash()

    cfg = FilterConfig(rules=["gopher_quality"])
    with monkeypatch.context() as m:
        m.setattr(Filter.obj, "reduce", staticmethod(crash))
        with pytest.raises(Crash):
            Filter.run(store, [src], cfg)
    before = len(read_exec_log(exec_log))
    again = Filter.run(store, [src], cfg)
    assert read_exec_log(exec_log)[before:] == [f"filter {again.fingerprint}"]   # only the reduce step
    assert again.counts["docs_out"] == 1 and len(again.files) == 1


def test_list_file_contents_are_part_of_the_fingerprint(store, tmp_path):
    src = _input(store, [_docs([("a", GOOD, None)])])
    lst = tmp_path / "domains.txt"
    lst.write_text("a.org\n")
    cfg = FilterConfig(url={"domains_files": [str(lst)]})
    fp1 = Filter.fingerprint([src], cfg)
    assert Filter.fingerprint([src], cfg) == fp1
    lst.write_text("b.org\n")
    assert Filter.fingerprint([src], cfg) != fp1


def test_unreadable_part_is_named(store, tmp_path):
    src = _input(store, [_docs([("a", GOOD, None)])])
    with open(src.files[0], "wb") as f:
        f.write(b"not parquet")
    with pytest.raises(RuntimeError, match="part-00000.parquet"):
        Filter.run(store, [src], FilterConfig())
