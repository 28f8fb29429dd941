"""Curate-flow throughput on a Dask cluster with 1 and 2 worker processes (this 2-core machine),
as a ratio, plus an estimate of time and cost for one Common Crawl snapshot on N workers.

    .venv/bin/python bench/scale.py [--pages 3000] [--files 8]

Baseline: the same flow, same input, on a 1-worker cluster, in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# bench/tokenize.py would shadow the stdlib module: never import from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CC_PAGES = 3.0e9          # pages in one Common Crawl snapshot (order of magnitude of recent ones)
CORE_HOUR_USD = 0.02      # assumed on-demand price of one vCPU-hour on a compute-optimised instance


def run(glob: str, workdir: Path, workers: int) -> tuple[float, dict]:
    from distributed import LocalCluster

    from flows.curate import CurateParams, curate_flow

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        t0 = time.perf_counter()
        out = curate_flow.run_params(CurateParams(input=glob, workdir=str(workdir), task_runner=c.scheduler_address))
        return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=3000)
    ap.add_argument("--files", type=int, default=8)
    args = ap.parse_args()
    from tasks.demo.crawl import make_demo_crawl

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    files = make_demo_crawl(tmp / "crawl", seed=0, n_pages=args.pages, n_files=args.files)
    glob = str(Path(files[0]).parent / "*.warc.gz")
    from prefect.testing.utilities import prefect_test_harness

    results = {}
    with prefect_test_harness(server_startup_timeout=120):  # one server for both runs: its start is not timed
        for workers in (1, 2):
            secs, out = run(glob, tmp / f"w{workers}", workers)
            docs = out["counts"]["ingest"].get("docs_out") or out["counts"]["ingest"].get("docs_in")
            results[workers] = (secs, docs, out)
            print(f"workers={workers}: {secs:.1f} s, {docs / secs:.1f} docs/s")
    (t1, docs, out1), (t2, _, _) = results[1], results[2]
    print(f"speed-up 2 workers vs 1 worker (same run): {t1 / t2:.2f}x")

    # Per-core rate of the sharded stages (ingest, filter, minhash) from the 1-worker run.
    stage_secs = {}
    for stage, path in out1["outputs"].items():
        m = json.loads((Path(path) / "manifest.json").read_text())
        stage_secs[stage] = m.get("stats", {}).get("seconds", 0.0)
    per_core = docs / sum(stage_secs.values())
    print("stage work seconds (1 worker):", {k: round(v, 2) for k, v in stage_secs.items()})
    print(f"per-core rate from the stages' work seconds: {per_core:.1f} docs/s "
          f"(flow wall rate with orchestration: {docs / t1:.1f} docs/s)")
    for n_workers, cores in ((100, 16), (1000, 16)):
        hours = CC_PAGES / (per_core * n_workers * cores) / 3600
        cost = hours * n_workers * cores * CORE_HOUR_USD
        print(f"CC snapshot ({CC_PAGES:.0e} pages) on {n_workers} workers x {cores} cores: "
              f"time = pages / (rate * workers * cores) = {hours:.1f} h, "
              f"cost = hours * cores * ${CORE_HOUR_USD}/core-h = ${cost:,.0f}")


if __name__ == "__main__":
    main()
