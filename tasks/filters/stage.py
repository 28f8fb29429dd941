"""The filter stage: an ordered, configurable chain of rules over document datasets.

``FilterConfig.rules`` names the rules in the order they run; the first rule that drops a document
decides its reason. Rules that rewrite text (``c4`` line cleaning, ``pii``) hand the new text to the
rules after them. Output: kept documents in the input's schema (``part-XXXXX.train.parquet``, one per
input part that keeps any document: an input part whose documents are all dropped writes no part, so
every part loads with any reader) and, with ``write_exclusions``, the dropped ones in the
``excluded/`` side folder (``excluded/excluded-XXXXX.parquet``, likewise only when non-empty:
``id``, ``url``, ``rule``, ``reason`` = "rule:reason", ``value`` = the measured quantity, optionally
``text``). Read them with :func:`read_exclusions`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from typing import Any, Iterable

from pydantic import Field, field_validator
from refinery.tasks.config import StrictModel

from refinery.tasks.card import part_name
from refinery.tasks.filters import languages
from refinery.tasks.filters.base import RULES, Drop, Rule
from refinery.tasks.filters.c4 import C4BadWordsConfig, C4Config
from refinery.tasks.filters.code import CodeConfig
from refinery.tasks.filters.content import PiiConfig, UrlConfig
from refinery.tasks.filters.fineweb import FineWebConfig
from refinery.tasks.filters.gopher import GopherQualityConfig, GopherRepetitionConfig
from refinery.tasks.filters.text import DocView, WordTokenizer
from refinery.tasks.runtime import ShardedStage, StageOutput, stage, sum_counts

DEFAULT_RULES = ["url", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii"]


class FilterConfig(StrictModel):

    rules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_RULES),
        description="rules to run, in order: url, gopher_repetition, gopher_quality, c4, c4_badwords, fineweb, pii, code")
    url: UrlConfig = Field(default_factory=UrlConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    c4: C4Config = Field(default_factory=C4Config)
    c4_badwords: C4BadWordsConfig = Field(default_factory=C4BadWordsConfig)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    code: CodeConfig = Field(default_factory=CodeConfig)
    by_source: dict[str, list[str]] = Field(
        default_factory=dict, description="a rule chain per document `source` (e.g. {code: [code, pii], books: "
                                          "[gopher_repetition]}); sources not listed get `rules` (the web chain)")
    default_language: str = Field("en", description="language assumed for documents whose `lang` is empty")
    write_exclusions: bool = Field(True, description="write dropped documents to excluded/excluded-XXXXX.parquet")
    exclusions_text: bool = Field(False, description="also keep the dropped documents' text in the exclusions")

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, v: list[str]) -> list[str]:
        unknown = [r for r in v if r not in RULES]
        if unknown:
            raise ValueError(f"unknown filter rules {unknown}; known: {sorted(RULES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"filter rules listed twice: {v}")
        return v

    @field_validator("by_source")
    @classmethod
    def _known_source_rules(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for source, rules in v.items():
            try:
                cls._known_rules(rules)
            except ValueError as e:
                raise ValueError(f"by_source.{source}: {e}") from None
        return v

    def all_rules(self) -> list[str]:
        """Every rule some chain runs (the default chain's first, in order)."""
        out = list(self.rules)
        for rules in self.by_source.values():
            out += [r for r in rules if r not in out]
        return out


class FilterChain:
    """The configured rules, ready to run on documents (one instance per process/shard)."""

    def __init__(self, cfg: FilterConfig, tokenizer: WordTokenizer | None = None):
        self.cfg = cfg
        by_name: dict[str, Rule] = {name: RULES[name](getattr(cfg, name)) for name in cfg.all_rules()}
        self.rules: list[Rule] = [by_name[name] for name in cfg.rules]
        self.source_rules: dict[str, list[Rule]] = {src: [by_name[n] for n in names]
                                                    for src, names in cfg.by_source.items()}
        self.all_rules: list[Rule] = list(by_name.values())
        self.needs_meta = any(getattr(r, "needs_meta", False) for r in self.all_rules)
        self.tok = tokenizer
        self.counts: Counter = Counter()
        # Languages every rule has its own config thresholds for (English by default): these skip the
        # language table and keep the tokenizer the English reference comparison was made with.
        explicit = [set(r.cfg.languages) for r in self.all_rules if r.cfg.languages is not None]
        self.config_langs: frozenset[str] = frozenset(set.intersection(*explicit)) if explicit else frozenset()
        self.uses_table = any(r.cfg.other_languages == "table" for r in self.all_rules)
        self.last_thresholds = "config"   # how the last document was checked: config / table / fallback:<script>

    def profile(self, lang: str, text: str):
        """The language table row (or script fallback) for a document, None for config languages."""
        if lang in self.config_langs or not self.uses_table:
            return None
        return languages.resolve(lang, text)

    def apply(self, text: str, url: str | None = None, lang: str | None = None, source: str | None = None,
              meta: dict | None = None) -> tuple[str, tuple[str, str, float | None] | None]:
        """Run the chain on one document: (final text, None) when kept, else (text, (rule, reason, value)).
        ``source`` picks the chain (``by_source``); ``meta`` is the parsed metadata (code language)."""
        rules = self.source_rules.get(source, self.rules) if source is not None else self.rules
        lang = lang or self.cfg.default_language
        profile = self.profile(lang, text) if any(r.cfg.other_languages == "table" for r in rules) else None
        self.last_thresholds = "config" if profile is None else profile.kind
        doc = DocView(text, url, lang, self.tok, segmenter=None if profile is None else profile.segmenter, meta=meta)
        for rule in rules:
            if not rule.applies(doc.lang):
                mode = rule.cfg.other_languages
                if mode == "drop":
                    return doc.text, (rule.name, "unsupported_language", None)
                tabled = rule.for_profile(profile) if mode == "table" and profile is not None else None
                if tabled is None or profile is None:
                    rule.stats["skipped_language" if mode != "table" else "skipped_no_word_segmentation"] += 1
                    continue
                rule.stats[f"docs_checked_{profile.kind.split(':')[0]}"] += 1
                rule = tabled
            else:
                rule.stats["docs_checked"] += 1
            drop: Drop | None = rule.check(doc)
            if drop is not None:
                return doc.text, (rule.name, drop.reason, None if drop.value is None else float(drop.value))
        return doc.text, None

    def rule_stats(self) -> dict[str, dict[str, int]]:
        return {r.name: dict(sorted(r.stats.items())) for r in self.all_rules}


def filter_table(table, cfg: FilterConfig, chain: FilterChain | None = None, progress: str | None = None):
    """Filter one pyarrow Table of documents. Returns (kept table, exclusions table | None, counts)."""
    import pyarrow as pa

    chain = chain or FilterChain(cfg)
    n = table.num_rows
    cols = set(table.column_names)
    texts = table.column("text").to_pylist() if "text" in cols else [None] * n
    urls = table.column("url").to_pylist() if "url" in cols else [None] * n
    langs = table.column("lang").to_pylist() if "lang" in cols else [None] * n
    ids = table.column("id").to_pylist() if "id" in cols else [str(i) for i in range(n)]
    routed = bool(cfg.by_source) and "source" in cols
    sources = table.column("source").to_pylist() if routed else [None] * n
    metas = table.column("metadata").to_pylist() if chain.needs_meta and "metadata" in cols else [None] * n
    keep = [False] * n
    out_text: list[str] = []
    ex: dict[str, list] = {"id": [], "url": [], "rule": [], "reason": [], "value": []}
    if cfg.exclusions_text:
        ex["text"] = []
    by_rule: Counter = Counter()
    by_reason: Counter = Counter()
    by_lang: dict[str, dict] = {}
    by_source: dict[str, dict] = {}
    corrupt = modified = 0
    bar = None
    if progress:
        from tqdm import tqdm
        from refinery.tasks.progress import bar_disabled
        bar = tqdm(total=n, desc=progress, unit="doc", disable=bar_disabled(), leave=False)
    for i in range(n):
        text = texts[i]
        if not isinstance(text, str):
            corrupt += 1
            rule, reason, value, final = "input", "corrupt", None, None
        else:
            final, dropped = chain.apply(text, urls[i], langs[i], sources[i], _meta(metas[i]))
            if routed:
                raw_src = sources[i]
                src: str = raw_src if isinstance(raw_src, str) and raw_src in cfg.by_source else "default"
                per_src = by_source.setdefault(src, {"docs_in": 0, "docs_out": 0})
                per_src["docs_in"] += 1
                per_src["docs_out"] += dropped is None
            per_lang = by_lang.setdefault(langs[i] or cfg.default_language, _lang_counts())
            per_lang["docs_in"] += 1
            per_lang["thresholds"][chain.last_thresholds] += 1
            if dropped is None:
                per_lang["docs_out"] += 1
            else:
                per_lang["dropped_by_reason"][f"{dropped[0]}:{dropped[1]}"] += 1
            if dropped is None:
                keep[i] = True
                out_text.append(final)
                modified += final != text
                if bar is not None and i % 256 == 255:
                    bar.update(256)
                continue
            rule, reason, value = dropped
        by_rule[rule] += 1
        by_reason[f"{rule}:{reason}"] += 1
        if cfg.write_exclusions:
            ex["id"].append(ids[i])
            ex["url"].append(urls[i])
            ex["rule"].append(rule)
            ex["reason"].append(f"{rule}:{reason}")
            ex["value"].append(value)
            if cfg.exclusions_text:
                ex["text"].append(text if isinstance(text, str) else None)
        if bar is not None and i % 256 == 255:
            bar.update(256)
    if bar is not None:
        bar.update(n - bar.n)
        bar.close()
    kept = table.filter(pa.array(keep, type=pa.bool_()))
    if "text" in cols:
        idx = kept.column_names.index("text")
        kept = kept.set_column(idx, kept.schema.field(idx), pa.array(out_text, type=kept.schema.field(idx).type))
    excluded = None
    if cfg.write_exclusions:
        schema = pa.schema([("id", pa.string()), ("url", pa.string()), ("rule", pa.string()),
                            ("reason", pa.string()), ("value", pa.float64())]
                           + ([("text", pa.string())] if cfg.exclusions_text else []))
        excluded = pa.table({k: pa.array(v, type=schema.field(k).type) for k, v in ex.items()}, schema=schema)
    n_out = sum(keep)
    counts = {
        "docs_in": n, "docs_out": n_out, "dropped": n - n_out, "corrupt": corrupt, "modified": modified,
        "dropped_by_rule": dict(sorted(by_rule.items())),
        "dropped_by_reason": dict(sorted(by_reason.items())),
        # per language: documents in/out, which thresholds checked them (config = the rules' own, table =
        # the language table, fallback:<script>), drops by rule:reason
        "by_language": {lang: {k: (dict(sorted(v.items())) if isinstance(v, Counter) else v) for k, v in c.items()}
                        for lang, c in sorted(by_lang.items())},
    }
    if routed:
        counts["by_source"] = dict(sorted(by_source.items()))   # "default" = the `rules` chain
    return kept, excluded, counts


def _meta(raw) -> dict | None:
    if raw is None or isinstance(raw, dict):
        return raw
    try:
        d = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _lang_counts() -> dict:
    return {"docs_in": 0, "docs_out": 0, "thresholds": Counter(), "dropped_by_reason": Counter()}


def table_rows(counts: dict, rules: Iterable[str] | None = None) -> list[dict]:
    """Rows for a table artifact: one per (rule, reason) with its share of the input, plus totals."""
    docs_in = counts.get("docs_in", 0) or 0
    rows = []
    order = list(rules or []) + ["input"]
    by_reason = counts.get("dropped_by_reason", {})
    for key in sorted(by_reason, key=lambda k: (order.index(k.split(":")[0]) if k.split(":")[0] in order
                                                else len(order), k)):
        rule, reason = key.split(":", 1)
        n = by_reason[key]
        rows.append({"rule": rule, "reason": reason, "dropped": n,
                     "pct_of_input": round(100.0 * n / docs_in, 3) if docs_in else 0.0})
    rows.append({"rule": "total", "reason": "kept", "dropped": counts.get("docs_out", 0),
                 "pct_of_input": round(100.0 * counts.get("docs_out", 0) / docs_in, 3) if docs_in else 0.0})
    return rows


def language_rows(counts: dict) -> list[dict]:
    """Rows for a table artifact: per language, documents in/out, thresholds used, top drop reasons."""
    rows = []
    for lang, c in sorted(counts.get("by_language", {}).items(), key=lambda kv: -kv[1].get("docs_in", 0)):
        reasons = sorted(c.get("dropped_by_reason", {}).items(), key=lambda kv: -kv[1])
        rows.append({"lang": lang, "docs_in": c.get("docs_in", 0), "docs_out": c.get("docs_out", 0),
                     "thresholds": ", ".join(f"{k}={v}" for k, v in sorted(c.get("thresholds", {}).items())),
                     "top_drops": ", ".join(f"{k}={v}" for k, v in reasons[:3])})
    return rows


def _file_digest(paths: Iterable) -> list[str]:
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.append(h.hexdigest()[:16])
    return out


EXCLUDED_DIR = "excluded"
DROP_CHART = "drops.png"   # kept and dropped documents per rule and per language


def read_exclusions(ds):
    """The exclusions side table of a filter dataset (empty table when nothing was dropped or
    ``write_exclusions`` was off)."""
    import pyarrow as pa

    files = [ds.file(f["path"]) for f in ds.manifest.get("files", [])
             if f["path"].startswith(f"{EXCLUDED_DIR}/") and f["path"].endswith(".parquet")]
    return ds.read_table(files=files) if files else pa.table({})


# version 2: parts named part-XXXXX.train.parquet, no empty parts, exclusions under excluded/
@stage("filter", version="2", sharded=True)
class Filter(ShardedStage):
    """Quality and content filtering: one shard per input parquet part."""

    @staticmethod
    def identity(cfg: FilterConfig) -> list[str]:
        """Contents of the list files the rules read, so editing a list re-runs the stage."""
        from refinery.tasks.filters.c4 import C4BadWords

        paths: list = []
        rules = cfg.all_rules()
        if "url" in rules:
            for files in cfg.url.files().values():
                paths.extend(files)
        if "c4_badwords" in rules:
            d = C4BadWords(cfg.c4_badwords).dir
            paths.extend(sorted(d.glob("*.txt")))
        if any(getattr(cfg, r).other_languages == "table" for r in rules):
            paths.append(languages.TABLE_FILE)
        return ["lists:" + ",".join(_file_digest(sorted(paths, key=str)))] if paths else []

    @staticmethod
    def plan(inputs: list, cfg: FilterConfig) -> list[dict]:
        items: list[dict] = []
        for ds in inputs:
            for path in ds.files:
                if path.endswith(".parquet"):
                    items.append({"name": f"part-{len(items):05d}", "dataset": ds.path, "file": path,
                                  "index": len(items)})
        return items

    @staticmethod
    def shard(b, item: dict, cfg: FilterConfig) -> dict:
        from refinery.tasks.store import Dataset

        ds = Dataset.open(item["dataset"])
        try:
            table = next(ds.iter_tables(files=[item["file"]]))
        except Exception as e:
            raise RuntimeError(f"filter: cannot read input part {item['file']}: {e}") from e
        chain = FilterChain(cfg)
        t0 = time.perf_counter()
        kept, excluded, counts = filter_table(table, cfg, chain, progress=f"filter {item['name']}")
        seconds = time.perf_counter() - t0
        # Empty tables are not written: a shard that keeps (or drops) nothing is still recorded as
        # done by the runtime, and zero-row files would only trip readers that infer schemas.
        if kept.num_rows:
            b.write_table(part_name(item["index"]), kept)
        if excluded is not None and excluded.num_rows:
            b.write_table(f"{EXCLUDED_DIR}/excluded-{item['index']:05d}.parquet", excluded)
        counts["rules"] = chain.rule_stats()
        return {"counts": counts, "seconds": seconds}

    @staticmethod
    def reduce(b, results: list[dict], cfg: FilterConfig, inputs) -> StageOutput:
        counts = sum_counts([r["counts"] for r in results])
        for key in ("docs_in", "docs_out", "dropped", "corrupt", "modified"):
            counts.setdefault(key, 0)
        seconds = sum(r.get("seconds", 0.0) for r in results)
        rows = table_rows(counts, cfg.all_rules())
        if "prefect" in sys.modules:   # no Prefect loaded -> not inside a flow run -> no artifact
            try:
                from refinery.tasks.report import table_artifact
                table_artifact("filter-drops", rows, description="documents dropped per rule and reason")
            except Exception:  # artifacts are a convenience; never fail the stage on them
                pass
        stats = {"filter_seconds": round(seconds, 3),
                 "docs_per_sec": round(counts["docs_in"] / seconds, 1) if seconds else None,
                 "table": rows}
        # the same counts as a chart (kept and dropped per rule and per language), named in the card
        from refinery.tasks.report import drop_chart
        chart = f"{b.tmpdir()}/{DROP_CHART}"
        drop_chart(counts, chart, cfg.all_rules())
        b.put_file(chart, DROP_CHART)
        return StageOutput(counts=counts, stats=stats, extra={"rules": list(cfg.rules), "chart": DROP_CHART})


def run_filter(store, inputs: list[Any], cfg: FilterConfig | None = None):
    """Plain-Python entry point: filter ``inputs`` (datasets or paths) into ``store``; returns the Dataset."""
    return Filter.run(store, inputs, cfg or FilterConfig())
