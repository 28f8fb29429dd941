"""Orchestration cost per shard in the flow process: shards on the engine (today's path) against one
Prefect task per shard group (the older path), with no-op shards on a local Dask cluster.

    .venv/bin/python bench/orchestration.py [--shards 10000] [--workers 2] [--old-tasks 200]

The cluster is "existing": a scheduler and ``--workers`` single-thread worker processes started as
their own processes before the clock starts (so the flow process holds only the flow, as it does
in front of a real cluster), and one Prefect server for every run (its start is not timed).

Rows, each measured in this same run:
  engine            ``Stage.call`` handing ``--shards`` shards to the cluster (``Client.map`` of
                    ``BATCHES_PER_SLOT`` tasks per worker thread at most, gathered with
                    ``as_completed``): the whole stage call (plan, fan-out, gather, reduce,
                    publish) divided by the shards, wall time and the flow process's CPU
  old, grouped      the older path on the same shards: ``TASKS_PER_SLOT`` Prefect tasks per worker
                    thread (4 tasks here: cheap per shard on 2 workers, but one task per two
                    threads of the cluster, so 32,000 submissions on 1,000 x 16 threads)
  old, per task     the older path with one Prefect task per shard (what a cluster as wide as the
                    work gets), on ``--old-tasks`` shards: the price of one submission
A no-op shard still records its completion (one small JSON file), as every shard does.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
# bench/tokenize.py would shadow the stdlib module: never import from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

# The no-op stage lives in a module of its own (written to a temporary folder) so that the worker
# processes, started apart from this script, can import it by name.
NOOP_MODULE = '''
from refinery.tasks.config import StrictModel
from refinery.tasks.runtime import StageOutput, stage, sum_counts


class NoopConfig(StrictModel):
    shards: int = 10
    tag: str = ""


@stage("noop", version="1", sharded=True)
class Noop:
    @staticmethod
    def plan(inputs, cfg):
        return [{"name": f"n{i:07d}"} for i in range(cfg.shards)]

    @staticmethod
    def shard(b, item, cfg):
        return {"shards": 1}

    @staticmethod
    def reduce(b, results, cfg, inputs):
        return StageOutput(counts=sum_counts(results))
'''


def start_cluster(tmp: Path, workers: int) -> tuple[str, list[subprocess.Popen]]:
    """A scheduler and ``workers`` worker processes of one thread each; returns its address."""
    sched_file = tmp / "scheduler.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp / "mod"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file",
                               str(sched_file), "--no-dashboard", "--port", "0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.time() + 180
    while not sched_file.exists():
        if time.time() > deadline:
            raise RuntimeError("the Dask scheduler did not start in 180 s")
        time.sleep(0.2)
    procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                   str(sched_file), "--nworkers", str(workers), "--nthreads", "1",
                                   "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(scheduler_file=str(sched_file)) as c:
        c.wait_for_workers(workers, timeout=300)
        address = c.scheduler.address
        # warm the workers: imports of the runtime, the store and the no-op stage
        c.run(lambda: __import__("refinery_bench_noop"))
    return address, procs


def measure(address: str, root: Path, shards: int, fanout: str, tag: str) -> dict:
    """One stage call (fresh dataset: the ``tag`` changes its fingerprint) inside a flow."""
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    import refinery_bench_noop as noop

    @flow(name="orchestration-bench")
    def bench_flow() -> dict:
        with DaskTaskRunner(address=address) as runner:
            runner.client.nthreads()   # connect before the clock starts
            c0, t0 = time.process_time(), time.perf_counter()
            ds = noop.Noop.call(str(root), [], noop.NoopConfig(shards=shards, tag=tag), runner=runner, fanout=fanout)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if ds.counts.get("shards") != shards:
            raise RuntimeError(f"{fanout}: {ds.counts} shards counted, {shards} expected")
        return {"wall": wall, "cpu": cpu}

    return bench_flow()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--old-tasks", type=int, default=200, help="shards for the one-Prefect-task-per-shard row")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    (tmp / "mod").mkdir()
    (tmp / "mod" / "refinery_bench_noop.py").write_text(NOOP_MODULE)
    sys.path.insert(0, str(tmp / "mod"))
    from prefect.testing.utilities import prefect_test_harness

    import refinery.tasks.runtime as runtime

    address, procs = start_cluster(tmp, args.workers)
    rows: dict[str, tuple[int, dict]] = {}
    try:
        with prefect_test_harness(server_startup_timeout=180):
            measure(address, tmp / "warm", 20, "engine", "warm")            # Prefect client, imports
            rows["engine"] = (args.shards, measure(address, tmp / "w", args.shards, "engine", "new"))
            rows["old, grouped"] = (args.shards, measure(address, tmp / "w", args.shards, "tasks", "old"))
            per_slot = runtime.TASKS_PER_SLOT
            runtime.TASKS_PER_SLOT = 1 << 30   # one Prefect task per shard
            try:
                rows["old, per task"] = (args.old_tasks, measure(address, tmp / "w", args.old_tasks, "tasks", "pertask"))
            finally:
                runtime.TASKS_PER_SLOT = per_slot
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"no-op shards on a local Dask cluster of {args.workers} single-thread workers; "
          "flow-process cost per shard of one stage call (plan, fan-out, gather, reduce, publish):")
    for name, (n, r) in rows.items():
        print(f"  {name:14s} {n:6d} shards: {r['wall']:8.2f} s wall = {1e3 * r['wall'] / n:7.2f} ms/shard; "
              f"flow-process CPU {1e3 * r['cpu'] / n:7.2f} ms/shard")
    new = rows["engine"][1]["wall"] / args.shards
    grouped = rows["old, grouped"][1]["wall"] / args.shards
    per_task = rows["old, per task"][1]["wall"] / args.old_tasks
    print(f"ratio old/new per shard: {grouped / new:.2f}x against the grouped old path on this 2-worker cluster, "
          f"{per_task / new:.1f}x against one Prefect task per shard (a cluster as wide as the work)")
    print(f"target <= 5 ms/shard at {args.shards} shards: {'met' if 1e3 * new <= 5 else 'NOT met'} "
          f"({1e3 * new:.2f} ms/shard)")


if __name__ == "__main__":
    main()
