"""Ingest benchmark: documents per second per core, against the bare parser and the bare extractors.

    .venv/bin/python bench/ingest.py [--seconds 3] [--show 3] [--langid] [--json out.json]

Files: the valid WARC files of ../shared/data/warc/ (warcfile, sample-0000/0001, clueweb-quirk,
whirlwind, jwarc-cc, example*): ~90 HTML responses in Chinese, Japanese, English, Russian, Dutch,
German. Everything runs in this one process on one core; each measurement loops over the files until
``--seconds`` have passed and reports the best pass.

Rows (docs/s = response/conversion records per second):
  parser        fastwarc alone: iterate the records, read each block (the floor of any ingest)
  parse+decode  + our HTTP parsing and charset decoding (no extraction)
  resiliparse   the extractor alone on pre-decoded HTML strings
  trafilatura   the extractor alone on the same strings
  ingest        our whole per-file path (refinery.tasks.ingest.iter_documents): parse, decode, extract, langid,
                with the default extractor (resiliparse) and with trafilatura
Ratios are printed against the bare parser and against the bare default extractor.

``--show N`` prints the first 400 characters of both extractors' output for N pages (quality by eye).
``--langid`` also measures the language-id candidates on ../shared/data/langid/lingua-sentences.tsv.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds tokenize.py (another stage's bench), which would shadow the stdlib module
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
DATA = (ROOT / ".." / "shared" / "data").resolve()
FILES = ["warcfile.warc.gz", "sample-0000.warc.gz", "sample-0001.warc.gz", "clueweb-quirk.warc.gz",
         "whirlwind.warc.gz", "whirlwind.warc.wet.gz", "jwarc-cc.warc.gz", "example.warc.gz",
         "example-iana.org-chunked.warc"]


def timed(fn, seconds: float) -> tuple[float, int]:
    """(best seconds per pass, items per pass)."""
    best, n = float("inf"), 0
    t_end = time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > t_end:
            return best, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--show", type=int, default=0)
    ap.add_argument("--langid", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not (DATA / "warc").is_dir():
        sys.exit(f"{DATA / 'warc'} is absent")
    paths = [str(DATA / "warc" / f) for f in FILES]

    from fastwarc.warc import ArchiveIterator, WarcRecordType

    from refinery.tasks.ingest import IngestConfig, iter_documents
    from refinery.tasks.ingest.extract import decode_html, get_extractor
    from refinery.tasks.ingest.langid import LanguageIdentifier
    from refinery.tasks.ingest.warc import RawRecord, iter_warc

    LanguageIdentifier()  # load the model outside the timings
    types = WarcRecordType.response | WarcRecordType.conversion

    def bare_parser() -> int:
        n = 0
        for p in paths:
            with open(p, "rb") as f:
                for rec in ArchiveIterator(f, record_types=types, parse_http=False, fsspec_args=False):
                    rec.reader.read()
                    n += 1
        return n

    def parse_decode() -> int:
        n = 0
        for p in paths:
            with open(p, "rb") as f:
                for rec in iter_warc(f):
                    if isinstance(rec, RawRecord):
                        if rec.kind == "html":
                            decode_html(rec.payload, rec.http_charset)
                        n += 1
        return n

    htmls = []
    for p in paths:
        with open(p, "rb") as f:
            htmls += [decode_html(r.payload, r.http_charset)[0] for r in iter_warc(f)
                      if isinstance(r, RawRecord) and r.kind == "html"]

    def extractor(name):
        ex = get_extractor(name)
        return lambda: sum(1 for h in htmls if ex(h) is not None)

    def ingest(name):
        cfg = IngestConfig(extractor=name)

        def run() -> int:
            n = 0
            for p in paths:
                st: dict = {}
                for _ in iter_documents({"path": p, "source": "bench"}, cfg, st):
                    pass
                n += st["docs_in"]
            return n
        return run

    rows = collections.OrderedDict()
    for label, fn in [("parser (fastwarc)", bare_parser), ("parse+decode", parse_decode),
                      ("resiliparse alone", extractor("resiliparse")), ("trafilatura alone", extractor("trafilatura")),
                      ("ingest resiliparse", ingest("resiliparse")), ("ingest trafilatura", ingest("trafilatura"))]:
        sec, n = timed(fn, args.seconds)
        rows[label] = {"docs": n, "seconds": round(sec, 4), "docs_per_s": round(n / sec, 1)}
        print(f"{label:22s} {n:4d} docs  {n / sec:9.1f} docs/s/core", flush=True)
    base = rows["parser (fastwarc)"]["docs_per_s"]
    ext = rows["resiliparse alone"]["docs_per_s"]
    print("\nratios (throughput, higher = faster):")
    for label, r in rows.items():
        print(f"  {label:22s} {r['docs_per_s'] / base:8.4f} x parser   {r['docs_per_s'] / ext:7.3f} x resiliparse-alone")
    print(f"  trafilatura / resiliparse (extractor alone): "
          f"{rows['trafilatura alone']['docs_per_s'] / ext:.3f}")
    # output size (how much text each keeps)
    for name in ("resiliparse", "trafilatura"):
        ex = get_extractor(name)
        outs = [ex(h) for h in htmls]
        rows[f"{name} output"] = {"empty": sum(not o.strip() for o in outs),
                                  "chars_median": sorted(len(o) for o in outs)[len(outs) // 2]}
        print(f"{name:12s} empty outputs: {rows[f'{name} output']['empty']}/{len(outs)}, "
              f"median chars: {rows[f'{name} output']['chars_median']}")
    if args.show:
        ra, tr = get_extractor("resiliparse"), get_extractor("trafilatura")
        step = max(1, len(htmls) // args.show)
        for h in htmls[::step][:args.show]:
            print("\n" + "=" * 100 + "\n--- resiliparse:\n" + ra(h)[:400] + "\n--- trafilatura:\n" + tr(h)[:400])
    if args.langid:
        rows["langid"] = bench_langid()
        rows["langid_docs"] = bench_langid_docs(htmls)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def bench_langid() -> dict:
    """Accuracy (exact ISO code) and speed of the offline language-id candidates."""
    lines = (DATA / "langid" / "lingua-sentences.tsv").read_text(encoding="utf-8").splitlines()
    rows = [ln.split("\t", 1) for ln in lines[1:] if "\t" in ln]
    out = {}
    cands = {}
    from refinery.tasks.ingest.langid import LangIdConfig, LanguageIdentifier

    for backend in ("py3langid", "fasttext"):
        lid = LanguageIdentifier(LangIdConfig(backend=backend))
        cands[backend] = lambda s, lid=lid: lid.identify(s)[0]
    try:
        import langid as _langid  # the original langid.py (same model family, slower)
        cands["langid.py"] = lambda s: _langid.classify(s)[0]
    except ImportError:
        pass
    try:
        from lingua import LanguageDetectorBuilder
        det = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()

        def lingua(s):
            r = det.detect_language_of(s)
            return r.iso_code_639_1.name.lower() if r else "und"
        cands["lingua"] = lingua
    except ImportError:
        pass
    alias = {"no": "nb"}  # fastText/langid say "no" for Norwegian Bokmål
    print(f"\nlanguage id on {len(rows)} sentences, {len({r[0] for r in rows})} languages:")
    for name, fn in cands.items():
        t = time.perf_counter()
        fn(rows[0][1])  # warm-up (model loading)
        t = time.perf_counter()
        preds = [fn(text) for _, text in rows]
        dt = time.perf_counter() - t
        ok = sum(alias.get(p, p) == lang for p, (lang, _) in zip(preds, rows))
        out[name] = {"accuracy": round(ok / len(rows), 4), "sentences_per_s": round(len(rows) / dt, 1)}
        print(f"  {name:10s} accuracy {ok / len(rows):.4f}   {len(rows) / dt:8.1f} sentences/s/core", flush=True)
    return out


def bench_langid_docs(htmls: list[str]) -> dict:
    """Per-document cost and agreement of the two shipped backends on the extracted WARC pages."""
    from refinery.tasks.ingest.extract import get_extractor, normalize_text
    from refinery.tasks.ingest.langid import LangIdConfig, LanguageIdentifier

    ex = get_extractor("resiliparse")
    texts = [normalize_text(ex(h)) for h in htmls]
    out, preds = {}, {}
    print(f"\nlanguage id on {len(texts)} extracted pages:")
    for backend in ("py3langid", "fasttext"):
        for max_chars in (500, 2000):
            lid = LanguageIdentifier(LangIdConfig(backend=backend, max_chars=max_chars))
            t = time.perf_counter()
            preds[(backend, max_chars)] = [lid.identify(x)[0] for x in texts]
            ms = (time.perf_counter() - t) / len(texts) * 1000
            out[f"{backend}@{max_chars}"] = {"ms_per_doc": round(ms, 3)}
            print(f"  {backend:10s} max_chars={max_chars:5d}  {ms:7.3f} ms/doc")
    ref = preds[("py3langid", 2000)]
    for k, p in preds.items():
        agree = sum(a == b for a, b in zip(p, ref)) / len(ref)
        out[f"{k[0]}@{k[1]}"]["agree_with_py3langid@2000"] = round(agree, 4)
        print(f"  agreement {k[0]}@{k[1]} vs py3langid@2000: {agree:.3f}")
    return out


if __name__ == "__main__":
    main()
