"""Tokenize benchmark: the whole tokenize stage against raw ``tokenizers.Tokenizer.encode_batch``,
and the training reader against what the demo model consumes.

    .venv/bin/python bench/tokenize.py [--mb 8] [--parts 4] [--vocab 8192] [--repeats 3]

1. builds a documents dataset (Parquet parts, the curate output schema) of ~``--mb`` MB of real
   text: the shared quality and SFT files (English and Chinese) and the texts of the shared WARC
   files (mostly Chinese/Japanese), repeated to size;
2. trains a byte-level BPE tokenizer on it with the ``tokenizer`` stage;
3. baseline: ``Tokenizer.encode_batch`` over the same texts in the same batch size, nothing else
   (texts already in memory), tokens/sec;
4. ours: the whole ``tokenize`` stage in plain Python (read Parquet, tokenize, append EOS, write
   Arrow shards and the document index, sha256 every file, publish the manifest), tokens/sec;
   the stage must reach >= 0.8 of the baseline. Baseline and stage alternate ``--repeats`` times
   in this one process and the best of each is compared (the machine is shared);
5. the reader: ``TokenReader.next_batch`` tokens/sec at seq_len 128 and 1024 over the stage's
   output, against 50 x the demo model's training speed (20k tokens/s on CPU, assumed).

Prints a summary; writes bench/results/tokenize.json.
"""
from __future__ import annotations

import sys

# This file is named like the standard library's ``tokenize``: drop its folder from the import path
# before anything (inspect, pydantic) imports that module.
sys.path[:] = [p for p in sys.path if p not in ("", ".") and not p.rstrip("/").endswith("/bench")]

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = (ROOT / ".." / "shared" / "data").resolve()
DEMO_MODEL_TOKENS_PER_SEC = 20_000  # assumed CPU training speed of the demo model (issue 5)


def corpus(target_chars: int) -> list[str]:
    texts: list[str] = []
    for name in ("quality/c4-demo.jsonl", "quality/dclm-majority.jsonl"):
        with open(DATA / name) as f:
            texts += [json.loads(line)["text"] for line in f]
    for name in ("sft/alpaca_en_demo.json", "sft/alpaca_zh_demo.json"):
        for r in json.load(open(DATA / name)):
            texts.append("\n\n".join(x for x in (r.get("instruction"), r.get("input"), r.get("output")) if x))
    sys.path.insert(0, str(ROOT / "tests" / "tokens"))
    from tests.tokens.conftest import extract_warc_texts

    texts += extract_warc_texts(DATA)
    texts = [t for t in texts if t]
    out, n, k = [], 0, 0
    while n < target_chars:
        t = texts[k % len(texts)]
        if k >= len(texts):  # later copies differ a little, like real near-duplicates
            t = f"{k // len(texts)}. {t}"
        out.append(t)
        n += len(t)
        k += 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size in millions of characters")
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch-docs", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tokenize.json"))
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"{DATA} is absent: the benchmark needs the shared data", file=sys.stderr)
        return 2

    import pyarrow as pa
    from tokenizers import Tokenizer

    from refinery.tasks.store import Store
    from refinery.tasks.tokens.reader import TokenReader
    from refinery.tasks.tokens.stage import Tokenize, TokenizeConfig
    from refinery.tasks.tokens.tokenizer import TokenizerConfig, tokenizer_stage

    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        texts = corpus(int(args.mb * 1e6))
        chars = sum(map(len, texts))
        store = Store(work / "store")
        b = store.builder("docs", "bench")
        for p in range(args.parts):
            lo, hi = p * len(texts) // args.parts, (p + 1) * len(texts) // args.parts
            b.write_table(f"part-{p:05d}.parquet", pa.table({
                "id": [f"d{i}" for i in range(lo, hi)], "text": texts[lo:hi], "source": ["bench"] * (hi - lo)}))
        docs = b.publish(version="1", config={}, inputs=[])
        print(f"corpus: {len(texts):,} documents, {chars / 1e6:.1f}M characters, {args.parts} parts", file=sys.stderr)

        t0 = time.perf_counter()
        tok_ds = tokenizer_stage.run(store, [docs], TokenizerConfig(vocab_size=args.vocab, max_train_chars=4_000_000))
        train_s = time.perf_counter() - t0
        tok = Tokenizer.from_file(f"{tok_ds.path}/tokenizer.json")
        bs = args.batch_docs

        def raw(fn) -> tuple[float, int]:
            t = time.perf_counter()
            n = 0
            for i in range(0, len(texts), bs):
                n += sum(len(e) for e in fn(texts[i: i + bs], add_special_tokens=False))
            return time.perf_counter() - t, n

        raw_s, fast_s, stage_s = [], [], []
        raw_tokens = stage_tokens = 0
        for r in range(args.repeats):
            s, raw_tokens = raw(tok.encode_batch)
            raw_s.append(s)
            s, _ = raw(tok.encode_batch_fast)
            fast_s.append(s)
            st = Store(work / f"run{r}")
            t = time.perf_counter()
            out = Tokenize.run(st, [docs, tok_ds], TokenizeConfig(batch_docs=bs))
            stage_s.append(time.perf_counter() - t)
            stage_tokens = out.counts["tokens"]
            print(f"  repeat {r}: encode_batch {raw_s[-1]:.2f}s  encode_batch_fast {fast_s[-1]:.2f}s  "
                  f"stage {stage_s[-1]:.2f}s", file=sys.stderr)
        # the stage also writes one EOS per document; compare rates of the tokenizer's own tokens too
        docs_out = out.counts["docs_out"]
        assert stage_tokens - docs_out == raw_tokens, (stage_tokens, docs_out, raw_tokens)
        raw_rate = raw_tokens / min(raw_s)
        fast_rate = raw_tokens / min(fast_s)
        stage_rate = (stage_tokens - docs_out) / min(stage_s)

        reader = {}
        for seq_len in (128, 1024):
            rd = TokenReader(out.path, seq_len)
            batch = max(1, 65536 // seq_len)
            rd.next_batch(batch)
            t = time.perf_counter()
            n = 0
            while time.perf_counter() - t < 2.0:
                n += rd.next_batch(batch).size
            reader[seq_len] = n / (time.perf_counter() - t)

        res = {
            "corpus": {"documents": len(texts), "chars": chars, "parts": args.parts, "tokens": raw_tokens},
            "tokenizer_train_seconds": round(train_s, 2), "vocab_size": args.vocab,
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: Rust threads)"),
            "cpus": os.cpu_count(),
            "raw_encode_batch_tokens_per_sec": round(raw_rate), "raw_encode_batch_fast_tokens_per_sec": round(fast_rate),
            "stage_tokens_per_sec": round(stage_rate), "stage_vs_encode_batch": round(stage_rate / raw_rate, 3),
            "stage_vs_encode_batch_fast": round(stage_rate / fast_rate, 3),
            "reader_tokens_per_sec": {str(k): round(v) for k, v in reader.items()},
            "demo_model_tokens_per_sec_assumed": DEMO_MODEL_TOKENS_PER_SEC,
            "reader_vs_demo_model": {str(k): round(v / DEMO_MODEL_TOKENS_PER_SEC, 1) for k, v in reader.items()},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    ok_stage = res["stage_vs_encode_batch"] >= 0.8
    ok_reader = min(reader.values()) >= 50 * DEMO_MODEL_TOKENS_PER_SEC
    print(f"stage {stage_rate:,.0f} tok/s = {res['stage_vs_encode_batch']:.2f} x raw encode_batch "
          f"({raw_rate:,.0f} tok/s; encode_batch_fast {fast_rate:,.0f}) -> {'PASS' if ok_stage else 'FAIL'} (>= 0.8)")
    print(f"reader {', '.join(f'seq {k}: {v:,.0f} tok/s' for k, v in reader.items())} vs demo model "
          f"{DEMO_MODEL_TOKENS_PER_SEC:,} tok/s x 50 -> {'PASS' if ok_reader else 'FAIL'}")
    return 0 if ok_stage and ok_reader else 1


if __name__ == "__main__":
    sys.exit(main())
