"""Published data is checked before it is trusted, and damage is moved aside and rebuilt.

Each test damages a dataset the way a disk, an operator or an attacker would, then shows: what
``Dataset.open`` (cheap: sizes) or ``Dataset.verify`` / ``refinery verify`` (sha256) reports,
and that the next run moves the damaged folder aside (kept, named in a warning) and rebuilds a
dataset equal to a clean one.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.flows.cli import main
from refinery.tasks.store import Dataset, DatasetCorrupt, DatasetNotFound, Store
from toy_stages import Toy, ToyConfig

REFINERY = str(Path(sys.executable).parent / "refinery")
CFG = ToyConfig(shards=3, rows=4)


@pytest.fixture
def built(tmp_path) -> Dataset:
    return Toy.run(tmp_path / "w", [], CFG)


def part(ds: Dataset, i: int = 1) -> Path:
    return Path(ds.path) / f"part-{i:05d}.parquet"


def files_sig(ds: Dataset) -> list:
    return [(f["path"], f["bytes"], f["sha256"]) for f in ds.manifest["files"]]


def rebuild_moves_aside(tmp_path, ds: Dataset, caplog, reason: str) -> Path:
    """Run the stage again: it must warn, move the damaged folder aside and rebuild it intact."""
    want = files_sig(ds)
    with caplog.at_level(logging.WARNING, logger="refinery.store"):
        again = Toy.run(tmp_path / "w", [], CFG)
    assert again.path == ds.path and files_sig(again) == want and again.verify() == []
    quarantined = list((tmp_path / "w" / "toy").glob(f".quarantine-{ds.fingerprint}-*"))
    assert len(quarantined) == 1, "the damaged copy is kept for inspection"
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert reason in warning and quarantined[0].name in warning
    return quarantined[0]


def test_deleted_part_is_detected_on_open_and_rebuilt(tmp_path, built, caplog):
    part(built).unlink()
    with pytest.raises(DatasetCorrupt, match="part-00001.parquet: missing"):
        Dataset.open(built.path)
    assert Store(tmp_path / "w").get("toy", built.fingerprint) is None
    q = rebuild_moves_aside(tmp_path, built, caplog, "part-00001.parquet: missing")
    assert (q / "manifest.json").exists() and not (q / "part-00001.parquet").exists()


def test_replaced_part_of_another_size_is_detected_on_open(tmp_path, built, caplog):
    pq.write_table(pa.table({"x": [7] * 40}), part(built))   # a valid Parquet file, other rows
    with pytest.raises(DatasetCorrupt, match=r"part-00001.parquet: \d+ bytes, manifest says \d+"):
        Dataset.open(built.path)
    rebuild_moves_aside(tmp_path, built, caplog, "part-00001.parquet")


def test_same_size_replacement_is_found_by_verify_and_the_cli(tmp_path, built, capsys):
    assert main(["verify", built.path]) == 0
    ok = capsys.readouterr().out
    assert ok.startswith("OK ") and "12 rows" in ok and f"{len(built.manifest['files'])} files" in ok
    p = part(built, 2)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF                                # same size, different bytes
    p.write_bytes(bytes(data))
    Dataset.open(built.path)                                    # the cheap check cannot see it ...
    problems = Dataset.open(built.path).verify()               # ... the sha256 check does
    assert len(problems) == 1 and problems[0].startswith("part-00002.parquet: sha256")
    assert main(["verify", built.path]) == 1
    out, err = capsys.readouterr()
    assert "BAD part-00002.parquet: sha256" in out and "1 of" in err
    r = subprocess.run([REFINERY, "verify", built.path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "part-00002.parquet" in r.stdout


def test_truncated_manifest_is_moved_aside_and_rebuilt(tmp_path, built, caplog):
    m = Path(built.path) / "manifest.json"
    m.write_bytes(m.read_bytes()[:100])
    with pytest.raises(DatasetCorrupt, match="unreadable manifest.json"):
        Dataset.open(built.path)
    assert main(["verify", built.path]) == 1
    rebuild_moves_aside(tmp_path, built, caplog, "unreadable manifest.json")


def test_folder_without_manifest_is_moved_aside_and_rebuilt(tmp_path, built, caplog):
    """Formerly: 'Directory not empty' on every run."""
    (Path(built.path) / "manifest.json").unlink()
    with pytest.raises(DatasetNotFound, match="no manifest.json"):
        Dataset.open(built.path)
    assert main(["verify", built.path]) == 2                   # not a dataset (no manifest)
    q = rebuild_moves_aside(tmp_path, built, caplog, "folder without manifest.json")
    assert (q / "part-00000.parquet").exists()


@pytest.mark.parametrize("bad", ["../escape.parquet", "/etc/passwd", "a/../../b", "part-0.parquet.tmp-1-x"])
def test_manifest_paths_must_stay_inside_the_dataset(tmp_path, built, caplog, bad):
    m = Path(built.path) / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["files"][0]["path"] = bad
    m.write_text(json.dumps(manifest))
    with pytest.raises(DatasetCorrupt, match="dataset folder|temporary file"):
        Dataset.open(built.path, check=False)                  # refused even without the size check
    assert main(["verify", built.path]) == 1
    rebuild_moves_aside(tmp_path, built, caplog, "damaged dataset")


def test_builder_refuses_paths_outside_the_dataset(tmp_path):
    b = Store(tmp_path).builder("toy", "fp")
    for bad in ("../x.parquet", "/tmp/x.parquet", "a/./b.parquet"):
        with pytest.raises(ValueError, match="cannot write"):
            b.write_bytes(bad, b"x")
    assert not (tmp_path / "x.parquet").exists()


def test_temporary_files_never_reach_a_published_folder(tmp_path, monkeypatch):
    store = Store(tmp_path / "w")
    fp = Toy.fingerprint([], CFG)
    b = store.builder("toy", fp)
    # A write interrupted by a full disk: the writer raises, its temporary file is removed.
    real = pq.write_table

    def disk_full(table, f, **kw):
        f.write(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(OSError, match="No space"):
        b.write_table("part-00000.parquet", pa.table({"x": [1]}))
    monkeypatch.setattr(pq, "write_table", real)
    assert not [p for p in Path(b.dir).rglob("*") if ".tmp-" in p.name]
    # One left by a killed process (no chance to clean up) is deleted at publish.
    (Path(b.dir) / "part-00001.parquet.tmp-999-deadbeef").write_bytes(b"junk")
    ds = Toy.run(store, [], CFG)
    assert not [p for p in Path(ds.path).rglob("*") if ".tmp-" in p.name]
    assert ds.verify() == []


def test_damaged_staged_part_is_not_published_and_the_rerun_starts_over(tmp_path, caplog, monkeypatch):
    """A part that changed after its record was written (a disk error, another tool) never gets
    published: the holder of the lock moves the staging folder aside and the shards are redone."""
    store = Store(tmp_path / "w")
    fp = Toy.fingerprint([], CFG)
    original = Toy.obj.shard

    def crash_on_s2(b, item, cfg):
        if item["name"] == "s2":
            raise KeyboardInterrupt   # a crash: s0 and s1 stay staged
        return original(b, item, cfg)

    monkeypatch.setattr(Toy.obj, "shard", staticmethod(crash_on_s2))
    with pytest.raises(KeyboardInterrupt):
        Toy.run(store, [], CFG)
    monkeypatch.setattr(Toy.obj, "shard", staticmethod(original))
    staged = tmp_path / "w" / "toy" / f".staging-{fp}" / "part-00000.parquet"
    staged.write_bytes(staged.read_bytes()[:-10])              # truncated after it was recorded
    with caplog.at_level(logging.WARNING, logger="refinery.store"):
        ds = Toy.run(store, [], CFG)
    assert ds.verify() == [] and ds.read_table().num_rows == 12
    assert "staged files do not match their records" in caplog.text
    assert len(list((tmp_path / "w" / "toy").glob(f".quarantine-{fp}-*"))) == 1


def test_publish_refuses_a_damaged_staged_file(tmp_path):
    store = Store(tmp_path / "w")
    b = store.builder("toy", "fp1")
    b.write_table("part-00000.parquet", pa.table({"x": [1, 2, 3]}))
    os.truncate(Path(b.dir) / "part-00000.parquet", 10)
    with pytest.raises(DatasetCorrupt, match="part-00000.parquet: 10 bytes"):
        b.publish(version="1", config={}, inputs=[])
    assert store.get("toy", "fp1") is None and not Path(b.dir).exists()
    assert len(list((tmp_path / "w" / "toy").glob(".quarantine-fp1-*"))) == 1


def test_remote_dataset_is_checked_on_open_and_rebuilt(caplog):
    store = Store("memory://verify-remote")
    ds = Toy.run(store, [], CFG)
    store.fs.rm(ds.file("part-00001.parquet"))
    with pytest.raises(DatasetCorrupt, match="part-00001.parquet: missing"):
        Dataset.open(ds.path)
    with caplog.at_level(logging.WARNING, logger="refinery.store"):
        again = Toy.run(store, [], CFG)
    assert again.read_table().num_rows == 12 and again.verify() == []
    assert "moved aside" in caplog.text
    assert store.fs.glob(f"/verify-remote/toy/.quarantine-{ds.fingerprint}-*")
