"""Corpora for the dedup tests: real text with planted near-duplicates of known Jaccard."""
from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pyarrow as pa

from refinery.tasks.dedup.normalize import words
from refinery.tasks.store import Store, fingerprint


def load_texts(shared: Path, min_words: int = 120) -> list[str]:
    texts = []
    for name in ("quality/c4-demo.jsonl", "quality/dclm-majority.jsonl"):
        with open(shared / name) as f:
            for line in f:
                t = json.loads(line)["text"]
                if len(words(t)) >= min_words:
                    texts.append(t)
    # drop texts that are already near-duplicates of an earlier one (real corpora have some)
    seen: set = set()
    out = []
    for t in texts:
        s = shingle_set(t)
        if len(s & seen) < 0.3 * len(s):
            seen |= s
            out.append(t)
    return out


def shingle_set(text: str, n: int = 5) -> set:
    w = words(text)
    if len(w) < n:
        return {tuple(w)} if w else set()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def mutate(text: str, target: float, rng: random.Random, vocab: list[str], n: int = 5) -> tuple[str, float]:
    """A copy of ``text`` with random word substitutions, as many as keep its exact shingle
    Jaccard with the original at or above ``target`` (binary search); returns (copy, Jaccard)."""
    toks = text.split()
    orig = shingle_set(text, n)
    positions = list(range(len(toks)))
    rng.shuffle(positions)
    repl = [rng.choice(vocab) for _ in positions]

    def make(k: int) -> str:
        cur = list(toks)
        for p, w in zip(positions[:k], repl[:k]):
            cur[p] = w
        return " ".join(cur)

    lo, hi = 0, len(toks)  # J(make(lo)) >= target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if jaccard(orig, shingle_set(make(mid), n)) >= target:
            lo = mid
        else:
            hi = mid
    copy = make(lo)
    return copy, jaccard(orig, shingle_set(copy, n))


def docs_dataset(store: Store, rows: list[dict], name: str = "docs", parts: int = 2):
    """Publish a documents dataset (ARCHITECTURE.md, section 4 schema) split into ``parts`` parts."""
    fp = fingerprint(name, "1", {"rows": [r["id"] for r in rows], "n": len(rows),
                                 "h": hash(tuple(r["text"] for r in rows)) & 0xFFFFFFFF}, [])
    b = store.builder(name, fp)
    per = max(1, -(-len(rows) // parts))
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("url", pa.string()),
                        ("source", pa.string()), ("crawl_date", pa.timestamp("us", tz="UTC")),
                        ("metadata", pa.string())])
    for k in range(parts):
        chunk = rows[k * per:(k + 1) * per]
        cols = {c: [r.get(c) for r in chunk] for c in schema.names}
        b.write_table(f"part-{k:05d}.parquet", pa.table(cols, schema=schema))
    return b.publish(version="1", config={"name": name}, inputs=[], counts={"docs_out": len(rows)})


def planted_corpus(shared: Path, seed: int = 0, n_copies: int = 200, lo: float = 0.5, hi: float = 1.0):
    """Real documents plus one mutated copy each for ``n_copies`` of them, at Jaccard targets
    uniform in [lo, hi]. Returns (rows, pairs) with pairs = [(orig_id, copy_id, jaccard)]."""
    rng = random.Random(seed)
    texts = load_texts(shared)
    vocab = sorted({w for t in texts[:50] for w in t.split()})
    base = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    rows = [{"id": f"d{i:05d}", "text": t, "url": f"https://example.com/{i}", "source": "test",
             "crawl_date": base + dt.timedelta(days=i % 7), "metadata": json.dumps({"quality_score": 0.5})}
            for i, t in enumerate(texts)]
    pairs = []
    for k, i in enumerate(rng.sample(range(len(texts)), min(n_copies, len(texts)))):
        target = lo + (hi - lo) * rng.random()
        copy, j = mutate(texts[i], target, rng, vocab)
        cid = f"c{k:05d}"
        rows.append({"id": cid, "text": copy, "url": f"https://mirror.example.org/{k}", "source": "test",
                     "crawl_date": base + dt.timedelta(days=30), "metadata": json.dumps({"quality_score": 0.4})})
        pairs.append((rows[i]["id"], cid, j))
    return rows, pairs
