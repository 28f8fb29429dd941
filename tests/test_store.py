import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refinery_testlib import read_exec_log
from refinery.tasks.store import Dataset, DatasetNotFound, Store, fingerprint
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
    f = next(f for f in m["files"] if f["path"].startswith("part-"))   # the other files: the card
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
        with pytest.raises((Boom, RuntimeError)):   # the shard's error, or ShardsFailed naming it
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


def test_shard_groups_spread_shards_over_runner_slots():
    from prefect.task_runners import ThreadPoolTaskRunner

    from refinery.tasks.runtime import TASKS_PER_SLOT, runner_slots, shard_groups

    groups = shard_groups(list(range(10)), 2)
    assert len(groups) == 2 * TASKS_PER_SLOT
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert groups[0] == [0, 4, 8]                           # round-robin: neighbours in different tasks
    assert shard_groups([3, 5], 4) == [[3], [5]]            # never more tasks than shards
    assert shard_groups(list(range(5)), None) == [[i] for i in range(5)]   # unknown width: one per shard
    assert shard_groups([], 2) == []
    assert runner_slots(ThreadPoolTaskRunner(max_workers=3)) == 3
    assert runner_slots(ThreadPoolTaskRunner()) is None     # unbounded pool
    assert runner_slots(None) is None


def test_prefect_path_groups_shards_and_resumes_after_a_failed_run(tmp_path, exec_log):
    """Through Prefect, 7 shards on a 2-thread runner: grouped tasks, a shard that keeps failing
    fails the run (after the task's retry), and the next run redoes only that shard."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    calls: list[str] = []
    original = Toy.obj.shard
    broken = {"on": True}

    def flaky(b, item, c):
        calls.append(item["name"])
        if item["name"] == "s2" and broken["on"]:
            raise RuntimeError("s2 is broken")
        return original(b, item, c)

    @flow
    def toy_flow(root: str) -> str:
        with ThreadPoolTaskRunner(max_workers=2) as runner:
            return Toy.call(root, [], ToyConfig(shards=7), runner=runner).path

    Toy.obj.shard = staticmethod(flaky)
    try:
        with pytest.raises(Exception, match="s2 is broken"):
            toy_flow(str(tmp_path / "w"))
        assert sorted(calls) == sorted([f"s{i}" for i in range(7)] + ["s2"])   # its task retried once
        broken["on"] = False
        calls.clear()
        path = toy_flow(str(tmp_path / "w"))
    finally:
        Toy.obj.shard = staticmethod(original)
    assert calls == ["s2"]
    ds = Dataset.open(path)
    assert ds.manifest["counts"]["docs_out"] == 28 and ds.read_table().num_rows == 28
    assert ds.manifest["files"] == Toy.run(tmp_path / "plain", [], ToyConfig(shards=7)).manifest["files"]


def test_runner_slots_of_a_dask_cluster_before_any_submission():
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from refinery.tasks.runtime import runner_slots

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with DaskTaskRunner(address=cluster.scheduler_address) as runner:
            assert runner_slots(runner) == 2
