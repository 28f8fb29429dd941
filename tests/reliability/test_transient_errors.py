"""Errors that tell the truth: a transient I/O error is retried and never recorded as a finished
shard; a file that keeps failing fails the stage at the end, naming it, after the other files are
done; the rerun after the fix redoes only that file and gives the full dataset."""
from __future__ import annotations

import json

import pytest

from refinery_testlib import read_exec_log
from refinery.tasks.ingest import Ingest, IngestConfig, InputSpec
from refinery.tasks.ingest import sources
from refinery.tasks.runtime import ShardsFailed, ShardFailure
from refinery.tasks.store import Store
from toy_stages import Toy, ToyConfig


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """Three small JSONL files (5 documents each) and fast retries."""
    monkeypatch.setattr(sources, "RETRY_BASE_SECONDS", 0.01)
    d = tmp_path / "in"
    d.mkdir()
    words = ["alpha", "bravo", "charlie"]
    for w in words:
        (d / f"{w}.jsonl").write_text("".join(
            json.dumps({"id": f"{w}-{k}", "text": f"Document {k} of file {w}: " + "some words here. " * 8}) + "\n"
            for k in range(5)))
    return d


def cfg_for(d, **kw) -> IngestConfig:
    return IngestConfig(inputs=[InputSpec(path=str(d / "*.jsonl"), source="s")], rows_per_part=2, **kw)


_REAL_OPEN = sources.open_binary


class Flaky:
    """``sources.open_binary`` that fails for one file: the first ``times`` opens raise (at open,
    or after ``after`` bytes were read, so parts of a half-read file exist), later ones work."""

    def __init__(self, name: str, times: int, error=ConnectionResetError, after: int | None = None):
        self.name, self.times, self.error, self.after = name, times, error, after
        self.opens = 0
        self.real = _REAL_OPEN

    def __call__(self, path, storage_options=None):
        if not path.endswith(self.name):
            return self.real(path, storage_options)
        self.opens += 1
        if self.opens > self.times:
            return self.real(path, storage_options)
        if self.after is None:
            raise self.error(104, f"simulated network error reading {path}")
        return _FailingReader(self.real(path, storage_options), self.after, self.error)


class _FailingReader:
    def __init__(self, f, after, error):
        self.f, self.after, self.error = f, after, error

    def read(self, n=-1):
        pos = self.f.tell()
        if pos >= self.after:
            raise self.error(104, "simulated connection reset mid-file")
        n = self.after - pos if n is None or n < 0 else min(n, self.after - pos)
        return self.f.read(n)

    read1 = read

    def readinto(self, buf):
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def _rows(ds) -> list[tuple]:
    t = ds.read_table(columns=["id", "text"])
    return sorted(zip(t.column("id").to_pylist(), t.column("text").to_pylist()))


def test_a_transient_error_is_retried_and_the_dataset_is_complete(inputs, tmp_path, monkeypatch, caplog):
    clean = Ingest.run(Store(tmp_path / "clean"), [], cfg_for(inputs))
    assert clean.counts["docs_out"] == 15
    flaky = Flaky("bravo.jsonl", times=1)
    monkeypatch.setattr(sources, "open_binary", flaky)
    ds = Ingest.run(Store(tmp_path / "w"), [], cfg_for(inputs))
    assert flaky.opens == 2
    assert ds.counts["docs_out"] == 15 and ds.counts["files_failed"] == 0
    assert _rows(ds) == _rows(clean)
    assert [f["path"] for f in ds.manifest["files"]] == [f["path"] for f in clean.manifest["files"]]
    assert "bravo.jsonl" in caplog.text and "retrying" in caplog.text


def test_a_file_cut_off_mid_read_leaves_no_partial_parts(inputs, tmp_path, monkeypatch):
    """Parts written before the error are discarded; the retry writes the whole file once."""
    clean = Ingest.run(Store(tmp_path / "clean"), [], cfg_for(inputs))
    flaky = Flaky("charlie.jsonl", times=2, after=500)   # 2 rows read: one part written
    monkeypatch.setattr(sources, "open_binary", flaky)
    ds = Ingest.run(Store(tmp_path / "w"), [], cfg_for(inputs))
    assert flaky.opens == 3
    assert _rows(ds) == _rows(clean) and ds.counts["docs_out"] == 15
    assert [(f["path"], f["rows"]) for f in ds.manifest["files"]] == \
        [(f["path"], f["rows"]) for f in clean.manifest["files"]]


def test_a_file_that_keeps_failing_fails_the_stage_at_the_end_and_the_rerun_heals(
        inputs, tmp_path, monkeypatch, exec_log, caplog):
    store = Store(tmp_path / "w")
    cfg = cfg_for(inputs)
    flaky = Flaky("alpha.jsonl", times=10 ** 6, error=TimeoutError)
    monkeypatch.setattr(sources, "open_binary", flaky)
    with pytest.raises(ShardsFailed) as e:
        Ingest.run(store, [], cfg)
    assert "stage ingest: 1 input file(s) failed" in str(e.value) and "alpha.jsonl" in str(e.value) and "TimeoutError" in str(e.value)
    assert flaky.opens == sources.READ_ATTEMPTS                    # retried, then given up
    first = read_exec_log(exec_log)
    assert len(first) == 3                                         # all three files tried, no reduce
    assert store.get("ingest", Ingest.fingerprint([], cfg)) is None   # nothing published
    assert "alpha.jsonl" in caplog.text                            # logged by name
    b = store.builder("ingest", Ingest.fingerprint([], cfg))
    items = Ingest.obj.plan([], cfg)
    assert [b.shard_result(it["name"]) is not None for it in items] == [False, True, True]   # never "finished"

    monkeypatch.setattr(sources, "open_binary", flaky.real)        # the network is back
    ds = Ingest.run(store, [], cfg)
    again = read_exec_log(exec_log)[len(first):]
    assert [ln.split()[-1] for ln in again if len(ln.split()) == 3] == [items[0]["name"]]   # only alpha redone
    assert ds.counts["docs_out"] == 15 and ds.counts["files_failed"] == 0
    assert _rows(ds) == _rows(Ingest.run(Store(tmp_path / "clean"), [], cfg))


def test_tolerated_failures_are_listed_in_the_manifest(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "open_binary", Flaky("alpha.jsonl", times=10 ** 6, error=PermissionError))
    cfg = cfg_for(inputs, max_failed_files=1)
    ds = Ingest.run(Store(tmp_path / "w"), [], cfg)
    assert ds.counts["docs_out"] == 10 and ds.counts["files_failed"] == 1
    (err,) = ds.manifest["file_errors"]
    assert err["file"].endswith("alpha.jsonl") and "PermissionError" in err["error"]
    assert [f["name"] for f in ds.manifest["stats"]["failed_shards"]] == [Ingest.obj.plan([], cfg)[0]["name"]]
    # a file that always breaks mid-read: the parts written before the error are not published
    monkeypatch.setattr(sources, "open_binary", Flaky("charlie.jsonl", times=10 ** 6, after=500))
    ds = Ingest.run(Store(tmp_path / "w3"), [], cfg)
    assert ds.counts["docs_out"] == 10 and ds.read_table().num_rows == 10
    assert not [i for i in ds.read_table(columns=["id"]).column("id").to_pylist() if i.startswith("charlie")]
    assert sum(f["rows"] or 0 for f in ds.manifest["files"]) == 10
    # a permission error is not retried: it would say the same again
    flaky = Flaky("alpha.jsonl", times=10 ** 6, error=PermissionError)
    monkeypatch.setattr(sources, "open_binary", flaky)
    with pytest.raises(ShardsFailed):
        Ingest.run(Store(tmp_path / "w2"), [], cfg_for(inputs))
    assert flaky.opens == 1


class TolerantToy(ToyConfig):
    max_failed_shards: int = 0


def test_sharded_stage_failures_through_prefect(tmp_path, monkeypatch):
    """The same rules on the Prefect path: a shard that keeps failing is retried by its task, the
    others finish, the stage fails at the end naming it; max_failed_shards publishes without it."""
    from prefect import flow

    original = Toy.obj.shard
    calls: list[str] = []

    def broken_s1(b, item, c):
        calls.append(item["name"])
        if item["name"] == "s1":
            raise OSError("disk on fire")
        return original(b, item, c)

    @flow
    def toy_flow(root: str, tolerate: int) -> str:
        return Toy.call(root, [], TolerantToy(shards=4, max_failed_shards=tolerate)).path

    monkeypatch.setattr(Toy.obj, "shard", staticmethod(broken_s1))
    with pytest.raises(ShardsFailed, match=r"(?s)1 shard\(s\) failed.*s1: OSError: disk on fire"):
        toy_flow(str(tmp_path / "w"), 0)
    assert sorted(calls) == ["s0", "s1", "s1", "s2", "s3"]
    calls.clear()
    from refinery.tasks.store import Dataset

    ds = Dataset.open(toy_flow(str(tmp_path / "w"), 1))
    assert ds.counts["docs_out"] == 12 and ds.manifest["stats"]["failed_shards"][0]["name"] == "s1"
    assert ShardFailure("s1", "x").name == "s1"


@pytest.mark.parametrize("error,attempts", [
    (ValueError("not a WARC file"), 1),                       # a format error: the same on every try
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 1),
    (FileNotFoundError("gone"), 1),
    (RuntimeError("x.warc.gz: NotAnArchive: empty file"), 3),  # says nothing: retried like I/O ...
    (ConnectionResetError("peer reset"), 3),                  # ... and transient I/O is retried
])
def test_only_errors_that_can_go_away_are_retried(tmp_path, monkeypatch, error, attempts):
    """A shard whose error cannot change on another attempt (bad content, a missing path) fails
    at once; I/O errors are retried with backoff (here 2 retries)."""
    from refinery.tasks.runtime import ShardJob, run_engine_shard

    calls = []

    def fails(b, item, c):
        calls.append(item["name"])
        raise error

    monkeypatch.setattr(Toy.obj, "shard", staticmethod(fails))
    job = ShardJob(Toy.ref, str(Store(tmp_path / "w").root), "fp0", ToyConfig(), retries=2, backoff=0.0)
    out = run_engine_shard({"name": "s0", "i": 0}, job)
    assert isinstance(out, ShardFailure) and type(error).__name__ in out.error
    assert len(calls) == attempts


def test_a_wrapped_error_is_judged_by_its_cause():
    """A stage's wrapper that names the file (``raise IngestFileError(...) from e``) is permanent
    when its cause is; an error may also say so itself (``permanent``)."""
    from refinery.tasks.runtime import is_permanent

    def wrapped(cause: BaseException) -> RuntimeError:
        try:
            raise RuntimeError("in.warc.gz: read failed") from cause
        except RuntimeError as e:
            return e

    assert is_permanent(wrapped(ValueError("empty file")))
    assert not is_permanent(wrapped(TimeoutError("read timed out")))
    flagged = RuntimeError("quota")
    flagged.permanent = True   # type: ignore[attr-defined]
    assert is_permanent(flagged) and not is_permanent(RuntimeError("?"))
