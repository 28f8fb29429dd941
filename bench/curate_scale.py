"""Curate at growing crawl sizes on a local cluster: end-to-end docs/s/core and the peak RSS of
every process per stage, to show what grows with the crawl and what does not.

    .venv/bin/python bench/curate_scale.py --pages 25000,50000,100000 [--workers 2] [--runner dask]

For each size: a crawl from ``bench/make_crawl.py`` (not timed, written in its own process), a fresh cluster of ``--workers``
single-thread worker processes (``dask``: a Dask LocalCluster; ``ray``: a local Ray cluster,
``task_runner=ray:N``), then one ``curate`` flow run, timed end to end (every stage: ingest,
filter, the dedup steps). One Prefect server serves every run (its start is not timed).

Each size runs in a process of its own (its own Prefect server: its start is not timed either).
Peak RSS per stage: before each stage the kernel's high-water mark of every process is reset
(``/proc/PID/clear_refs``) and read after it (``VmHWM``), plus a 0.2 s sampler as a fallback.
"flow" is this process: the flow, each stage's reduce step (dedup's global clustering runs
there), the Prefect client and, for Dask, the scheduler; "worker" is the largest of the workers.
The last lines give, per stage, how each peak grows per million documents between the smallest and
the largest size (what a whole snapshot would add).

``--dedup-only`` measures the three dedup stages alone (``minhash``, ``lsh_bands`` on the workers,
the global ``dedup`` step in this process), from a documents dataset instead of a crawl, so that
sizes whose whole curate flow would take hours fit in minutes; same cluster, same memory windows:

    .venv/bin/python bench/curate_scale.py --dedup-only --pages 100000,200000,400000

Its documents (written by a process of its own, not timed) stand for the filter stage's output
of a crawl from ``bench/make_crawl.py``: the demo crawl's real prose (standard-library
docstrings), each document 24 of its ~4,100 sentences drawn at random (~1,900 characters, four
paragraphs), 3% exact duplicates and 3% near-duplicates (4 words replaced by synonyms, as the
crawl plants them), the documents' schema (id, text, url, source, crawl_date, metadata) in parts of
2,500 documents. Sentences rather than whole paragraphs: remixing the crawl's ~1,000 paragraphs,
documents share so many of them that the share of documents in candidate pairs would grow with
the size (22% at 100,000, 39% at 400,000), and a growth per million documents would measure that
rather than the code; with sentences it stays that of the planted duplicates.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
# bench/tokenize.py would shadow the stdlib module: never import from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


def _hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_hwm(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass   # not Linux, or not allowed: the sampler's figures stand


class StageMemory:
    """Peak RSS (MB) of each watched process during each stage, from the kernel's high-water mark
    (reset at the stage's start) and a sampler thread."""

    def __init__(self, pids: dict[str, int]):
        import psutil

        self.procs = {role: psutil.Process(pid) for role, pid in pids.items()}
        self.current: str | None = None
        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _note(self, stage: str, role: str, mb: float | None) -> None:
        if mb is not None:
            row = self.peaks.setdefault(stage, {})
            row[role] = max(row.get(role, 0.0), mb)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            stage = self.current
            if stage is None:
                continue
            for role, p in self.procs.items():
                try:
                    self._note(stage, role, p.memory_info().rss / 2 ** 20)
                except Exception:  # noqa: BLE001 - a process that went away
                    pass

    def start(self, stage: str) -> None:
        for p in self.procs.values():
            _reset_hwm(p.pid)
        self.current = stage

    def end(self, stage: str) -> None:
        self.current = None
        for role, p in self.procs.items():
            self._note(stage, role, _hwm_mb(p.pid))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def watch_stages(memory_ref: list) -> None:
    """Wrap ``Stage.call`` so each stage call starts and ends a memory window."""
    from refinery.tasks import runtime

    original = runtime.Stage.call

    def call(self, *args, **kwargs):
        mem = memory_ref[0]
        if mem is None:
            return original(self, *args, **kwargs)
        mem.start(self.name)
        try:
            return original(self, *args, **kwargs)
        finally:
            mem.end(self.name)

    runtime.Stage.call = call


def ensure_crawl(crawl_dir: Path, pages: int) -> None:
    """The crawl, written by bench/make_crawl.py in a process of its own (generating 100k pages
    takes a few hundred MB that this process, whose peak is measured, must not carry)."""
    truth = crawl_dir / "ground_truth.json"
    if truth.exists() and json.loads(truth.read_text()).get("n_pages") == pages:
        return
    subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "make_crawl.py"), "--pages", str(pages),
                    "--out", str(crawl_dir)], check=True, stdout=sys.stderr)


SENTENCES_PER_DOC = 24
DOCS_PER_PART = 2500


def make_docs(out: Path, n: int, seed: int = 0) -> None:
    """A documents dataset of ``n`` documents (see the module docstring) under ``out``."""
    import datetime as dt
    import random
    import re

    import pyarrow as pa

    from refinery.tasks.demo.crawl import _edit_words, corpus_articles
    from refinery.tasks.store import Store, fingerprint

    rng = random.Random(seed)
    sentences = sorted({s.strip() for _, paras in corpus_articles() for p in paras
                        for s in re.split(r"(?<=[.!?])\s+", p.text) if len(s.split()) >= 6})
    texts: list[str] = []
    kinds = {"exact": 0, "near": 0}
    for i in range(n):
        r = rng.random()
        if i > 100 and r < 0.03:
            texts.append(texts[rng.randrange(len(texts))])
            kinds["exact"] += 1
        elif i > 100 and r < 0.06:
            texts.append(_edit_words(rng, texts[rng.randrange(len(texts))])[0])
            kinds["near"] += 1
        else:
            picks = rng.sample(sentences, SENTENCES_PER_DOC)
            texts.append("\n\n".join(" ".join(picks[k:k + 6]) for k in range(0, SENTENCES_PER_DOC, 6)))
    day = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
    store = Store(out)
    b = store.builder("docs", fingerprint("bench-docs", "1", {"n": n, "seed": seed}, []))
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("url", pa.string()), ("source", pa.string()),
                        ("crawl_date", pa.timestamp("us", tz="UTC")), ("metadata", pa.string())])
    for k in range(0, n, DOCS_PER_PART):
        rows = range(k, min(n, k + DOCS_PER_PART))
        b.write_table(f"part-{k // DOCS_PER_PART:05d}.parquet", pa.table({
            "id": [f"{i:012x}" for i in rows], "text": texts[k:k + len(rows)],
            "url": [f"https://site{i % 997}.example/{i}" for i in rows], "source": ["bench"] * len(rows),
            "crawl_date": [day + dt.timedelta(days=i % 30) for i in rows],
            "metadata": [json.dumps({"quality_score": round((i * 7919 % 1000) / 1000, 3)}) for i in rows]},
            schema=schema))
    ds = b.publish(version="1", config={"n": n, "seed": seed}, inputs=[], counts={"docs_out": n, "planted": kinds})
    (out / "docs.json").write_text(json.dumps({"n": n, "path": ds.path, "planted": kinds}))


def ensure_docs(out: Path, n: int) -> str:
    """The documents dataset's path, written by this script in a process of its own."""
    info = out / "docs.json"
    if not (info.exists() and json.loads(info.read_text()).get("n") == n):
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, __file__, "--make-docs", str(n), "--tmp", str(out)], check=True, stdout=sys.stderr)
    return json.loads(info.read_text())["path"]


def dedup_flow_fn():
    """A flow of the three dedup stages on a documents dataset (the curate flow's dedup part)."""
    from prefect import flow

    @flow(name="dedup-scale")
    def dedup_scale(docs: str, workdir: str, task_runner: str) -> dict:
        from refinery.tasks.dedup.stage import DedupConfig, dedup_stages
        from refinery.tasks.runtime import make_runner

        with make_runner(task_runner) as runner:
            out = dedup_stages(workdir, docs, DedupConfig(), runner=runner)
        return {"counts": {name: ds.counts for name, ds in out.items()}}

    return dedup_scale


def run_size(pages: int, tmp: Path, workers: int, runner: str, memory_ref: list, dedup_only: bool = False) -> dict:
    if dedup_only:
        return run_dedup_size(pages, tmp, workers, memory_ref)
    from refinery.flows.curate import CurateParams, curate_flow

    crawl_dir = tmp / f"crawl-{pages}"
    ensure_crawl(crawl_dir, pages)
    glob = str(crawl_dir / "*.warc.gz")
    workdir = tmp / f"work-{pages}"
    shutil.rmtree(workdir, ignore_errors=True)   # a fresh run: no stage may come from a cache
    if runner == "ray":
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            pids = {"flow": os.getpid()}
            pids.update({f"worker{i}": pid for i, pid in enumerate(_ray_worker_pids(workers))})
            return _timed(curate_flow, CurateParams(input=glob, workdir=str(workdir), task_runner=f"ray:{workers}"),
                          pids, memory_ref, pages, workers)
        finally:
            ray.shutdown()
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = {"flow": os.getpid()}
        pids.update({f"worker{i}": pid for i, pid in enumerate(client.run(os.getpid).values())})
        return _timed(curate_flow, CurateParams(input=glob, workdir=str(workdir), task_runner=cluster.scheduler_address),
                      pids, memory_ref, pages, workers)


def run_dedup_size(n: int, tmp: Path, workers: int, memory_ref: list) -> dict:
    from distributed import Client, LocalCluster

    docs = ensure_docs(tmp / f"docs-{n}", n)
    workdir = tmp / f"work-dedup-{n}"
    shutil.rmtree(workdir, ignore_errors=True)
    flow = dedup_flow_fn()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = {"flow": os.getpid()}
        pids.update({f"worker{i}": pid for i, pid in enumerate(client.run(os.getpid).values())})
        memory_ref[0] = mem = StageMemory(pids)
        t0 = time.perf_counter()
        try:
            out = flow(docs=docs, workdir=str(workdir), task_runner=cluster.scheduler_address)
        finally:
            secs = time.perf_counter() - t0
            memory_ref[0] = None
            mem.close()
    c = out["counts"]
    return {"pages": n, "docs": c["minhash"]["docs_in"], "seconds": secs, "workers": workers, "peaks": mem.peaks,
            "kept": c["dedup"]["docs_out"], "pairs": c["lsh_bands"]["candidate_pairs"]}


def _ray_worker_pids(n: int) -> list[int]:
    import ray

    @ray.remote
    def pid() -> int:
        time.sleep(0.5)
        return os.getpid()

    return sorted(set(ray.get([pid.remote() for _ in range(n * 2)])))


def _timed(flow, params, pids: dict, memory_ref: list, pages: int, workers: int) -> dict:
    memory_ref[0] = mem = StageMemory(pids)
    t0 = time.perf_counter()
    try:
        out = flow.run_params(params)
    finally:
        secs = time.perf_counter() - t0
        memory_ref[0] = None
        mem.close()
    docs = out["counts"]["ingest"].get("docs_out", 0)
    return {"pages": pages, "docs": docs, "seconds": secs, "workers": workers, "peaks": mem.peaks,
            "kept": out["counts"][list(out["counts"])[-1]].get("docs_out")}


def report(rows: list[dict]) -> None:
    print("\nend to end (every curate stage, one flow run):")
    print(f"{'pages':>8} {'docs':>8} {'kept':>8} {'seconds':>8} {'docs/s':>8} {'docs/s/core':>12}")
    for r in rows:
        rate = r["docs"] / r["seconds"]
        print(f"{r['pages']:8d} {r['docs']:8d} {r['kept'] or 0:8d} {r['seconds']:8.1f} {rate:8.1f} "
              f"{rate / r['workers']:12.1f}")
    stages = list(rows[0]["peaks"])
    print("\npeak RSS per stage, MB (flow = this process: flow, reduce steps, scheduler; worker = largest worker):")
    print(f"{'stage':24s}" + "".join(f"{'flow@' + str(r['pages']):>14}{'worker@' + str(r['pages']):>16}" for r in rows))
    for st in stages:
        line = f"{st:24s}"
        for r in rows:
            pk = r["peaks"].get(st, {})
            wk = max((v for k, v in pk.items() if k.startswith("worker")), default=0.0)
            line += f"{pk.get('flow', 0.0):14.0f}{wk:16.0f}"
        print(line)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        per_m = 1e6 / max(1, b["docs"] - a["docs"])
        print(f"\ngrowth of the peaks per million documents ({a['pages']} -> {b['pages']} pages):")
        for st in stages:
            pa, pb = a["peaks"].get(st, {}), b["peaks"].get(st, {})
            wa = max((v for k, v in pa.items() if k.startswith("worker")), default=0.0)
            wb = max((v for k, v in pb.items() if k.startswith("worker")), default=0.0)
            print(f"  {st:22s} flow {(pb.get('flow', 0) - pa.get('flow', 0)) * per_m:+9.0f} MB/M docs   "
                  f"worker {(wb - wa) * per_m:+9.0f} MB/M docs")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", default="25000,50000,100000", help="comma-separated crawl sizes")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runner", choices=["dask", "ray"], default="dask")
    ap.add_argument("--tmp", default="", help="working folder (default: a new temporary folder)")
    ap.add_argument("--dedup-only", action="store_true",
                    help="the dedup stages alone, on generated documents (--pages: documents)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # child: one size, a JSON line
    ap.add_argument("--make-docs", type=int, default=0, help=argparse.SUPPRESS)   # child: write documents
    args = ap.parse_args()
    if args.make_docs:
        make_docs(Path(args.tmp), args.make_docs)
        return
    sizes = [int(x) for x in args.pages.split(",") if x.strip()]
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="bench-curate-scale-"))
    if not args.one:
        # Each size in a fresh process: this process's peak would otherwise carry the last size's.
        rows = []
        for pages in sizes:
            cmd = [sys.executable, __file__, "--one", "--pages", str(pages), "--workers", str(args.workers),
                   "--runner", args.runner, "--tmp", str(tmp)] + (["--dedup-only"] if args.dedup_only else [])
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                raise SystemExit(f"{pages} pages: the run failed (exit {proc.returncode})")
            r = json.loads(lines[-1])
            rows.append(r)
            (tmp / "rows.json").write_text(json.dumps(rows))   # what finished, should a later size not
            print(f"{pages} pages: {r['docs']} docs in {r['seconds']:.1f} s "
                  f"({r['docs'] / r['seconds'] / args.workers:.1f} docs/s/core)", flush=True)
        report(rows)
        return
    from prefect.testing.utilities import prefect_test_harness

    memory_ref: list = [None]
    watch_stages(memory_ref)
    with prefect_test_harness(server_startup_timeout=180):
        r = run_size(sizes[0], tmp, args.workers, args.runner, memory_ref, dedup_only=args.dedup_only)
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
