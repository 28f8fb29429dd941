"""A planted Prefect result record must not run code: stage results are read only as plain JSON.

Prefect decodes a record with the serializer the record names, and our record paths are
predictable (``<result store>/refinery-<Stage>-<fingerprint>-<root hash>``). These tests plant real
payloads that create a marker file when decoded (checked against Prefect itself first), then show
the next stage run refuses them with an error naming the file and that the marker never appears.

A record cut short by a crash (empty, or the start of a JSON record) is not refused: it is moved
aside (``.quarantine-<record>-<time>-<id>`` beside it), named in a warning, and rebuilt.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest

from refinery.tasks.runtime import (TornResultRecord, UnsafeResultRecord, _stage_key, check_result_record,
                                    check_stored_result, result_storage, result_storage_location)
from refinery.tasks.store import Store
from toy_stages import Toy, ToyConfig

CFG = ToyConfig(shards=2)


class _Touch:
    """Unpickling this creates ``path`` (stands in for any code an attacker would run)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_record(marker: Path) -> bytes:
    """A genuine Prefect result record with the pickle serializer, as an attacker would write it."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    rec = ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer()), result=_Touch(str(marker)))
    return rec.serialize()


def json_record(payload, **serializer) -> bytes:
    """A record that says "json" but asks Prefect to import something while decoding."""
    ser = {"type": "json", "jsonlib": "json", "object_decoder": "prefect.serializers.prefect_json_object_decoder",
           "dumps_kwargs": {}, "loads_kwargs": {}, **serializer}
    return json.dumps({"metadata": {"storage_key": "k", "expiration": None, "serializer": ser,
                                    "prefect_version": "3", "storage_block_id": None},
                       "result": json.dumps(payload)}).encode()


def payload_record(raw: str) -> bytes:
    """A whole JSON record whose payload string is ``raw`` (not necessarily JSON)."""
    rec = json.loads(json_record(None))
    rec["result"] = raw
    return json.dumps(rec).encode()


def record_path(root: Path) -> Path:
    """Where the Toy stage's result record for ``root`` lives (what the next run reads)."""
    store = Store(root)
    key = _stage_key(None, {"stage_ref": Toy.ref, "fp": Toy.fingerprint([], CFG), "root": store.root})
    return Path(result_storage_location(store)) / key


def run_toy(root: Path) -> str:
    from prefect import flow

    @flow
    def toy_flow(root: str) -> str:
        return Toy.call(root, [], CFG).path

    return toy_flow(str(root))


def test_the_planted_payload_is_live(tmp_path):
    """Control: Prefect itself runs the planted pickle payload (so the refusals below mean something)."""
    from prefect._internal.result_records import ResultRecord

    marker = tmp_path / "ran"
    ResultRecord.deserialize(pickle_record(marker))
    assert marker.exists()


def test_planted_records_are_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("REFINERY_RESULT_STORAGE", raising=False)
    root = tmp_path / "w"
    first = run_toy(root)                      # a healthy run writes a JSON record
    path = record_path(root)
    assert path.exists() and json.loads(path.read_text())["metadata"]["serializer"]["type"] == "json"
    assert check_result_record(path.read_bytes(), str(path))   # ours pass the check

    marker = tmp_path / "pwned"
    path.write_bytes(pickle_record(marker))
    with pytest.raises(UnsafeResultRecord, match=f"{path}.*serializer 'pickle'"):
        run_toy(root)
    assert not marker.exists()

    # "json" records that would import code while decoding are refused too
    for poison in (json_record({"x": 1}, jsonlib="pickle"),
                   json_record({"x": {"__exc_type__": "builtins.SystemExit", "message": "bye"}}),
                   json_record({"x": {"__class__": "os.system", "data": f"touch {marker}"}}),
                   b"\x80\x04not json at all"):
        path.write_bytes(poison)
        with pytest.raises(UnsafeResultRecord, match=str(path)):
            run_toy(root)
    assert not marker.exists()

    # Prefect's own cache lookup through our storage block never decodes it either
    from prefect.results import ResultStore

    path.write_bytes(pickle_record(marker))
    storage = result_storage(Store(root))
    assert ResultStore(result_storage=storage).exists(path.name) is False
    with pytest.raises(UnsafeResultRecord, match=str(path)):
        storage.read_path(path.name)
    assert not marker.exists()

    path.unlink()                              # deleting the record heals: the dataset is reused
    assert run_toy(root) == first


def test_a_record_planted_before_the_first_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("REFINERY_RESULT_STORAGE", raising=False)
    root = tmp_path / "fresh"
    path = record_path(root)
    path.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    path.write_bytes(pickle_record(marker))
    with pytest.raises(UnsafeResultRecord, match=str(path)):
        run_toy(root)
    assert not marker.exists()


def test_result_store_apart_from_the_data_root(tmp_path, monkeypatch):
    """REFINERY_RESULT_STORAGE puts the records elsewhere (e.g. where only workers can write)."""
    results = tmp_path / "results-only-workers-write"
    monkeypatch.setenv("REFINERY_RESULT_STORAGE", str(results))
    root = tmp_path / "data"
    out = run_toy(root)
    assert Path(out).parent.parent == root
    assert not (root / ".prefect-results").exists()
    path = record_path(root)
    assert path.parent == results and path.exists()
    assert json.loads(json.loads(path.read_text())["result"])["path"] == out
    # a record planted in the data root is simply not read; one planted in the store is refused
    (root / ".prefect-results").mkdir()
    (root / ".prefect-results" / path.name).write_bytes(pickle_record(tmp_path / "m1"))
    assert run_toy(root) == out
    path.write_bytes(pickle_record(tmp_path / "m2"))
    with pytest.raises(UnsafeResultRecord, match=str(path)):
        run_toy(root)
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
    assert os.environ["REFINERY_RESULT_STORAGE"] == str(results)


def remote_toy_run(tmp_path, monkeypatch):
    """A toy run whose Prefect results live in ``memory://`` (the remote, fsspec storage block):
    (data root, output path, the memory file system, record key, record path, results root)."""
    import uuid

    import fsspec

    where = f"memory://refinery-results-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REFINERY_RESULT_STORAGE", where)
    root = tmp_path / "data"
    out = run_toy(root)
    key = record_path(root).name
    return root, out, fsspec.filesystem("memory"), key, f"{where}/{key}", where


def test_remote_result_store_refuses_too(tmp_path, monkeypatch):
    """The same check through the remote (fsspec) storage block: results in ``memory://``."""
    root, out, mem, key, path, where = remote_toy_run(tmp_path, monkeypatch)
    assert json.loads(json.loads(mem.cat(path))["result"])["path"] == out
    marker = tmp_path / "pwned"
    mem.pipe(path, pickle_record(marker))
    try:
        with pytest.raises(UnsafeResultRecord, match=key):
            run_toy(root)
        assert not marker.exists()
    finally:
        mem.rm(where.removeprefix("memory://"), recursive=True)


def aside(path: Path) -> list[Path]:
    """The torn records moved aside from ``path`` (beside it)."""
    return sorted(path.parent.glob(f".quarantine-{path.name}-*"))


@pytest.mark.parametrize("content", [b"", b"\n", b"\x00" * 64, b'{"metadata": {"storage_key": "k", "ser',
                                     b'{"metadata":{"serializer":{"type":"json","jsonlib":"js'])
def test_torn_records_are_told_apart(content):
    with pytest.raises(TornResultRecord, match="where: (empty|result record cut short)") as e:
        check_result_record(content, "where")
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileNotFoundError)   # "no record" to Prefect


@pytest.mark.parametrize("content", [b"\x80\x04not json at all", b"garbage",
                                     b'{"metadata":{"serializer":{"type":"pickle","picklelib":"cloudp',
                                     payload_record('{"a": {"__class__": "os.system", "data": "x"}, "b": '),
                                     payload_record('{"path": "/data/toy/abc", "finger')])
def test_what_a_crash_cannot_write_is_still_refused(content):
    """Raw bytes that are not JSON (Prefect falls back to the store's serializer, pickle for most
    tasks), a cut record naming pickle, and a whole envelope whose payload is cut short (a crash
    cannot cut inside the envelope's string; Prefect's decoder would build the closed objects)."""
    with pytest.raises(UnsafeResultRecord, match="where: "):
        check_result_record(content, "where")


def test_a_torn_record_is_set_aside_and_rebuilt(tmp_path, monkeypatch, caplog, exec_log):
    """A crash mid-write (half a record) or a full disk (an empty one): the rerun succeeds with the
    same dataset, keeps the torn record aside, names it in the log and writes a new record."""
    monkeypatch.delenv("REFINERY_RESULT_STORAGE", raising=False)
    root = tmp_path / "w"
    first = run_toy(root)
    path = record_path(root)
    good = path.read_bytes()
    built = exec_log.read_text()
    for n, torn in enumerate((good[: len(good) // 2], b"")):
        path.write_bytes(torn)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="refinery.runtime"):
            assert run_toy(root) == first
        kept = aside(path)
        assert len(kept) == n + 1 and torn in [k.read_bytes() for k in kept]
        new = path.read_bytes()
        assert check_result_record(new, str(path)) == new
        assert json.loads(json.loads(new)["result"]) == json.loads(json.loads(good)["result"])   # same manifest
        lines = [r.getMessage() for r in caplog.records if r.name == "refinery.runtime"]
        moved = [ln for ln in lines if str(path) in ln and "moved aside to" in ln]
        assert len(moved) == 1 and any(str(k) in moved[0] for k in kept), lines
    assert exec_log.read_text() == built   # the dataset was reused, not rebuilt
    assert not list(path.parent.glob(".*.tmp-*"))   # records are written whole (no temporary left)


def test_torn_record_reads_as_missing_on_every_path(tmp_path, monkeypatch):
    """Prefect's lookup (``exists``), its sync and async reads, and our pre-check all move a torn
    record aside and report no record (Prefect's ``exists`` then says False: a cache miss)."""
    from prefect.results import ResultStore

    monkeypatch.delenv("REFINERY_RESULT_STORAGE", raising=False)
    storage = result_storage(Store(tmp_path / "w"))
    path = Path(storage.basepath) / "rec"
    reads = {"exists": lambda: ResultStore(result_storage=storage).exists("rec") is False,
             "read_path": lambda: storage.read_path("rec"),
             "aread_path": lambda: asyncio.run(storage.aread_path("rec")),
             "check_stored_result": lambda: check_stored_result(storage, "rec") is None}
    for n, (name, read) in enumerate(reads.items()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'{"metadata": {"stor')
        try:
            assert read(), name
        except ValueError as e:            # LocalFileSystem's "no such record"
            assert isinstance(e, TornResultRecord) and str(path) in str(e), name
        assert not path.exists() and len(aside(path)) == n + 1, name
    path.write_bytes(b"\x80\x04not json at all")   # still refused on our path, and left in place
    with pytest.raises(UnsafeResultRecord, match=str(path)):
        check_stored_result(storage, "rec")
    assert path.exists() and len(aside(path)) == len(reads)


def test_remote_torn_record_is_set_aside_and_rebuilt(tmp_path, monkeypatch):
    """The same through the remote (fsspec) block: moved aside with the file system's move."""
    root, out, mem, key, path, where = remote_toy_run(tmp_path, monkeypatch)
    good = mem.cat(path)
    mem.pipe(path, good[: len(good) // 2])
    try:
        assert run_toy(root) == out
        assert mem.cat(path) == good or json.loads(mem.cat(path))["result"] == json.loads(good)["result"]
        kept = mem.glob(f"{where.removeprefix('memory://')}/.quarantine-{key}-*")
        assert len(kept) == 1 and mem.cat(kept[0]) == good[: len(good) // 2]
    finally:
        mem.rm(where.removeprefix("memory://"), recursive=True)


def test_local_records_are_written_whole(tmp_path, monkeypatch):
    """Our block writes a local record through a temporary file renamed over it: a write that fails
    part-way (a full disk) leaves the previous record whole and no temporary file behind."""
    import errno

    monkeypatch.delenv("REFINERY_RESULT_STORAGE", raising=False)
    storage = result_storage(Store(tmp_path / "w"))
    old = json_record({"path": "old"})
    storage.write_path("rec", old)
    asyncio.run(storage.awrite_path("rec2", old))
    path = Path(storage.basepath) / "rec"
    assert path.read_bytes() == old == (path.parent / "rec2").read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        storage.write_path("rec", json_record({"path": "new"}))
    assert path.read_bytes() == old
    assert sorted(p.name for p in path.parent.iterdir()) == ["rec", "rec2"]


def swap_payload(record: bytes, manifest: dict) -> bytes:
    """``record`` (a genuine one) with its payload replaced by ``manifest``: plain JSON throughout."""
    rec = json.loads(record)
    rec["result"] = json.dumps(manifest)
    return json.dumps(rec).encode()


@pytest.mark.parametrize("other", ["another fingerprint", "outside the workdir"])
def test_a_record_naming_another_dataset_is_set_aside(tmp_path, monkeypatch, exec_log, other):
    """A well-formed JSON record whose manifest names another dataset (another stage run's, or one
    outside the workdir) is not the stage's output: it is moved aside, logged, and the stage
    returns its own dataset (reused, not rebuilt)."""
    from prefect import flow

    from refinery.tasks.store import Dataset

    monkeypatch.delenv("REFINERY_RESULT_STORAGE", raising=False)
    root = tmp_path / "w"
    first = run_toy(root)
    path = record_path(root)

    @flow
    def elsewhere(where: str, shards: int) -> str:
        return Toy.call(where, [], ToyConfig(shards=shards)).path

    foreign = elsewhere(str(root), 3) if other == "another fingerprint" else elsewhere(str(tmp_path / "outside"), 2)
    assert foreign != first
    path.write_bytes(swap_payload(path.read_bytes(), {"path": foreign, **Dataset.open(foreign).manifest}))
    built = exec_log.read_text()
    seen: list[logging.LogRecord] = []   # our own handler: Prefect's first run may reset pytest's
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append   # type: ignore[method-assign]
    logging.getLogger("refinery.runtime").addHandler(handler)
    try:
        assert run_toy(root) == first
    finally:
        logging.getLogger("refinery.runtime").removeHandler(handler)
    assert exec_log.read_text() == built
    kept = aside(path)
    assert len(kept) == 1 and foreign in kept[0].read_text()
    moved = [r.getMessage() for r in seen if "moved aside to" in r.getMessage()]
    assert len(moved) == 1 and str(path) in moved[0] and foreign in moved[0]
    assert foreign not in path.read_text()   # rebuilt: the record names the stage's own dataset again
