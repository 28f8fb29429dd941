"""Quality classifier benchmark: accuracy on human labels, and scoring speed against the filter stage.

    .venv/bin/python bench/quality.py [--repeat 3] [--json out.json]

Accuracy. A fastText classifier (DCLM recipe, trained by the ``quality_model`` stage) is trained on
NOTHING from the evaluation file: positives are the instruction/response texts of ../shared/data/sft
(alpaca_en_demo.json, self-instruct seed and user-oriented tasks), negatives are crawl text: three sets,
each reported (the English pages of the shared WARC files; those plus the project's demo crawl; those
plus the 300 C4 documents of quality/c4-demo.jsonl). Each classifier then scores the
499 human-labelled documents of quality/dclm-majority.jsonl (272 good, 227 bad) through the ``quality``
stage; we report ROC AUC and accuracy at 0.5, beside the default heuristic filter chain's keep/drop on
the same documents (keep = predicted good; as a 0/1 score its AUC is balanced accuracy).

Speed. fastText scoring (``score_table``) and the filter chain (``filter_table``) on the same documents
(the DCLM and C4 files), one process, alternating which runs first, best of --repeat runs each;
docs/s/core and the ratio fastText / filter measured in the same run.
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like standard modules (e.g. tokenize.py): never import from it by accident
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = (ROOT / ".." / "shared" / "data").resolve()


def roc_auc(scores: list[float], labels: list[int]) -> float:
    """Mann-Whitney U / (n_pos n_neg), ties counted half."""
    pairs = sorted(zip(scores, labels))
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j + 1) / 2          # ranks are 1-based
        rank_sum += avg_rank * sum(lab for _, lab in pairs[i:j])
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def warc_negatives(out: Path) -> Path:
    """English pages of the shared WARC files as a JSONL of {"text"} (crawl text, unfiltered)."""
    from refinery.tasks.ingest import IngestConfig, iter_documents

    rows = []
    for p in sorted((DATA / "warc").glob("*.warc.gz")):
        try:
            docs = list(iter_documents({"path": str(p), "source": "bench"}, IngestConfig(), {}))
        except Exception:
            continue   # the deliberately broken archives
        rows += [{"text": d["text"]} for d in docs if d["lang"] == "en" and d["text"].strip()]
    path = out / "warc-en.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load_eval() -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(DATA / "quality" / "dclm-majority.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            texts.append(r["text"])
            labels.append(int(r["label"]))
    return texts, labels


def docs_dataset(store, texts: list[str]):
    import pyarrow as pa

    b = store.builder("docs", "qualitybench0001")
    b.write_table("part-00000.parquet", pa.table({"id": [str(i) for i in range(len(texts))], "text": texts,
                                                   "url": [None] * len(texts), "lang": ["en"] * len(texts),
                                                   "metadata": ["{}"] * len(texts)}))
    return b.publish(version="1", config={}, inputs=[], counts={"docs": len(texts)})


def demo_negatives(out: Path, n_pages: int = 600) -> Path:
    """English pages of the project's demo crawl (planted spam, boilerplate, near-duplicates) as JSONL."""
    from refinery.tasks.demo.crawl import make_demo_crawl
    from refinery.tasks.ingest import IngestConfig, iter_documents

    rows = [{"text": d["text"]} for w in make_demo_crawl(out / "demo-crawl", n_pages=n_pages)
            for d in iter_documents({"path": str(w), "source": "bench"}, IngestConfig(), {}) if d["lang"] == "en"]
    path = out / "demo-en.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def accuracy(tmp: Path) -> dict:
    """One classifier per negative set (all trained through the quality_model stage, none selected by its
    result on the evaluation file), beside the heuristic chain."""
    from refinery.tasks.filters import FilterChain, FilterConfig
    from refinery.tasks.quality.stage import QualityConfig, run_quality
    from refinery.tasks.store import Dataset, Store

    sft = DATA / "sft"
    positive = [str(sft / "alpaca_en_demo.json"), str(sft / "self-instruct-seed-tasks.jsonl"),
                str(sft / "self-instruct-user-oriented.jsonl")]
    warc, demo, c4 = str(warc_negatives(tmp)), str(demo_negatives(tmp)), str(DATA / "quality" / "c4-demo.jsonl")
    negative_sets = {"shared WARC pages (en)": [warc], "demo crawl + WARC pages": [demo, warc],
                     "C4 sample + WARC pages": [c4, warc]}
    texts, labels = load_eval()
    n = len(labels)
    store = Store(str(tmp / "store"))
    docs = docs_dataset(store, texts)
    rows, model_path, histogram = [], None, None
    for name, negative in negative_sets.items():
        cfg = QualityConfig(model="fasttext", keep="all", positive=positive, negative=negative)
        out = run_quality(store, docs, cfg)
        ds = Dataset.open(out["quality"].path)
        table = ds.read_table(files=[ds.file(f["path"]) for f in ds.manifest["files"]
                                     if f["path"].startswith("part-")])
        by_id = {i: json.loads(m)["quality_score"] for i, m in zip(table.column("id").to_pylist(),
                                                                    table.column("metadata").to_pylist())}
        scores = [by_id[str(i)] for i in range(n)]
        pred = [1 if s >= 0.5 else 0 for s in scores]
        rows.append({"classifier": f"fastText, negatives: {name}", "train": out["quality_model"].counts,
                     "auc": round(roc_auc(scores, labels), 4),
                     "accuracy": round(sum(p == y for p, y in zip(pred, labels)) / n, 4), "kept": sum(pred)})
        if model_path is None:
            model_path = out["quality_model"].file(out["quality_model"].manifest["model"])
            histogram = out["quality"].counts["score_histogram"]
    chain = FilterChain(FilterConfig())
    heur = [1 if chain.apply(t, None, "en")[1] is None else 0 for t in texts]
    rows.append({"classifier": "heuristic chain (keep = good)", "auc": round(roc_auc([float(h) for h in heur], labels), 4),
                 "accuracy": round(sum(h == y for h, y in zip(heur, labels)) / n, 4), "kept": sum(heur)})
    return {"eval_docs": n, "good": sum(labels), "bad": n - sum(labels), "rows": rows,
            "histogram_first": histogram, "model_path": model_path}


def speed(model_path: str, repeat: int) -> dict:
    import pyarrow as pa

    from refinery.tasks.filters import FilterChain, FilterConfig
    from refinery.tasks.filters.stage import filter_table
    from refinery.tasks.quality.stage import FastTextScorer, QualityConfig, score_table

    texts = load_eval()[0]
    with open(DATA / "quality" / "c4-demo.jsonl", encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f]
    n = len(texts)
    table = pa.table({"id": [str(i) for i in range(n)], "text": texts, "url": [None] * n, "lang": ["en"] * n,
                      "metadata": ["{}"] * n})
    qcfg = QualityConfig(model="fasttext", path=model_path, keep="threshold")
    scorer = FastTextScorer(model_path, "hq")
    fcfg = FilterConfig(write_exclusions=False)

    def run_ft() -> float:
        t0 = time.perf_counter()
        score_table(table, qcfg, scorer, "fasttext")
        return time.perf_counter() - t0

    def run_filter() -> float:
        chain = FilterChain(fcfg)      # fresh per run: its word cache starts cold each time
        t0 = time.perf_counter()
        filter_table(table, fcfg, chain)
        return time.perf_counter() - t0

    ft, fl = [], []
    for r in range(repeat):
        order = [(run_ft, ft), (run_filter, fl)] if r % 2 == 0 else [(run_filter, fl), (run_ft, ft)]
        for fn, acc in order:
            acc.append(fn())
    best_ft, best_fl = min(ft), min(fl)
    return {"docs": n, "repeat": repeat, "fasttext_docs_per_s_core": round(n / best_ft, 1),
            "filter_docs_per_s_core": round(n / best_fl, 1), "fasttext_vs_filter": round(best_fl / best_ft, 2),
            "fasttext_runs_s": [round(x, 4) for x in ft], "filter_runs_s": [round(x, 4) for x in fl]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="timing runs per side (best is kept)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent")
    with tempfile.TemporaryDirectory(prefix="refinery-quality-bench-") as tmp:
        acc = accuracy(Path(tmp))
        sp = speed(acc.pop("model_path"), a.repeat)
    res = {"accuracy": acc, "speed": sp}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
