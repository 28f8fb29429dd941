import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from refinery_testlib import read_exec_log
from tasks.store import Dataset, DatasetNotFound, Store, fingerprint
from toy_stages import DoubleConfig, Toy, ToyConfig, double

ROOT = Path(__file__).resolve().parents[1]


def test_fingerprint_depends_on_every_part():
    base = fingerprint("s", "1", {"a": 1, "b": [1, 2]}, ["x"])
    assert base == fingerprint("s", "1", {"b": [1, 2], "a": 1}, ["x"])  # key order is irrelevant
    assert len({base, fingerprint("t", "1", {"a": 1, "b": [1, 2]}, ["x"]),
                fingerprint("s", "2", {"a": 1, "b": [1, 2]}, ["x"]),
                fingerprint("s", "1", {"a": 2, "b": [1, 2]}, ["x"]),
                fingerprint("s", "1", {"a": 1, "b": [1, 2]}, ["y"])}) == 5


def test_publish_manifest_and_lineage(tmp_path):
    store = Store(tmp_path)
    toy = Toy.run(store, [], ToyConfig())
    out = double.run(store, [toy], DoubleConfig())
    m = out.manifest
    for key in ("stage", "fingerprint", "created_at", "code_version", "inputs", "config", "files", "counts", "stats"):
        assert key in m
    assert m["inputs"] == [toy.ref()]
    assert m["config"] == {"factor": 2}
    f = m["files"][0]
    assert f["rows"] == 12 and f["bytes"] == (Path(out.path) / f["path"]).stat().st_size
    assert out.read_table()["x"].to_pylist() == [0] * 4 + [2] * 4 + [4] * 4
    assert not list((tmp_path / "toy").glob(".staging-*"))
    with pytest.raises(DatasetNotFound, match="no manifest.json"):
        Dataset.open(tmp_path / "toy")


def test_cached_run_does_no_work_and_config_change_reruns_downstream_only(tmp_path, exec_log):
    store = Store(tmp_path)
    toy = Toy.run(store, [], ToyConfig())
    double.run(store, [toy], DoubleConfig())
    assert len(read_exec_log(exec_log)) == 5  # 3 shards + reduce + double
    toy2 = Toy.run(store, [], ToyConfig())
    double.run(store, [toy2], DoubleConfig())
    assert len(read_exec_log(exec_log)) == 5
    double.run(store, [toy2], DoubleConfig(factor=3))
    lines = read_exec_log(exec_log)
    assert len(lines) == 6 and lines[-1].startswith("double ")


def test_byte_identical_outputs(tmp_path):
    a = Toy.run(Store(tmp_path / "a"), [], ToyConfig())
    b = Toy.run(Store(tmp_path / "b"), [], ToyConfig())
    assert [f["sha256"] for f in a.manifest["files"]] == [f["sha256"] for f in b.manifest["files"]]


def test_sigkill_mid_stage_leaves_nothing_complete_and_rerun_resumes(tmp_path, exec_log):
    signal_file = tmp_path / "signal"
    env = dict(os.environ, TOY_SIGNAL=str(signal_file), TOY_HANG="s2", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    code = ("from toy_stages import Toy, ToyConfig; "
            f"Toy.run({str(tmp_path / 'w')!r}, [], ToyConfig())")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 60
    while not signal_file.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stage_dir = tmp_path / "w" / "toy"
    assert not list(stage_dir.glob("*/manifest.json"))  # nothing looks complete
    assert list(stage_dir.glob(".staging-*"))
    ds = Toy.run(tmp_path / "w", [], ToyConfig())
    assert ds.read_table().num_rows == 12
    shards = [line.split()[-1] for line in read_exec_log(exec_log)]
    assert shards == ["s0", "s1", "s2", "s2", ds.fingerprint]  # s0, s1 were not redone


def test_rerun_after_crash_skips_finished_shards(tmp_path, exec_log):
    class Boom(Exception):
        pass

    store = Store(tmp_path)
    cfg = ToyConfig()
    calls = []
    original = Toy.obj.shard

    def flaky(b, item, c):
        calls.append(item["name"])
        if item["name"] == "s2" and calls.count("s2") == 1:
            raise Boom()
        return original(b, item, c)

    Toy.obj.shard = staticmethod(flaky)
    try:
        with pytest.raises(Boom):
            Toy.run(store, [], cfg)
        assert store.get("toy", Toy.fingerprint([], cfg)) is None
        Toy.run(store, [], cfg)
    finally:
        Toy.obj.shard = staticmethod(original)
    assert calls == ["s0", "s1", "s2", "s2"]


def test_remote_store_memory_fs():
    store = Store("memory://refinery-test")
    toy = Toy.run(store, [], ToyConfig(shards=2))
    assert toy.path.startswith("memory://")
    again = Dataset.open(toy.path)
    assert again.read_table().num_rows == 8
    assert json.loads(store.fs.cat(toy.path + "/manifest.json"))["counts"]["docs_out"] == 8
