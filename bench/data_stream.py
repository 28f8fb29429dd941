"""Benchmark: memory of reading training data streaming vs loading the whole file, on a 1 GB JSONL.

    .venv/bin/python bench/data_stream.py                       # 1 GB, 3 repeats, alternating
    .venv/bin/python bench/data_stream.py --gb 0.2 --repeats 2 --modes old,read

Each measurement runs in a fresh process and reports the growth of its resident set: the peak
(``VmHWM``, reset through ``/proc/self/clear_refs`` once the imports are done) minus the resident
set at that point. Modes, alternated in every repeat so drift hits them alike:

- ``old`` (the baseline): what the readers did before ``refinery.tasks.records``: the whole file
  read as text, split into lines, every line parsed and turned into an example, all in memory
  (``tasks/finetune/data.py``'s former ``read_examples``);
- ``read``: the same examples streamed (``refinery.tasks.finetune.data.iter_examples``, one record
  at a time), counted and dropped: the records reader alone;
- ``prepare``: the whole SFT preparation, ``read_split_encode`` (two streaming passes, the split,
  every training example encoded into the on-disk store) with a byte-level tokenizer, so the
  tokenizer's own cost does not hide the data's; what stays in memory is the index (about 40
  bytes a record) and the validation examples.

The file (alpaca-style records of ~1 KB, varied) is generated once into ``--workdir`` and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/tokenize.py would shadow the stdlib module: never import from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

WORDS = ("the model reads data from every place users keep it and trains on it without holding "
         "the whole file in memory while the loss goes down step after step").split()


def make_file(path: Path, gb: float, seed: int = 0) -> Path:
    """Alpaca-style JSONL of about ``gb`` GB (written once; an existing file of the size is reused)."""
    target = int(gb * 1e9)
    if path.exists() and abs(path.stat().st_size - target) < 2e6:
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "w") as f:
        i = 0
        while f.tell() < target:
            words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
            f.write(json.dumps({"instruction": words(rng.randint(8, 40)), "input": words(rng.randint(0, 80)),
                                "output": words(rng.randint(20, 120)), "id": i}) + "\n")
            i += 1
    tmp.rename(path)
    return path


class ByteTokenizer:
    """Bytes are tokens; a plain template. Cheap, so ``prepare`` measures the data path."""

    is_fast = False
    chat_template = "plain"
    pad_token_id = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(mode: str, path: str) -> None:
    import numpy  # noqa: F401  (imported by the streaming path: not data)
    import tqdm.auto  # noqa: F401

    from refinery.tasks.finetune import data as D

    tok = ByteTokenizer()
    with open("/proc/self/clear_refs", "w") as f:   # the peak from here on
        f.write("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "old":   # the former read_examples: whole text, all lines, all examples
        text = Path(path).read_text(encoding="utf-8")
        examples = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                _, convs = D.record_to_examples(json.loads(line))
                examples.extend(D.Example(c, n) for c in convs)
        n_out = len(examples)
    elif mode == "read":
        report = D.ReadReport(path=path)
        n_out = sum(1 for _ in D.iter_examples(path, report))
    elif mode == "prepare":
        split = D.read_split_encode(tok, path, 4096, val_fraction=0.01, seed=0, max_val=256)
        n_out = len(split.train_items)
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "growth_mb": round((_status("VmHWM") - base) / 2**20, 1),
                      "examples": n_out, "seconds": round(seconds, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="size of the generated JSONL")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="old,read,prepare")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "refinery-bench-data"))
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    path = make_file(Path(args.workdir) / f"sft-{args.gb:g}gb.jsonl", args.gb)
    size = path.stat().st_size
    print(f"file: {size / 1e9:.3f} GB JSONL ({time.perf_counter() - t:.0f} s to make or find)", flush=True)
    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for m in (modes if r % 2 == 0 else modes[::-1]):   # alternate the order too
            out = subprocess.run([sys.executable, __file__, "--child", m, str(path)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{m}: failed\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[m].append(row)
            print(f"  repeat {r + 1} {m:8s} RSS growth {row['growth_mb']:9.1f} MiB  {row['seconds']:7.1f} s  "
                  f"{row['examples']} examples", flush=True)
    print(f"\nRSS growth over {args.repeats} runs each (MiB; median [min, max]), file {size / 2**20:.0f} MiB:")
    for m, rows in results.items():
        g = [x["growth_mb"] for x in rows]
        s = [x["seconds"] for x in rows]
        print(f"  {m:8s} {statistics.median(g):9.1f} [{min(g):.1f}, {max(g):.1f}]   "
              f"{statistics.median(s):.1f} s   ({100 * statistics.median(g) * 2**20 / size:.1f}% of the file)")


if __name__ == "__main__":
    main()
