"""The ingest stage end to end: sharding, manifest, errors, fsspec inputs, determinism, resume."""
from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from refinery_testlib import read_exec_log
from refinery.tasks.ingest import Ingest, IngestConfig, IngestError, InputSpec, ingest_report_rows
from refinery.tasks.runtime import ShardsFailed
from refinery.tasks.store import Store

SMALL = ["example.warc.gz", "jwarc-cc.warc.gz", "whirlwind.warc.wet.gz", "example-trunc.warc"]


@pytest.fixture
def warcs(shared_data, tmp_path):
    """A private copy of a few small real files (so tests can touch/remove them)."""
    d = tmp_path / "in"
    d.mkdir()
    for n in SMALL:
        shutil.copy(shared_data / "warc" / n, d / n)
    return d


def _cfg(*specs, **kw):
    return IngestConfig(inputs=[InputSpec(**s) for s in specs], **kw)


def test_stage_glob_manifest_schema(warcs, tmp_path, exec_log):
    cfg = _cfg({"path": str(warcs / "*.warc*"), "source": "cc"}, rows_per_part=1)
    ds = Ingest.run(Store(tmp_path / "store"), [], cfg)
    items = Ingest.obj.plan([], cfg)
    assert [os.path.basename(i["path"]) for i in items] == sorted(SMALL)  # sorted glob
    c = ds.counts
    assert (c["files"], c["files_failed"], c["docs_in"], c["docs_out"]) == (4, 0, 4, 4)
    assert c["record_errors"] == {"bad_record": 1}
    assert ds.manifest["file_errors"] == []
    assert len(ds.files) == 4  # rows_per_part=1
    t = ds.read_table()
    assert t.schema.names == ["id", "text", "url", "source", "crawl_date", "lang", "lang_score", "metadata"]
    assert str(t.schema.field("crawl_date").type) == "timestamp[us, tz=UTC]"
    assert set(t.column("source").to_pylist()) == {"cc"}
    # example.warc.gz and example-trunc.warc hold the same record (same WARC-Record-ID): same id
    by_id: dict = {}
    for i, m in zip(t.column("id").to_pylist(), t.column("metadata").to_pylist()):
        by_id.setdefault(i, set()).add(os.path.basename(json.loads(m)["file"]))
    assert sorted(map(sorted, by_id.values())) == [["example-trunc.warc", "example.warc.gz"],
                                                   ["jwarc-cc.warc.gz"], ["whirlwind.warc.wet.gz"]]
    per_file = {os.path.basename(f["file"]): f for f in ds.manifest["stats"]["per_file"]}
    assert per_file["example-trunc.warc"]["record_errors"] == {"bad_record": 1}
    assert per_file["whirlwind.warc.wet.gz"]["format"] == "warc"
    # cached: a second run does no work
    n = len(read_exec_log(exec_log))
    assert Ingest.run(Store(tmp_path / "store"), [], cfg).path == ds.path
    assert len(read_exec_log(exec_log)) == n == 5  # 4 shards + reduce


def test_bad_files_do_not_stop_the_others(warcs, shared_data, tmp_path, exec_log, caplog):
    specs = [{"path": str(warcs / "example.warc.gz"), "source": "cc"},
             {"path": str(tmp_path / "missing.warc.gz"), "source": "cc"},
             {"path": str(shared_data / "warc" / "LICENSE.warcio"), "source": "cc"},
             {"path": str(shared_data / "warc" / "clipped.warc.gz"), "source": "cc"}]
    # default max_failed_files=0: the good files are read, then the stage fails naming the bad ones
    # (clipped.warc.gz is cut short: a file error, tests/reliability/test_damaged_inputs.py)
    with pytest.raises(ShardsFailed, match=r"(?s)3 input file\(s\) failed.*missing\.warc\.gz.*LICENSE\.warcio"
                                           r".*clipped\.warc\.gz"):
        Ingest.run(Store(tmp_path / "strict"), [], _cfg(*specs))
    assert len(read_exec_log(exec_log)) == 4          # every file tried, no reduce
    logged = caplog.text
    assert "missing.warc.gz" in logged and "LICENSE.warcio" in logged
    cfg = _cfg(*specs, max_failed_files=3)
    ds = Ingest.run(Store(tmp_path / "store"), [], cfg)
    assert ds.counts["docs_out"] == 1 and ds.counts["files_failed"] == 3
    assert ds.counts["record_errors"] == {}
    errs = {os.path.basename(e["file"]): e["error"] for e in ds.manifest["file_errors"]}
    assert set(errs) == {"missing.warc.gz", "LICENSE.warcio", "clipped.warc.gz"}
    assert "TruncatedArchive" in errs["clipped.warc.gz"] and "cut short" in errs["clipped.warc.gz"]
    assert "missing.warc.gz" in errs["missing.warc.gz"] and "FileNotFoundError" in errs["missing.warc.gz"]
    assert "not a WARC/WET/ARC/JSONL/Parquet file" in errs["LICENSE.warcio"]
    rows = ingest_report_rows(ds)
    assert [bool(r["error"]) for r in rows] == [False, True, True, True]


def test_all_files_failing_raises_naming_them(shared_data, tmp_path):
    cfg = _cfg({"path": str(tmp_path / "nope.warc"), "source": "x"},
               {"path": str(shared_data / "warc" / "LICENSE.dolma"), "source": "x"})
    with pytest.raises(ShardsFailed, match=r"(?s)nope\.warc.*LICENSE\.dolma"):
        Ingest.run(Store(tmp_path / "store"), [], cfg)
    with pytest.raises(IngestError, match=r"(?s)nope\.warc.*LICENSE\.dolma"):   # tolerated, but nothing left
        Ingest.run(Store(tmp_path / "store"), [], cfg.model_copy(update={"max_failed_files": 2}))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        Ingest.run(Store(tmp_path / "store"), [], _cfg({"path": str(tmp_path / "*.warc"), "source": "x"}))


def test_fsspec_urls_memory_and_file(shared_data, tmp_path):
    import fsspec

    mem = fsspec.filesystem("memory")
    for n in ("example.warc.gz", "jwarc-cc.warc.gz"):
        mem.pipe(f"/ingest-test/{n}", (shared_data / "warc" / n).read_bytes())
    try:
        cfg = _cfg({"path": "memory://ingest-test/*.warc.gz", "source": "mem"},
                   {"path": f"file://{shared_data / 'warc' / 'whirlwind.warc.wet.gz'}", "source": "wet", "format": "wet"})
        items = Ingest.obj.plan([], cfg)
        assert [i["path"] for i in items][:2] == ["memory:///ingest-test/example.warc.gz",
                                                  "memory:///ingest-test/jwarc-cc.warc.gz"]
        ids = Ingest.obj.identity(cfg)
        assert len(ids) == 3 and all(i.count("|") == 2 for i in ids)
        ds = Ingest.run(Store(tmp_path / "store"), [], cfg)
        assert ds.counts["docs_out"] == 3 and ds.manifest["stats"]["sources"] == {"mem": 2, "wet": 1}
        # a changed input file changes the fingerprint (identity covers size/mtime)
        fp1 = Ingest.fingerprint([], cfg)
        mem.pipe("/ingest-test/jwarc-cc.warc.gz", (shared_data / "warc" / "example.warc.gz").read_bytes())
        assert Ingest.fingerprint([], cfg) != fp1
    finally:
        mem.rm("/ingest-test", recursive=True)


def test_deterministic_parts(warcs, shared_data, tmp_path):
    shutil.copy(shared_data / "warc" / "warcfile.warc.gz", warcs / "warcfile.warc.gz")
    cfg = _cfg({"path": str(warcs / "*"), "source": "cc"}, rows_per_part=5)
    a = Ingest.run(Store(tmp_path / "a"), [], cfg)
    b = Ingest.run(Store(tmp_path / "b"), [], cfg)
    assert a.fingerprint == b.fingerprint
    fa = [(f["path"], f["sha256"]) for f in a.manifest["files"]]
    assert fa == [(f["path"], f["sha256"]) for f in b.manifest["files"]]
    assert [p for p, _ in fa if p.startswith("part-00003-")] == [f"part-00003-0000{k}.train.parquet" for k in range(4)]
    assert [f["rows"] for f in a.manifest["files"] if f["path"].startswith("part-00003-")] == [5, 5, 5, 1]
    for pa_, pb_ in zip(a.files, b.files):
        assert open(pa_, "rb").read() == open(pb_, "rb").read()


def test_resume_skips_finished_shards(warcs, tmp_path, exec_log):
    cfg = _cfg({"path": str(warcs / "*"), "source": "cc"})
    store = Store(tmp_path / "store")

    class Crash(Exception):
        pass

    def crash_after_two(f, items):
        out = []
        for i, it in enumerate(items):
            if i == 2:
                raise Crash
            out.append(f(it))
        return out

    with pytest.raises(Crash):
        Ingest.run(store, [], cfg, map_fn=crash_after_two)
    first = read_exec_log(exec_log)
    assert len(first) == 2
    ds = Ingest.run(store, [], cfg)
    second = read_exec_log(exec_log)[2:]
    items = Ingest.obj.plan([], cfg)
    done = {ln.split()[-1] for ln in first}
    redone = {ln.split()[-1] for ln in second if len(ln.split()) == 3}
    assert redone == {it["name"] for it in items} - done and len(redone) == 2
    assert len(second) == 3  # 2 remaining shards + reduce
    assert ds.counts["docs_out"] == 4 and len(ds.files) == 4


def test_parquet_dump_through_stage(tmp_path):
    import pyarrow as pa

    p = tmp_path / "code.parquet"
    pq.write_table(pa.table({"code": ["def f(x):\n    return x + 1\n", "print('hello world')"],
                             "repo": ["a/b", "c/d"]}), p)
    cfg = _cfg({"path": str(p), "source": "code", "text_field": "code", "id_field": None})
    ds = Ingest.run(Store(tmp_path / "store"), [], cfg)
    t = ds.read_table()
    assert t.column("text").to_pylist()[1] == "print('hello world')"
    assert [json.loads(m)["fields"]["repo"] for m in t.column("metadata").to_pylist()] == ["a/b", "c/d"]
