"""Filter stage benchmark: rule-by-rule agreement with datatrove, and throughput against datatrove.

    .venv/bin/python bench/filters.py [--repeat 2] [--limit N] [--json out.json]

Documents: ../shared/data/quality/ (dclm-majority.jsonl, c4-demo.jsonl, dolma-tests documents) and
the HTML responses of ../shared/data/warc/*.warc.gz extracted with resiliparse (main content).

The baseline is datatrove 0.10.1, installed by this script into its own virtualenv
(``bench/.venv-datatrove``, git-ignored; never a project dependency) together with what its filters
import (spaCy for its English word tokenizer, regex, tldextract, pyahocorasick). It runs in a
subprocess of that venv and exchanges JSONL with this script.

Agreement: each rule alone, on the original documents, same thresholds and same word lists on both
sides; a document agrees when both keep it or both drop it (the table also gives how often the
drop reasons match, and for text-rewriting rules how often the output text is identical).
Throughput: the default chain (url, gopher_repetition, gopher_quality, c4, fineweb, pii) on every
document, one process on one core each, fresh process per run (cold caches), best of --repeat runs;
ours is timed both in memory (``filter_table``) and as the whole stage (``Filter.run``: parquet in,
parquet + exclusions out, manifest).
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like standard modules (e.g. tokenize.py): never import from it by accident
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import glob
import gzip
import json
import os
import subprocess
import tarfile
import tempfile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = (ROOT / ".." / "shared" / "data").resolve()
VENV = Path(os.environ.get("DATATROVE_VENV", ROOT / "bench" / ".venv-datatrove"))
DT_PACKAGES = ["datatrove==0.10.1", "spacy", "regex", "tldextract", "pyahocorasick", "fasteners"]
RULES = ["url", "gopher_repetition", "gopher_quality", "c4", "c4_badwords", "fineweb", "pii"]
CHAIN = ["url", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii"]


# --------------------------------------------------------------------------- documents
def load_docs(limit: int | None = None) -> list[dict]:
    docs: list[dict] = []
    q = DATA / "quality"
    for name in ("dclm-majority.jsonl", "c4-demo.jsonl"):
        with open(q / name) as f:
            for i, line in enumerate(f):
                r = json.loads(line)
                docs.append({"id": f"{name}:{i}", "text": r["text"], "url": None, "source": name})
    for path in sorted(glob.glob(str(q / "dolma-tests" / "data" / "**" / "*.gz"), recursive=True)):
        if "/attributes/" in path or "/expected/" in path:
            continue
        with gzip.open(path, "rt") as f:
            for i, line in enumerate(f):
                r = json.loads(line)
                url = r.get("id") if str(r.get("id", "")).startswith("http") else r.get("metadata", {}).get("url")
                docs.append({"id": f"dolma:{Path(path).name}:{i}", "text": r["text"], "url": url, "source": "dolma"})
    docs.extend(warc_docs())
    for d in docs:
        d["lang"] = "en"   # agreement is about rule logic: both sides treat every document as English
    return docs[:limit] if limit else docs


def warc_docs() -> list[dict]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    out = []
    for path in sorted(glob.glob(str(DATA / "warc" / "*.warc.gz"))):
        try:
            with open(path, "rb") as f:
                for rec in ArchiveIterator(f, record_types=WarcRecordType.response, parse_http=True):
                    try:
                        ctype = (rec.http_headers.get("Content-Type") or "") if rec.http_headers else ""
                        if "html" not in ctype.lower():
                            continue
                        body = rec.reader.read()
                        html = bytes_to_str(body, detect_encoding(body))
                        text = extract_plain_text(html, main_content=True)
                    except Exception:
                        continue
                    if text.strip():
                        url = (rec.headers.get("WARC-Target-URI") or "").strip("<>")
                        out.append({"id": f"warc:{Path(path).name}:{rec.record_id}", "text": text, "url": url,
                                    "source": "warc"})
        except Exception as e:  # a broken archive is part of the test data; skip it
            print(f"  (skipping {Path(path).name}: {e})", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- datatrove side
DT_SCRIPT = r'''
import functools, json, sys, time
args = json.loads(sys.argv[1])
import tldextract
import datatrove.pipeline.filters.url_filter as uf
uf.TLDExtract = functools.partial(tldextract.TLDExtract, suffix_list_urls=())   # offline: bundled snapshot
import datatrove.pipeline.filters.c4_filters as c4f
c4f.cached_asset_path_or_download = lambda *a, **k: args["badwords_en"]
from datatrove.data import Document
from datatrove.pipeline.filters import (C4BadWordsFilter, C4QualityFilter, FineWebQualityFilter,
                                        GopherQualityFilter, GopherRepetitionFilter, URLFilter)
from datatrove.pipeline.formatters import PIIFormatter

def read(path):
    return [json.loads(l) for l in open(path)]

def lines(path):
    return [l.strip() for l in open(path) if l.strip() and not l.startswith("#")]

def make(name):
    if name == "url":
        return URLFilter(use_integrated_lists=False, extra_domains=args["domains"],
                         banned_words=lines(args["banned_words"]), banned_subwords=lines(args["banned_subwords"]),
                         soft_banned_words=lines(args["soft_banned_words"]))
    if name == "gopher_repetition": return GopherRepetitionFilter()
    if name == "gopher_quality": return GopherQualityFilter()
    if name == "c4": return C4QualityFilter()
    if name == "c4_badwords": return C4BadWordsFilter(default_language="en")
    if name == "fineweb": return FineWebQualityFilter()
    if name == "pii": return PIIFormatter(email_replacement="<EMAIL>", ip_replacement="<IP>")
    raise ValueError(name)

def to_doc(r):
    return Document(text=r["text"], id=r["id"], metadata={"url": r["url"]} if r["url"] else {})

def run_one(step, doc):
    if isinstance(step, PIIFormatter):
        return True, None, step.format(doc.text)
    if isinstance(step, URLFilter) and not doc.metadata.get("url"):
        return True, None, doc.text        # datatrove asserts a URL; treat as kept (our no_url="keep")
    res = step.filter(doc)
    keep, reason = (res if isinstance(res, tuple) else (res, None))
    return bool(keep), reason, doc.text

docs = read(args["docs"])
if args["mode"] == "rules":
    out = {}
    for name in args["rules"]:
        step = make(name)
        res = []
        for r in docs:
            d = to_doc(r)
            try:
                keep, reason, text = run_one(step, d)
            except Exception as e:
                keep, reason, text = False, "error:" + type(e).__name__, d.text
            res.append({"keep": keep, "reason": reason, "text": text})
        out[name] = res
    json.dump(out, open(args["out"], "w"))
else:   # timing of the chain
    steps = [make(n) for n in args["rules"]]
    for s in steps:                      # load lists etc. before the clock starts
        if isinstance(s, URLFilter): s.download_data()
    t0 = time.process_time(); w0 = time.perf_counter()
    kept = 0
    for r in docs:
        d = to_doc(r)
        ok = True
        for s in steps:
            try:
                k, _, text = run_one(s, d)
            except ZeroDivisionError:
                k = False
            d.text = text
            if not k:
                ok = False
                break
        kept += ok
    json.dump({"cpu": time.process_time() - t0, "wall": time.perf_counter() - w0, "kept": kept}, open(args["out"], "w"))
'''


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    probe = [str(py), "-c", "import datatrove, spacy, regex, tldextract, ahocorasick"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"installing datatrove into {VENV} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *DT_PACKAGES], check=True)
    return py


def run_datatrove(py: Path, args: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(DT_SCRIPT)
        script = f.name
    env = dict(os.environ, HF_HOME=str(Path(args["tmp"]) / "hf"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    p = subprocess.run([str(py), script, json.dumps(args)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"datatrove run failed:\n{p.stderr[-3000:]}")
    with open(args["out"]) as f:
        return json.load(f)


# --------------------------------------------------------------------------- our side
def our_config(rules: list[str], domains: list[str]):
    from refinery.tasks.filters import FilterConfig
    from refinery.tasks.filters.content import PiiConfig, UrlConfig

    # Same lists as the datatrove side; PII with datatrove's scope (e-mails, IPs; phones are ours only)
    return FilterConfig(rules=rules, url=UrlConfig(domains_files=[], extra_domains=domains),
                        pii=PiiConfig(phones=False, email_placeholders=["<EMAIL>"], ip_placeholders=["<IP>"]),
                        write_exclusions=True)


def our_rules(docs: list[dict], domains: list[str], rules: list[str] = RULES) -> dict:
    from refinery.tasks.filters import FilterChain

    out = {}
    for name in rules:
        chain = FilterChain(our_config([name], domains))
        res = []
        for d in docs:
            text, dropped = chain.apply(d["text"], d["url"], d["lang"])
            res.append({"keep": dropped is None, "reason": dropped[1] if dropped else None, "text": text})
        out[name] = res
    return out


OUR_TIMING = r'''
import json, sys, time
sys.path.insert(0, sys.argv[2])
args = json.loads(sys.argv[1])
import pyarrow as pa, pyarrow.parquet as pq
from bench.filters import our_config
from refinery.tasks.filters import FilterChain, filter_table
docs = [json.loads(l) for l in open(args["docs"])]
table = pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs],
                  "url": [d["url"] for d in docs], "source": [d["source"] for d in docs],
                  "lang": [d["lang"] for d in docs]})
cfg = our_config(args["rules"], args["domains"])
res = {}
if args["mode"] == "memory":
    chain = FilterChain(cfg)
    t0 = time.process_time(); w0 = time.perf_counter()
    kept, excluded, counts = filter_table(table, cfg, chain)
    res = {"cpu": time.process_time() - t0, "wall": time.perf_counter() - w0, "kept": counts["docs_out"]}
else:   # the whole stage: parquet input dataset -> Filter.run -> parquet outputs + manifest
    from refinery.tasks.store import Store
    from refinery.tasks.runtime import stage, StageOutput
    from refinery.tasks.filters import Filter
    store = Store(args["tmp"] + "/store-" + str(time.time_ns()))
    b = store.builder("docs", "bench")
    n = len(docs)
    for i in range(4):                   # four input parts -> four shards
        b.write_table(f"part-{i:05d}.parquet", table.slice(i * n // 4, (i + 1) * n // 4 - i * n // 4))
    src = b.publish(version="1", config={}, inputs=[], counts={"docs": n})
    t0 = time.process_time(); w0 = time.perf_counter()
    ds = Filter.run(store, [src], cfg)
    res = {"cpu": time.process_time() - t0, "wall": time.perf_counter() - w0, "kept": ds.counts["docs_out"]}
json.dump(res, open(args["out"], "w"))
'''


def run_ours_timing(args: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(OUR_TIMING)
        script = f.name
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, script, json.dumps(args), str(ROOT)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"our timing run failed:\n{p.stderr[-3000:]}")
    with open(args["out"]) as f:
        return json.load(f)


# datatrove reason names -> ours (same meaning, our naming)
_REASONS = {"gopher_short_doc": "short_doc", "gopher_long_doc": "long_doc",
            "gopher_below_avg_threshold": "below_avg_word_length", "gopher_above_avg_threshold": "above_avg_word_length",
            "gopher_too_many_hashes": "too_many_hashes", "gopher_too_many_ellipsis": "too_many_ellipsis",
            "gopher_too_many_bullets": "too_many_bullets", "gopher_too_many_end_ellipsis": "too_many_end_ellipsis",
            "gopher_below_alpha_threshold": "below_alpha_words_ratio", "gopher_enough_stop_words": "not_enough_stop_words",
            "document_removed_with_badwords": "badwords"}


def _same_reason(rule: str, theirs: str | None, ours: str | None) -> bool:
    if rule == "url" and {theirs, ours} <= {"domain", "subdomain"}:
        return True    # same list hit; tldextract's registered domain vs our parent-domain walk name it apart
    return _REASONS.get(theirs, theirs) == ours


# --------------------------------------------------------------------------- main
def warc_urls() -> list[str]:
    """Target URIs of every record of every WARC file (requests, responses, metadata)."""
    from fastwarc.warc import ArchiveIterator

    urls = []
    for path in sorted(glob.glob(str(DATA / "warc" / "*.warc.gz"))):
        try:
            with open(path, "rb") as f:
                for rec in ArchiveIterator(f, parse_http=False):
                    u = (rec.headers.get("WARC-Target-URI") or "").strip("<>")
                    if u:
                        urls.append(u)
        except Exception:
            continue
    return sorted(set(urls))


def ut1_sample(py: Path, every: int = 20000) -> list[str]:
    """Every n-th domain of the UT1 'adult' list shipped with datatrove (a deterministic real sample)."""
    tar = subprocess.run([str(py), "-c", "import datatrove.utils._import_utils as u; print(u.ASSETS_PATH)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    out = []
    with tarfile.open(Path(tar) / "url_filterblacklistsv0_3_0.tar.gz") as t:
        for i, line in enumerate(t.extractfile("domains")):
            if i % every == 0:
                out.append(line.decode("utf-8", "replace").strip().lower())
    return [d for d in out if d]


def url_docs(py: Path) -> list[dict]:
    """Extra documents for the url rule: every WARC URI, and URLs on/under/beside a sample of UT1 domains."""
    urls = warc_urls()
    for i, dom in enumerate(ut1_sample(py)):
        urls.append(f"http://{dom}/" if i % 3 == 0 else f"https://www.{dom}/index.html" if i % 3 == 1
                    else f"https://{dom.split('.')[0]}-news.org/{dom.split('.')[0]}/page")
    return [{"id": f"url:{i}", "text": "x", "url": u, "source": "urls", "lang": "en"} for i, u in enumerate(urls)]


def bench_domains(docs: list[dict], py: Path, tmp: str) -> list[str]:
    """The UT1 'adult' domains shipped with datatrove that could match a benchmark URL (same list to both)."""
    from refinery.tasks.filters.content import UrlFilter

    hosts = {UrlFilter.host(d["url"]) for d in docs if d["url"]}
    suffixes = set()
    for h in hosts:
        labels = h.split(".")
        suffixes.update(".".join(labels[i:]) for i in range(len(labels)))
    tar = subprocess.run([str(py), "-c", "import datatrove.utils._import_utils as u; print(u.ASSETS_PATH)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    found = set()
    with tarfile.open(Path(tar) / "url_filterblacklistsv0_3_0.tar.gz") as t:
        f = t.extractfile("domains")
        for line in f:
            d = line.decode("utf-8", "replace").strip().lower()
            if d in suffixes:
                found.add(d)
    return sorted(found | set(ut1_sample(py)[::2]))   # half of the sample is blocked, half only named


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2, help="timing runs per side (best is kept)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--show-disagreements", type=int, default=0)
    ap.add_argument("--no-timing", action="store_true", help="agreement only")
    a = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent")
    py = ensure_venv()
    docs = load_docs(a.limit)
    by_source: dict[str, int] = {}
    for d in docs:
        by_source[d["source"]] = by_source.get(d["source"], 0) + 1
    print(f"documents: {len(docs)} {by_source}")
    tmp = tempfile.mkdtemp(prefix="bench-filters-")
    docs_path = os.path.join(tmp, "docs.jsonl")
    with open(docs_path, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    extra_urls = url_docs(py)
    domains = bench_domains(docs + extra_urls, py, tmp)
    with open(os.path.join(tmp, "urls.jsonl"), "w") as f:
        for d in extra_urls:
            f.write(json.dumps(d) + "\n")
    url_data = ROOT / "tasks" / "filters" / "data"
    common = {"docs": docs_path, "tmp": tmp, "domains": domains,
              "badwords_en": str(url_data / "badwords" / "en.txt"),
              "banned_words": str(url_data / "url" / "banned_words.txt"),
              "banned_subwords": str(url_data / "url" / "banned_subwords.txt"),
              "soft_banned_words": str(url_data / "url" / "soft_banned_words.txt")}

    # ---- agreement
    theirs = run_datatrove(py, {**common, "mode": "rules", "rules": RULES, "out": os.path.join(tmp, "dt.json")})
    ours = our_rules(docs, domains)
    # the url rule also sees the URL-only documents
    theirs_u = run_datatrove(py, {**common, "docs": os.path.join(tmp, "urls.jsonl"), "mode": "rules",
                                  "rules": ["url"], "out": os.path.join(tmp, "dt-urls.json")})
    theirs["url"] += theirs_u["url"]
    ours["url"] += our_rules(extra_urls, domains, ["url"])["url"]
    rows = []
    print("\nagreement with datatrove 0.10.1, each rule alone on the same documents")
    print(f"{'rule':<18}{'docs':>6}{'dt drop':>9}{'our drop':>9}{'agree':>8}{'agree %':>9}{'same reason %':>14}"
          f"{'dt changed':>11}{'same text %':>12}")
    for name in RULES:
        t, o = theirs[name], ours[name]
        n = len(t)
        dropped_both = [(x, y) for x, y in zip(t, o) if not x["keep"] and not y["keep"]]
        same_reason = sum(_same_reason(name, x["reason"], y["reason"]) for x, y in dropped_both)
        src = (docs + extra_urls) if name == "url" else docs
        changed = sum(x["keep"] and x["text"] != d["text"] for x, d in zip(t, src))
        agree = sum(x["keep"] == y["keep"] for x, y in zip(t, o))
        both_kept = [(x, y) for x, y in zip(t, o) if x["keep"] and y["keep"]]
        same_text = sum(x["text"] == y["text"] for x, y in both_kept)
        row = {"rule": name, "docs": n, "datatrove_dropped": sum(not x["keep"] for x in t),
               "ours_dropped": sum(not y["keep"] for y in o), "agree": agree,
               "agree_pct": round(100 * agree / n, 2),
               "same_reason_pct": round(100 * same_reason / len(dropped_both), 2) if dropped_both else None,
               "datatrove_changed_text": changed,
               "same_text_pct": round(100 * same_text / len(both_kept), 2) if both_kept else None}
        rows.append(row)
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{name:<18}{n:>6}{row['datatrove_dropped']:>9}{row['ours_dropped']:>9}{agree:>8}"
              f"{row['agree_pct']:>9.2f}{fmt(row['same_reason_pct']):>14}{changed:>11}{fmt(row['same_text_pct']):>12}")
        if a.show_disagreements:
            shown = 0
            for d, x, y in zip(src, t, o):
                if x["keep"] != y["keep"] and shown < a.show_disagreements:
                    print(f"    {d['id']}: datatrove={x['reason']} ours={y['reason']}")
                    shown += 1

    # ---- throughput
    if a.no_timing:
        return
    print(f"\nthroughput, chain {CHAIN}, 1 process each, cold caches, best of {a.repeat}")
    best: dict[str, dict] = {}
    for r in range(a.repeat):
        for side in ("datatrove", "ours_memory", "ours_stage"):
            out = os.path.join(tmp, f"t-{side}-{r}.json")
            if side == "datatrove":
                res = run_datatrove(py, {**common, "mode": "time", "rules": CHAIN, "out": out})
            else:
                res = run_ours_timing({**common, "mode": "memory" if side == "ours_memory" else "stage",
                                       "rules": CHAIN, "out": out})
            if side not in best or res["cpu"] < best[side]["cpu"]:
                best[side] = res
    for side, res in best.items():
        res["docs_per_cpu_sec"] = round(len(docs) / res["cpu"], 1)
        print(f"  {side:<12} cpu {res['cpu']:7.2f}s  wall {res['wall']:7.2f}s  {res['docs_per_cpu_sec']:8.1f} docs/s/core"
              f"  kept {res['kept']}")
    ratio_mem = best["ours_memory"]["docs_per_cpu_sec"] / best["datatrove"]["docs_per_cpu_sec"]
    ratio_stage = best["ours_stage"]["docs_per_cpu_sec"] / best["datatrove"]["docs_per_cpu_sec"]
    print(f"  ratio ours/datatrove: {ratio_mem:.2f}x (in memory), {ratio_stage:.2f}x (whole stage incl. parquet I/O)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"docs": len(docs), "by_source": by_source, "agreement": rows, "throughput": best,
                       "ratio_memory": ratio_mem, "ratio_stage": ratio_stage}, f, indent=2)


if __name__ == "__main__":
    main()
