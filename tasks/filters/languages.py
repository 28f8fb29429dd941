"""Per-language thresholds for the word-level rules, and the fallback for languages without a row.

The table (``data/languages.json``) holds the FineWeb-2 thresholds (Penedo et al. 2025, "FineWeb2: One
Pipeline to Scale Them All", arXiv:2506.20920; values from huggingface/fineweb-2 ``configs/<lang>_<script>.yml``,
one source per row) for 29 of the most common Common Crawl languages. English is not in it: English
documents keep the rule configs' own values (Gopher / C4 / FineWeb), the ones ``bench/filters.py``
compares with datatrove.

A language without a row is not passed untouched. It gets the **script fallback**: the median of every
table row written in the same script (detected from the text: Latin, Cyrillic, Han, ...), without a
stop-word check (no list is known for it); a text whose script has no row at all gets the median of the
whole table. A script written without spaces that we cannot segment (Thai, Lao, Khmer, Myanmar, Tibetan)
keeps the line-level rules only: word statistics of unsegmented text would be meaningless.
Every document is counted by the thresholds it got (``table`` / ``fallback:<script>``) in the manifest.
"""
from __future__ import annotations

import json
import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from refinery.tasks.filters.text import DATA_DIR

TABLE_FILE = DATA_DIR / "languages.json"

# Scripts written without spaces between words, and the segmenter that splits them into words.
SEGMENTERS = {"Hani": "jieba", "Jpan": "mecab"}
UNSEGMENTED_SCRIPTS = {"Thai", "Laoo", "Khmr", "Mymr", "Tibt"}

# First word of a character's Unicode name -> ISO 15924 script code (the scripts of the table and the
# unsegmented ones); anything else counts as "other".
_NAME_SCRIPT = {"LATIN": "Latn", "CYRILLIC": "Cyrl", "GREEK": "Grek", "ARABIC": "Arab", "HEBREW": "Hebr",
                "DEVANAGARI": "Deva", "HANGUL": "Hang", "CJK": "Hani", "HIRAGANA": "Jpan", "KATAKANA": "Jpan",
                "THAI": "Thai", "LAO": "Laoo", "KHMER": "Khmr", "MYANMAR": "Mymr", "TIBETAN": "Tibt"}
NUMERIC_FIELDS = ("min_avg_word_length", "max_avg_word_length", "min_alpha_words_ratio", "line_punct_thr",
                  "new_line_ratio", "dup_line_frac")


@dataclass(frozen=True)
class LanguageProfile:
    """Thresholds one document is checked with (a table row or a fallback)."""
    lang: str
    script: str
    kind: str                     # "table" or "fallback:<script>"
    stop_words: tuple[str, ...]   # empty = no stop-word check
    min_avg_word_length: float
    max_avg_word_length: float
    min_alpha_words_ratio: float
    line_punct_thr: float
    new_line_ratio: float
    dup_line_frac: float
    top_n_grams: tuple[tuple[int, float], ...]
    dup_n_grams: tuple[tuple[int, float], ...]
    source: str

    @property
    def segmenter(self) -> str | None:
        return SEGMENTERS.get(self.script)

    @property
    def has_words(self) -> bool:
        """False for scripts without spaces that no segmenter splits: word rules are skipped."""
        return self.script not in UNSEGMENTED_SCRIPTS


@lru_cache(maxsize=1)
def table() -> dict[str, dict]:
    with open(TABLE_FILE, encoding="utf-8") as f:
        return json.load(f)["languages"]


def _profile(lang: str, row: dict, kind: str, stop_words: bool = True) -> LanguageProfile:
    return LanguageProfile(
        lang=lang, script=row["script"], kind=kind,
        stop_words=tuple(row["stop_words"]) if stop_words else (),
        **{k: float(row[k]) for k in NUMERIC_FIELDS},
        top_n_grams=tuple((int(n), float(f)) for n, f in row["top_n_grams"]),
        dup_n_grams=tuple((int(n), float(f)) for n, f in row["dup_n_grams"]),
        source=row["source"])


@lru_cache(maxsize=64)
def script_fallback(script: str) -> dict:
    """Median thresholds of the table rows written in ``script`` (all rows when none is)."""
    rows = [r for r in table().values() if r["script"] == script] or list(table().values())
    out: dict = {"script": script, "stop_words": []}
    for k in NUMERIC_FIELDS:
        out[k] = statistics.median(r[k] for r in rows)
    for k in ("top_n_grams", "dup_n_grams"):
        ns = [n for n, _ in rows[0][k]]
        out[k] = [[n, round(statistics.median(dict(r[k])[n] for r in rows), 3)] for n in ns]
    out["source"] = f"median of {len(rows)} table rows" + (f" in script {script}" if len(rows) < len(table()) else "")
    return out


def detect_script(text: str, sample: int = 2000) -> str:
    """The most common script among the first ``sample`` letters (ISO 15924 code, "Zyyy" if none).
    Japanese is ``Jpan`` as soon as a tenth of its letters are kana (kanji alone read as Han)."""
    counts: Counter = Counter()
    seen = 0
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        counts[_NAME_SCRIPT.get(name.split(" ", 1)[0], "other")] += 1
        seen += 1
        if seen >= sample:
            break
    if not counts:
        return "Zyyy"
    if counts["Jpan"] and counts["Jpan"] >= 0.1 * (counts["Jpan"] + counts["Hani"]):
        counts["Jpan"] += counts.pop("Hani", 0)
    script = counts.most_common(1)[0][0]
    return "Zyyy" if script == "other" else script


@lru_cache(maxsize=256)
def table_profile(lang: str) -> LanguageProfile | None:
    row = table().get(lang)
    return _profile(lang, row, "table") if row else None


def resolve(lang: str, text: str) -> LanguageProfile:
    """The table row of ``lang``, else the script fallback for ``text``."""
    prof = table_profile(lang)
    if prof is not None:
        return prof
    script = detect_script(text)
    return _fallback(lang, script)


@lru_cache(maxsize=1024)
def _fallback(lang: str, script: str) -> LanguageProfile:
    return _profile(lang, script_fallback(script), f"fallback:{script}", stop_words=False)


__all__ = ["LanguageProfile", "table", "resolve", "table_profile", "detect_script", "script_fallback",
           "SEGMENTERS", "UNSEGMENTED_SCRIPTS", "TABLE_FILE"]
