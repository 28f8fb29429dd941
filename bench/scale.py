"""Curate-flow throughput on a Dask cluster with 1 and 2 worker processes (this 2-core machine),
as a ratio, plus an estimate of time and cost for one Common Crawl snapshot on N workers.

    .venv/bin/python bench/scale.py [--pages 6000] [--files 8] [--repeats 3]

Baseline: the same flow, same input, on a 1-worker cluster, in the same run. Runs alternate
1 worker / 2 workers ``--repeats`` times against one Prefect server (its start is not timed), each
on a fresh output folder; the median of the per-pair ratios (the headline: a pair runs back to
back, so a shared machine's speed drifts cancel best there), of the median runs and of the best
runs are printed. Each cluster is "existing": started, and its workers' imports done, before the
clock starts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process (flow, Dask scheduler) and its children, by role."""
    import psutil

    me = psutil.Process()
    out = {"flow process + scheduler": sum(me.cpu_times()[:2])}
    for ch in me.children(recursive=True):
        try:
            cmd = " ".join(ch.cmdline())
            role = "Prefect server" if "uvicorn" in cmd else "Dask workers" if "spawn" in cmd else "other"
            out[role] = out.get(role, 0.0) + sum(ch.cpu_times()[:2])
        except psutil.Error:
            pass
    return out


def run(glob: str, warm_glob: str, workdir: Path, workers: int) -> tuple[float, dict, dict]:
    """Time one curate flow run on a fresh cluster of ``workers`` processes, after an untimed run
    on a small crawl (an existing cluster's workers have imported the stages, loaded the
    language-ID model and the compiled kernels, and opened their Prefect client)."""
    from distributed import LocalCluster

    from refinery.flows.curate import CurateParams, curate_flow

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        curate_flow.run_params(CurateParams(input=warm_glob, workdir=str(workdir) + "-warm",
                                            task_runner=c.scheduler_address))
        c0, t0 = cpu_seconds(), time.perf_counter()
        out = curate_flow.run_params(CurateParams(input=glob, workdir=str(workdir), task_runner=c.scheduler_address))
        secs, c1 = time.perf_counter() - t0, cpu_seconds()
        return secs, out, {k: v - c0.get(k, 0.0) for k, v in c1.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=6000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from refinery.tasks.demo.crawl import make_demo_crawl

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    files = make_demo_crawl(tmp / "crawl", seed=0, n_pages=args.pages, n_files=args.files)
    glob = str(Path(files[0]).parent / "*.warc.gz")
    warm = make_demo_crawl(tmp / "warm", seed=1, n_pages=200, n_files=2)
    warm_glob = str(Path(warm[0]).parent / "*.warc.gz")
    from prefect.testing.utilities import prefect_test_harness

    times: dict[int, list[float]] = {1: [], 2: []}
    outs: dict[int, dict] = {}
    with prefect_test_harness(server_startup_timeout=120):  # one server for all runs: its start is not timed
        for r in range(args.repeats):
            for workers in (1, 2):
                secs, out, cpu = run(glob, warm_glob, tmp / f"w{workers}-{r}", workers)
                docs = out["counts"]["ingest"].get("docs_out") or out["counts"]["ingest"].get("docs_in")
                times[workers].append(secs)
                outs[workers] = out
                work = sum(json.loads((Path(p) / "manifest.json").read_text())["stats"].get("seconds", 0.0)
                           for p in out["outputs"].values())
                print(f"run {r}: workers={workers}: {secs:.1f} s, {docs / secs:.1f} docs/s; stage work {work:.1f} s; "
                      "CPU s " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items())), flush=True)
    out1 = outs[1]
    med = {w: statistics.median(t) for w, t in times.items()}
    best = {w: min(t) for w, t in times.items()}
    t1 = med[1]
    pairs = sorted(a / b for a, b in zip(times[1], times[2]))   # back-to-back runs share the machine's mood
    print(f"speed-up 2 workers vs 1 worker (same run): {statistics.median(pairs):.2f}x median of the per-pair "
          f"ratios ({', '.join(f'{x:.2f}' for x in pairs)}); {med[1] / med[2]:.2f}x on median runs "
          f"({med[1]:.1f} s -> {med[2]:.1f} s), {best[1] / best[2]:.2f}x on best runs "
          f"({best[1]:.1f} s -> {best[2]:.1f} s)")

    # Per-core rate of the sharded stages (ingest, filter, minhash) from the 1-worker run.
    stage_secs = {}
    for stage, path in out1["outputs"].items():
        m = json.loads((Path(path) / "manifest.json").read_text())
        stage_secs[stage] = m.get("stats", {}).get("seconds", 0.0)
    per_core = docs / sum(stage_secs.values())
    print("stage work seconds (1 worker):", {k: round(v, 2) for k, v in stage_secs.items()})
    print(f"per-core rate from the stages' work seconds: {per_core:.1f} docs/s "
          f"(flow wall rate with orchestration: {docs / t1:.1f} docs/s)")
    # Stage work only (no orchestration, no global dedup step): a lower bound on time and cost. The
    # README's snapshot estimate uses bench/curate_scale.py's end-to-end rate instead.
    print("snapshot estimate from the stages' work alone (lower bound; the README's headline uses "
          "bench/curate_scale.py's end-to-end rate):")
    for n_workers, cores in ((100, 16), (1000, 16)):
        hours = CC_PAGES / (per_core * n_workers * cores) / 3600
        cost = hours * n_workers * cores * CORE_HOUR_USD
        print(f"  CC snapshot ({CC_PAGES:.0e} pages) on {n_workers} workers x {cores} cores: "
              f"time = pages / (rate * workers * cores) = {hours:.1f} h, "
              f"cost = hours * cores * ${CORE_HOUR_USD}/core-h = ${cost:,.0f}")


if __name__ == "__main__":
    main()
