"""Shards on the engine (refinery.tasks.runtime.shard_engine): retries with backoff on the worker,
failures listed at the end, a worker killed mid-shard losing only that shard (Dask and Ray), and Ray as a
second engine giving the local run's curate outputs byte for byte."""
from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from refinery_testlib import read_exec_log
from refinery.tasks import runtime
from refinery.tasks.runtime import ShardFailure, ShardJob, ShardsFailed, make_runner, run_engine_shard, shard_engine
from refinery.tasks.store import Dataset, Store
from toy_stages import Toy, ToyConfig

pytestmark = pytest.mark.timeout(600)


class RetryToy(ToyConfig):
    shard_retries: int = 2
    shard_backoff: float = 0.05
    max_failed_shards: int = 0


def _shard_runs(exec_log: Path) -> collections.Counter:
    return collections.Counter(ln.split()[-1] for ln in read_exec_log(exec_log) if len(ln.split()) == 3)


def test_a_flaky_shard_is_retried_with_backoff_on_its_worker(tmp_path, monkeypatch):
    original = Toy.obj.shard
    calls: list[tuple[str, float]] = []

    def flaky(b, item, c):
        calls.append((item["name"], time.monotonic()))
        if item["name"] == "s1" and sum(n == "s1" for n, _ in calls) <= 2:
            raise OSError("store hiccup")
        return original(b, item, c)

    monkeypatch.setattr(Toy.obj, "shard", staticmethod(flaky))
    b = Store(tmp_path).builder("toy", "fp")
    job = ShardJob(Toy.ref, str(tmp_path), "fp", RetryToy(), retries=2, backoff=0.05)
    assert run_engine_shard({"name": "s1", "i": 1}, job) == {"docs_out": 4}
    times = [t for n, t in calls if n == "s1"]
    assert len(times) == 3 and times[1] - times[0] >= 0.025 and times[2] - times[1] >= 0.05   # backed off, doubling
    assert b.shard_result("s1") == {"docs_out": 4}                  # recorded once it finished
    # one that keeps failing comes back as a failure with its error, and is never recorded as done
    monkeypatch.setattr(Toy.obj, "shard", staticmethod(lambda b, item, c: 1 / 0))
    out = run_engine_shard({"name": "s2", "i": 2}, ShardJob(Toy.ref, str(tmp_path), "fp", RetryToy(), 1, 0.0))
    assert isinstance(out, ShardFailure) and out.name == "s2" and "ZeroDivisionError" in out.error
    assert b.shard_result("s2") is None


def test_retry_policy_from_config_then_environment(monkeypatch):
    assert runtime.shard_retry_policy(RetryToy()) == (2, 0.05)
    monkeypatch.setenv("REFINERY_SHARD_RETRIES", "4")
    monkeypatch.setenv("REFINERY_SHARD_BACKOFF", "0.5")
    assert runtime.shard_retry_policy(ToyConfig()) == (4, 0.5)
    assert all(0.5 * 4 * 0.5 <= runtime.backoff_delay(0.5, 2) <= 0.5 * 4 for _ in range(20))
    assert runtime.backoff_delay(10, 30) <= runtime.SHARD_BACKOFF_CAP_S


def test_engine_of_each_runner():
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    assert shard_engine(None).name == "threads"
    assert shard_engine(ThreadPoolTaskRunner(max_workers=3)).name == "threads:3"
    assert shard_engine(ProcessPoolTaskRunner(max_workers=2)).name == "processes:2"
    ray = make_runner("ray:2")
    assert shard_engine(ray) is ray and ray.num_cpus == 2
    assert make_runner("ray://head:10001").address == "ray://head:10001"
    with pytest.raises(ValueError, match="ray\\[:N\\]"):
        make_runner("spark")


def test_stage_on_a_thread_engine_finishes_the_others_and_lists_failures(tmp_path, monkeypatch, exec_log):
    """Through Prefect on the engine path: the failing shard is retried on its worker, the others
    finish and are recorded, the stage fails at the end naming it; the rerun redoes only it."""
    from prefect import flow

    original = Toy.obj.shard
    broken = {"on": True}

    def broken_s2(b, item, c):
        if item["name"] == "s2" and broken["on"]:
            raise RuntimeError("s2 is broken")
        return original(b, item, c)

    @flow
    def toy_flow(root: str) -> str:
        with make_runner("threads:2") as runner:
            return Toy.call(root, [], RetryToy(shards=5, shard_retries=1, shard_backoff=0.01), runner=runner).path

    monkeypatch.setattr(Toy.obj, "shard", staticmethod(broken_s2))
    with pytest.raises(ShardsFailed, match=r"(?s)1 shard\(s\) failed.*s2: RuntimeError: s2 is broken"):
        toy_flow(str(tmp_path / "w"))
    assert _shard_runs(exec_log) == {"s0": 1, "s1": 1, "s2": 2, "s3": 1, "s4": 1}
    broken["on"] = False
    ds = Dataset.open(toy_flow(str(tmp_path / "w")))
    assert _shard_runs(exec_log)["s2"] == 3 and _shard_runs(exec_log)["s0"] == 1   # only s2 redone
    assert ds.counts["docs_out"] == 20
    assert ds.manifest["files"] == Toy.run(tmp_path / "plain", [], RetryToy(shards=5, shard_retries=1,
                                                                           shard_backoff=0.01)).manifest["files"]


def _kill_when_hung(pid_file: Path, killed: list) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if pid_file.exists() and pid_file.read_text():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.1)


@pytest.mark.slow
def test_a_dask_worker_killed_mid_shard_loses_only_that_shard(tmp_path, monkeypatch, exec_log):
    from distributed import LocalCluster
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from engine_stages import KillConfig, Killable

    monkeypatch.setenv("KILL_SHARD", "k2")
    monkeypatch.setenv("KILL_DIR", str(tmp_path))
    killed: list[int] = []

    @flow
    def kill_flow(root: str, address: str) -> str:
        with DaskTaskRunner(address=address) as runner:
            return Killable.call(root, [], KillConfig(), runner=runner).path

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        killer = threading.Thread(target=_kill_when_hung, args=(tmp_path / "pid", killed), daemon=True)
        killer.start()
        ds = Dataset.open(kill_flow(str(tmp_path / "w"), cluster.scheduler_address))
        killer.join(5)
    assert killed and killed[0] != os.getpid()
    assert _shard_runs(exec_log) == {"k0": 1, "k1": 1, "k2": 2, "k3": 1, "k4": 1, "k5": 1}   # only k2 redone
    plain = Killable.run(tmp_path / "plain", [], KillConfig())
    assert ds.manifest["files"] == plain.manifest["files"] and ds.counts == plain.counts


def _file_hashes(outputs: dict) -> dict:
    out = {}
    for stage, path in outputs.items():
        m = json.loads((Path(path) / "manifest.json").read_text())
        out[stage] = [(f["path"], f["sha256"]) for f in m["files"]]
    return out


@pytest.mark.slow
def test_ray_cluster_matches_local_run(tmp_path):
    pytest.importorskip("ray")
    from refinery.flows.curate import CurateParams, curate_flow
    from refinery.tasks.demo.crawl import make_demo_crawl

    files = make_demo_crawl(tmp_path / "crawl", seed=3, n_pages=120)
    glob = str(Path(files[0]).parent / "*.warc.gz")
    local = curate_flow.run_params(CurateParams(input=glob, workdir=str(tmp_path / "local")))
    ray = curate_flow.run_params(CurateParams(input=glob, workdir=str(tmp_path / "ray"), task_runner="ray:2"))
    assert [Path(p).name for p in ray["outputs"].values()] == [Path(p).name for p in local["outputs"].values()]
    assert _file_hashes(ray["outputs"]) == _file_hashes(local["outputs"])
    assert ray["counts"] == local["counts"]


def test_shards_ride_in_batches_only_when_there_are_many_per_slot():
    from refinery.tasks.runtime import BATCHES_PER_SLOT, shard_batches

    assert shard_batches(5, 2) == [[0], [1], [2], [3], [4]]               # few shards: one per task
    many = shard_batches(100 * BATCHES_PER_SLOT, 2)
    assert len(many) == 2 * BATCHES_PER_SLOT and many[0][:2] == [0, 2 * BATCHES_PER_SLOT]
    assert sorted(i for b in many for i in b) == list(range(100 * BATCHES_PER_SLOT))
    assert shard_batches(7, None) == [[i] for i in range(7)] and shard_batches(0, 4) == []


@pytest.mark.slow
def test_a_ray_worker_killed_mid_shard_loses_only_that_shard(tmp_path, monkeypatch, exec_log):
    pytest.importorskip("ray")
    from prefect import flow

    from engine_stages import KillConfig, Killable

    tests_dir = str(Path(__file__).resolve().parents[1])   # Ray's workers import engine_stages from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("KILL_SHARD", "k2")
    monkeypatch.setenv("KILL_DIR", str(tmp_path))
    killed: list[int] = []

    @flow
    def kill_flow(root: str) -> str:
        with make_runner("ray:2") as runner:
            return Killable.call(root, [], KillConfig(), runner=runner).path

    killer = threading.Thread(target=_kill_when_hung, args=(tmp_path / "pid", killed), daemon=True)
    killer.start()
    ds = Dataset.open(kill_flow(str(tmp_path / "w")))
    killer.join(5)
    assert killed and killed[0] != os.getpid()
    assert _shard_runs(exec_log) == {"k0": 1, "k1": 1, "k2": 2, "k3": 1, "k4": 1, "k5": 1}   # only k2 redone
    plain = Killable.run(tmp_path / "plain", [], KillConfig())
    assert ds.manifest["files"] == plain.manifest["files"] and ds.counts == plain.counts
