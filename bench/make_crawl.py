"""Write a realistic WARC crawl of N pages for the scale benchmarks.

    .venv/bin/python bench/make_crawl.py --pages 25000 [--files 0] [--seed 0] [--out DIR]

Pages come from the demo crawl's generators (``refinery.tasks.demo.crawl``): real page templates
(menus, cookie banners, sidebars, comments, footers around the main text) filled with real English
prose (standard-library docstrings; past the ~340 whole articles, each page remixes three
paragraphs of different articles, sharing under a third of its text with any one), and WARC/1.1
request + response records, one gzip member each, over several files. Planted at fixed rates
(of all pages; ``ground_truth.json`` beside the files lists every one): exact duplicates 3%,
near-duplicates 3%, spam and low-quality pages 5.25%, personal data 2%, a blocklisted domain 1%,
HTTP errors and redirects 0.75%, 10 foreign-language pages (2 each of de, fr, es, zh, ru), a
robots.txt, and one truncated record. ``--files 0`` (the default) writes one file per 2,500 pages (at least 4).

Prints the files, their size, the planted counts and rates, the generation time and the peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/tokenize.py would shadow the stdlib module: never import from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

PAGES_PER_FILE = 2500


def default_files(pages: int) -> int:
    return max(4, -(-pages // PAGES_PER_FILE))


def make_crawl(out: Path, pages: int, files: int = 0, seed: int = 0) -> tuple[list[Path], dict]:
    """The crawl's files and its planted counts (kind -> pages)."""
    from refinery.tasks.demo.crawl import load_ground_truth, make_demo_crawl

    paths = make_demo_crawl(out, seed=seed, n_pages=pages, n_files=files or default_files(pages))
    truth = load_ground_truth(out)
    return paths, {"kinds": dict(truth["kinds"]), "totals": truth["totals"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, required=True)
    ap.add_argument("--files", type=int, default=0, help="WARC files (0: one per 2,500 pages, at least 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="output folder (default: a new temporary folder)")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"crawl-{args.pages}-"))
    t0 = time.perf_counter()
    paths, info = make_crawl(out, args.pages, args.files, args.seed)
    secs = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in paths)
    print(f"{out}: {len(paths)} WARC files, {size / 1e6:.1f} MB, {args.pages} pages in {secs:.1f} s "
          f"({args.pages / secs:.0f} pages/s), peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print("planted (pages, % of all pages):")
    for kind, n in sorted(info["kinds"].items()):
        print(f"  {kind:24s} {n:8d}  {100 * n / args.pages:6.2f}%")
    print(json.dumps({"totals": info["totals"]}))


if __name__ == "__main__":
    main()
