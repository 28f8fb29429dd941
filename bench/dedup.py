"""Dedup benchmark: end-to-end MinHash dedup of >= 100,000 documents, against datatrove.

    .venv/bin/python bench/dedup.py [--docs 100000] [--skip-datatrove]

1. builds a corpus of ~2,000-character documents from real sentences (the shared quality and
   SFT data, sampled and recombined), with planted duplicates (10% exact up to case and
   punctuation, 10% near copies with ~2% of words substituted);
2. runs our ``minhash`` + ``lsh_bands`` + ``dedup`` stages (FineWeb defaults) in a child
   process: wall time, peak RSS, the largest traced peak of one ``lsh_bands`` shard (one band:
   model ``24 bytes x documents + 32 bytes x that band's pairs``) and the ``dedup`` clustering's
   traced peak (model ``32 bytes x documents + 16 bytes x pairs of one band``);
3. runs datatrove's MinHash pipeline (signatures, buckets, cluster, filter; same 5-grams,
   14 x 8) on the same parquet files, in its own virtualenv ``bench/.venv-datatrove`` (installed
   here, not a project dependency), with a whitespace word tokenizer (its default NLTK tokenizer
   needs a data download and is slower, so this is the stricter comparison);
4. measures signature throughput per core (CPU time) on the same documents;
5. computes the detected-duplicate rate by human label on copycat-judged-pairs.jsonl.

Prints a summary and the ratio datatrove_time / our_time; writes bench/results/dedup.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): keep it off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = (ROOT / ".." / "shared" / "data").resolve()
DT_VENV = ROOT / "bench" / ".venv-datatrove"


# --------------------------------------------------------------------------- corpus
def sentences() -> list[str]:
    out = []
    for name in ("quality/c4-demo.jsonl", "quality/dclm-majority.jsonl"):
        with open(DATA / name) as f:
            out += [json.loads(line)["text"] for line in f]
    for name in ("sft/alpaca_en_demo.json",):
        out += [r.get("output", "") + " " + r.get("instruction", "") for r in json.load(open(DATA / name))]
    for name in ("sft/self-instruct-seed-tasks.jsonl", "sft/self-instruct-user-oriented.jsonl"):
        with open(DATA / name) as f:
            out += [json.dumps(json.loads(line)) for line in f]
    sents = [s.strip() for t in out for s in t.replace("\n", " ").split(". ") if len(s.strip()) > 25]
    return sorted(set(sents))


def build_corpus(n: int, out_dir: Path, parts: int = 8, seed: int = 0) -> list[Path]:
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    sents = sentences()
    n_exact, n_near = n // 10, n // 10
    n_base = n - n_exact - n_near
    docs = []
    for _ in range(n_base):
        parts_, size = [], 0
        while size < 2000:
            s = rng.choice(sents)
            parts_.append(s)
            size += len(s) + 2
        docs.append(". ".join(parts_)[:2000])
    vocab = sorted({w for s in sents[:2000] for w in s.split()})
    for _ in range(n_exact):
        t = rng.choice(docs[:n_base])
        docs.append(t.upper() if rng.random() < 0.5 else t.replace(". ", "! "))
    for _ in range(n_near):
        toks = rng.choice(docs[:n_base]).split()
        for _ in range(max(1, len(toks) // 50)):
            toks[rng.randrange(len(toks))] = rng.choice(vocab)
        docs.append(" ".join(toks))
    order = list(range(len(docs)))
    rng.shuffle(order)
    base = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    per = -(-len(docs) // parts)
    for k in range(parts):
        idx = order[k * per:(k + 1) * per]
        table = pa.table({
            "id": [f"doc{i:07d}" for i in idx], "text": [docs[i] for i in idx],
            "url": [f"https://example.com/{i}" for i in idx], "source": ["bench"] * len(idx),
            "crawl_date": pa.array([base + dt.timedelta(minutes=i) for i in idx], pa.timestamp("us", tz="UTC")),
            "metadata": [None] * len(idx)})
        f = out_dir / f"part-{k:05d}.parquet"
        pq.write_table(table, f)
        files.append(f)
    return files


def publish_docs(root: Path, files: list[Path]):
    from refinery.tasks.store import Store, fingerprint

    store = Store(root)
    fp = fingerprint("bench-docs", "1", {"files": [f.name for f in files], "bytes": [f.stat().st_size for f in files]}, [])
    found = store.get("bench-docs", fp)
    if found:
        return found
    b = store.builder("bench-docs", fp)
    import pyarrow.parquet as pq

    for f in files:
        b.write_table(f.name, pq.read_table(f))
    return b.publish(version="1", config={}, inputs=[])


# --------------------------------------------------------------------------- runs
def run_child(cmd: list[str], env: dict | None = None) -> tuple[float, float, str, float]:
    """(wall seconds, peak RSS MiB of the child tree's largest process, stdout, CPU seconds of
    the child and its descendants: unlike wall time, not inflated by other load on the machine)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed with status {status}")
    return wall, ru.ru_maxrss / 1024, out, ru.ru_utime + ru.ru_stime


def ours_child(workdir: str, docs_path: str) -> None:
    """In the child: run both stages (sequential shards) and print a JSON summary."""
    from refinery.tasks.dedup.stage import DedupConfig, run_dedup
    from refinery.tasks.store import Store

    t = time.perf_counter()
    res = run_dedup(Store(workdir), docs_path, DedupConfig())
    d, s, bands = res["dedup"], res["minhash"], res["lsh_bands"]
    print(json.dumps({"seconds": time.perf_counter() - t, "counts": d.counts, "stats": d.manifest["stats"],
                      "signature_stats": s.manifest["stats"], "bands_stats": bands.manifest["stats"],
                      "bands_counts": bands.counts}))


DT_SCRIPT = textwrap.dedent('''
    import sys, time
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def __init__(self):
            super().__init__("en")
        def word_tokenize(self, text):
            return text.split()
        def sent_tokenize(self, text):
            return [text]
        def span_tokenize(self, text):
            return []

    data, work, parts = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = MinhashConfig()  # 5-grams, 14 buckets x 8 hashes (FineWeb)
    t = time.perf_counter()
    kw = dict(logging_dir=f"{work}/logs", workers=1)
    LocalPipelineExecutor(pipeline=[ParquetReader(data, id_key="id", glob_pattern="*.parquet"),
                                    MinhashDedupSignature(f"{work}/sigs", config=cfg, language=Whitespace())],
                          tasks=parts, **{**kw, "logging_dir": f"{work}/logs/s"}).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)],
                          tasks=cfg.num_buckets, **{**kw, "logging_dir": f"{work}/logs/b"}).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=cfg)],
                          tasks=1, **{**kw, "logging_dir": f"{work}/logs/c"}).run()
    LocalPipelineExecutor(pipeline=[ParquetReader(data, id_key="id", glob_pattern="*.parquet"), MinhashDedupFilter(f"{work}/remove"),
                                    ParquetWriter(f"{work}/out")],
                          tasks=parts, **{**kw, "logging_dir": f"{work}/logs/f"}).run()
    print("DATATROVE_SECONDS", time.perf_counter() - t)
''')


def ensure_datatrove() -> Path:
    py = DT_VENV / "bin" / "python"
    if not py.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(DT_VENV)])
    probe = "import datatrove.pipeline.dedup.minhash, datatrove.pipeline.readers, datatrove.pipeline.writers"
    ok = subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0
    if not ok:
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", "datatrove==0.10.1", "pyarrow", "xxhash<4",
                               "orjson", "zstandard", "tokenizers"])
        subprocess.check_call([str(py), "-c", probe])
    return py


# --------------------------------------------------------------------------- copycat
def copycat_table(threshold: float = 0.8) -> list[dict]:
    import numpy as np

    from refinery.tasks.dedup.clusters import jaccard
    from refinery.tasks.dedup.minhash import MinHasher, band_keys

    rows = [json.loads(line) for line in open(DATA / "dedup" / "copycat-judged-pairs.jsonl")]
    mh = MinHasher()
    texts = [r["src"] for r in rows] + [r["target"] for r in rows]
    sig, nsh = mh.signatures(texts)
    keys = band_keys(sig, 14, 8, empty=nsh == 0)
    sets = mh.shingle_sets(texts)
    n = len(rows)
    by: dict[str, list] = {}
    for i, r in enumerate(rows):
        cand = bool(((keys[i] == keys[n + i]) & (keys[i] != 0)).any())
        j = jaccard(sets[i], sets[n + i])
        label = {"unkown": "unknown", "0.5s": "0.5"}.get(str(r["label"]), str(r["label"]))  # typos in the source
        by.setdefault(label, []).append((cand, cand and j >= threshold, j))
    def label_order(k: str):
        try:
            return (0, float(k))
        except ValueError:  # "unknown" (and its misspellings in the source data) last
            return (1, 0.0)

    order = sorted(by, key=label_order)
    return [{"label": k, "pairs": len(by[k]),
             "mean_jaccard": round(float(np.mean([x[2] for x in by[k]])), 3),
             "detected_lsh": round(sum(x[0] for x in by[k]) / len(by[k]), 3),
             "detected_verified": round(sum(x[1] for x in by[k]) / len(by[k]), 3)} for k in order]


def signature_speed(files: list[Path], limit: int = 20000) -> float:
    import pyarrow.parquet as pq

    from refinery.tasks.dedup.minhash import MinHasher

    texts = pq.read_table(files[0], columns=["text"]).column("text").combine_chunks()[:limit]
    mh = MinHasher()
    mh.signatures(texts[:10])
    best = 0.0
    for _ in range(3):
        t = time.process_time()
        for i in range(0, len(texts), 2048):
            mh.signatures(texts[i:i + 2048])
        best = max(best, len(texts) / (time.process_time() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--work", default=str(ROOT / "bench" / "results" / "dedup-work"))
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--_ours", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._ours:
        ours_child(*args._ours)
        return
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent: the benchmark needs the shared data")
    import shutil

    work = Path(args.work)
    stamp = work / "corpus" / f"built-{args.docs}.json"
    if stamp.exists():  # the corpus is deterministic (seed 0): reuse it
        files = [Path(f) for f in json.loads(stamp.read_text())]
        for sub in ("store", "dt"):
            shutil.rmtree(work / sub, ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        print(f"building {args.docs} documents ...", file=sys.stderr)
        files = build_corpus(args.docs, work / "corpus")
        stamp.write_text(json.dumps([str(f) for f in files]))
    docs = publish_docs(work / "store", files)
    text_mb = sum(f.stat().st_size for f in files) / 2**20

    env = {**os.environ, "REFINERY_DEDUP_TRACEMALLOC": "1"}
    wall, peak, out, cpu = run_child([sys.executable, __file__, "--_ours", str(work / "store"), docs.path], env)
    ours = json.loads(out.strip().splitlines()[-1])
    mem = ours["stats"]["memory_model_bytes"]
    result = {"docs": args.docs, "parquet_mb": round(text_mb, 1), "ours_seconds": round(wall, 2),
              "ours_cpu_seconds": round(cpu, 2),
              "ours_peak_rss_mb": round(peak, 1), "ours_counts": ours["counts"],
              "ours_signature_stage_seconds": ours["signature_stats"]["signature_seconds"],
              "cluster_histogram": ours["stats"]["cluster_size_histogram"],
              "memory_model": mem, "signature_docs_per_sec_per_core": round(signature_speed(files)),
              "band_shard_memory": {"traced_peak_bytes": ours["bands_stats"]["traced_peak_bytes_per_shard"],
                                    "model_bytes": ours["bands_stats"]["memory_model_bytes_per_shard"],
                                    "max_pairs_per_band": max(ours["bands_counts"]["pairs_per_key"].values(), default=0)},
              "copycat": copycat_table()}
    print(f"ours: {wall:.1f}s wall, {cpu:.1f}s CPU, peak RSS {peak:.0f} MiB, counts {ours['counts']}")
    bm = result["band_shard_memory"]
    print(f"lsh_bands memory per shard (one band): measured {bm['traced_peak_bytes'] / 2**20:.2f} MiB, "
          f"model 24 B x {mem['docs']} docs + 32 B x {bm['max_pairs_per_band']} pairs = {bm['model_bytes'] / 2**20:.2f} MiB")
    print(f"dedup clustering memory: measured {mem['measured_cluster_peak'] / 2**20:.2f} MiB, "
          f"model {mem['per_doc_in_pairs']} B x {mem['docs_in_pairs']} docs in pairs (of {mem['docs']}) + "
          f"{mem['per_pair']} B x {mem['max_pairs_per_key']} pairs = {mem['estimate'] / 2**20:.2f} MiB")
    print(f"signatures: {result['signature_docs_per_sec_per_core']} docs/s/core (CPU time)")

    if not args.skip_datatrove:
        py = ensure_datatrove()
        script = work / "datatrove_run.py"
        script.write_text(DT_SCRIPT)
        dt_wall, dt_peak, dt_out, dt_cpu = run_child([str(py), str(script), str(work / "corpus"), str(work / "dt"), str(len(files))])
        removed = 0
        for f in (work / "dt" / "remove").glob("*.remove"):
            removed += f.stat().st_size // 4
        result.update({"datatrove_seconds": round(dt_wall, 2), "datatrove_cpu_seconds": round(dt_cpu, 2),
                       "datatrove_peak_rss_mb": round(dt_peak, 1), "datatrove_removed": removed,
                       "speedup_vs_datatrove": round(dt_wall / wall, 2),
                       "cpu_speedup_vs_datatrove": round(dt_cpu / cpu, 2)})
        print(f"datatrove: {dt_wall:.1f}s wall, {dt_cpu:.1f}s CPU, peak RSS {dt_peak:.0f} MiB, removed {removed}")
        print(f"RATIO datatrove/ours = {dt_wall / wall:.2f}x wall, {dt_cpu / cpu:.2f}x CPU time")

    print("\ncopycat judged pairs: detected-duplicate rate by label (5-grams, 14x8, verify at 0.8)")
    print("| label | pairs | mean Jaccard | detected (LSH) | detected (verified) |\n|---|---|---|---|---|")
    for r in result["copycat"]:
        print(f"| {r['label']} | {r['pairs']} | {r['mean_jaccard']} | {r['detected_lsh']} | {r['detected_verified']} |")
    # a run without datatrove keeps the full run's results file intact
    out_path = ROOT / "bench" / "results" / ("dedup-ours.json" if args.skip_datatrove else "dedup.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
