"""Decontamination benchmark: documents per second per core against the filter stage on the same
documents, and the benchmark index's memory per n-gram.

    .venv/bin/python bench/decontaminate.py [--repeat 3] [--copies 4] [--json out.json]

Documents: ../shared/data/quality/dclm-majority.jsonl and c4-demo.jsonl (799 real web pages),
``--copies`` times. Benchmark: ../shared/data/eval/gsm8k-test.jsonl (questions and answers, 2,638
texts), 13-grams. Both sides run in memory on one core (this process), best of ``--repeat``:
``decontaminate_table`` with the GSM8K index, and ``filter_table`` with the default filter chain.
Index memory: the arrays' bytes per distinct n-gram, and the process's peak RSS growth while
building it (the texts and the per-text arrays included).
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like standard modules (e.g. tokenize.py): never import from it by accident
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import resource
import time

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()


def load_docs(copies: int):
    import pyarrow as pa

    texts = []
    for name in ("dclm-majority.jsonl", "c4-demo.jsonl"):
        with open(DATA / "quality" / name) as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    texts = texts * copies
    return pa.table({"id": [str(i) for i in range(len(texts))], "text": texts,
                     "url": [None] * len(texts)}, schema=pa.schema([("id", pa.string()), ("text", pa.string()),
                                                                    ("url", pa.string())]))


def build_index(n: int):
    from refinery.tasks.decontam.benchmarks import file_texts
    from refinery.tasks.decontam.ngrams import NgramIndex, ngram_hashes, word_hashes, words

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    texts = file_texts(str(DATA / "eval" / "gsm8k-test.jsonl"), [])
    index = NgramIndex.build(n, [("gsm8k", [ngram_hashes(word_hashes(words(t)), n) for t in texts])])
    seconds = time.perf_counter() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    return index, {"texts": len(texts), "ngrams": len(index.hashes), "index_bytes": index.nbytes,
                   "bytes_per_ngram": round(index.nbytes / len(index.hashes), 2), "build_seconds": round(seconds, 3),
                   "peak_rss_growth_mb": round(rss_kb / 1024, 1)}


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--copies", type=int, default=4, help="repeat the 799 documents this many times")
    ap.add_argument("--n", type=int, default=13)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"bench/decontaminate.py: {DATA} is absent", file=sys.stderr)
        return 2
    from refinery.tasks.decontam.stage import DecontamConfig, decontaminate_table
    from refinery.tasks.filters.stage import FilterChain, FilterConfig, filter_table

    index, idx_stats = build_index(args.n)
    table = load_docs(args.copies)
    docs = table.num_rows
    dcfg = DecontamConfig(sources=["gsm8k"], n=args.n)
    fcfg = FilterConfig()
    _, excluded, counts = decontaminate_table(table, index, dcfg)
    t_dec = best(lambda: decontaminate_table(table, index, dcfg), args.repeat)
    t_par = best(lambda: decontaminate_table(table, index, dcfg.model_copy(update={"policy": "drop_paragraph"})),
                 args.repeat)
    t_fil = best(lambda: filter_table(table, fcfg, FilterChain(fcfg)), args.repeat)
    out = {"documents": docs, "flagged": counts["dropped"], "n": args.n, "index": idx_stats,
           "decontaminate_docs_per_sec_per_core": round(docs / t_dec, 1),
           "decontaminate_drop_paragraph_docs_per_sec_per_core": round(docs / t_par, 1),
           "filter_default_chain_docs_per_sec_per_core": round(docs / t_fil, 1),
           "decontaminate_vs_filter": round(t_fil / t_dec, 2)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
