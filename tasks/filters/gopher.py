"""Gopher rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
Gopher", arXiv:2112.11446, appendix A.1.1 "quality filter" and table A1 "repetition removal").

Defaults are the paper's values; the reference implementation compared against in ``bench/filters.py``
is datatrove's ``pipeline/filters/gopher_quality_filter.py`` / ``gopher_repetition_filter.py``, which uses
the same numbers. Word statistics come from the document's shared token view (one tokenization for all
rules); n-gram repetition uses integer token ids and vectorised rolling hashes instead of joined strings.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from typing import Literal

import numpy as np
from pydantic import Field

from refinery.tasks.filters.base import Drop, Rule, RuleConfig, register
from refinery.tasks.filters.text import DocView

# Gopher A.1.1: "at least two of the following English words: the, be, to, of, and, that, have, with".
EN_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]


class GopherQualityConfig(RuleConfig):
    # Thresholds tuned on English MassiveWeb; other languages get the language table's (FineWeb-2) values.
    languages: list[str] | None = ["en"]
    other_languages: Literal["skip", "drop", "table"] = "table"
    min_doc_words: int | None = Field(50, description="Gopher A.1.1: 50 <= words; datatrove min_doc_words=50")
    max_doc_words: int | None = Field(100_000, description="Gopher A.1.1: words <= 100,000")
    min_avg_word_length: float | None = Field(3, description="Gopher A.1.1: mean word length in [3, 10]")
    max_avg_word_length: float | None = Field(10, description="Gopher A.1.1: mean word length in [3, 10]")
    max_symbol_word_ratio: float | None = Field(
        0.1, description="Gopher A.1.1: symbol-to-word ratio <= 0.1 for '#' and for ellipsis")
    max_bullet_lines_ratio: float | None = Field(0.9, description="Gopher A.1.1: <= 90% of lines start with a bullet")
    max_ellipsis_lines_ratio: float | None = Field(0.3, description="Gopher A.1.1: <= 30% of lines end with an ellipsis")
    min_alpha_words_ratio: float | None = Field(
        0.8, description="Gopher A.1.1: >= 80% of words contain an alphabetic character")
    min_stop_words: int | None = Field(2, description="Gopher A.1.1: at least 2 of the stop words")
    stop_words: dict[str, list[str]] = Field(
        default_factory=lambda: {"en": list(EN_STOP_WORDS)},
        description="stop words per language; the stop-word check is skipped for languages not listed "
                    "(it assumes English function words)")


@register
class GopherQuality(Rule[GopherQualityConfig]):
    name = "gopher_quality"
    config_cls = GopherQualityConfig

    def __init__(self, cfg: GopherQualityConfig):
        super().__init__(cfg)
        self.stop_sets = {lang: frozenset(ws) for lang, ws in cfg.stop_words.items()}

    def table_overrides(self, profile) -> dict | None:
        # FineWeb-2 (fineweb-2-pipeline.py): the table's word-length and alphabetic-word thresholds and
        # stop words with min_stop_words=2; the other Gopher thresholds stay at their defaults.
        if not profile.has_words:
            return None
        return {"min_avg_word_length": profile.min_avg_word_length,
                "max_avg_word_length": profile.max_avg_word_length,
                "min_alpha_words_ratio": profile.min_alpha_words_ratio,
                "stop_words": {profile.lang: list(profile.stop_words)} if profile.stop_words else {}}

    def check(self, doc: DocView) -> Drop | None:
        c: GopherQualityConfig = self.cfg
        n_words = n_word = len_word = n_alpha = 0
        for info in doc.infos:
            n_words += info.n
            n_word += info.n_word
            len_word += info.len_word
            n_alpha += info.n_alpha
        # word counts exclude tokens made only of symbols (as the reference implementation does)
        if c.min_doc_words and n_word < c.min_doc_words:
            return Drop("short_doc", n_word)
        if c.max_doc_words and n_word > c.max_doc_words:
            return Drop("long_doc", n_word)
        if n_words == 0:
            return Drop("short_doc", 0)
        avg = len_word / n_word if n_word else float("nan")
        if c.min_avg_word_length and avg < c.min_avg_word_length:
            return Drop("below_avg_word_length", avg)
        if c.max_avg_word_length and avg > c.max_avg_word_length:
            return Drop("above_avg_word_length", avg)
        text = doc.text
        if c.max_symbol_word_ratio:
            r = text.count("#") / n_words
            if r > c.max_symbol_word_ratio:
                return Drop("too_many_hashes", r)
            r = (text.count("...") + text.count("…")) / n_words
            if r > c.max_symbol_word_ratio:
                return Drop("too_many_ellipsis", r)
        if c.max_bullet_lines_ratio or c.max_ellipsis_lines_ratio:
            lines = text.splitlines() or [""]
            if c.max_bullet_lines_ratio:
                r = sum(1 for s in lines if s.lstrip().startswith(("•", "-"))) / len(lines)
                if r > c.max_bullet_lines_ratio:
                    return Drop("too_many_bullets", r)
            if c.max_ellipsis_lines_ratio:
                r = sum(1 for s in lines if s.rstrip().endswith(("...", "…"))) / len(lines)
                if r > c.max_ellipsis_lines_ratio:
                    return Drop("too_many_end_ellipsis", r)
        if c.min_alpha_words_ratio:
            r = n_alpha / n_words
            if r < c.min_alpha_words_ratio:
                return Drop("below_alpha_words_ratio", r)
        stop = self.stop_sets.get(doc.lang or "")
        if c.min_stop_words and stop is not None:
            found = len(stop.intersection(doc.words))
            if found < c.min_stop_words:
                return Drop("not_enough_stop_words", found)
        return None


# --------------------------------------------------------------------------- repetition
class GopherRepetitionConfig(RuleConfig):
    # Gopher's values for English; other languages get the language table's (FineWeb-2) values, with
    # words from the language's segmenter.
    languages: list[str] | None = ["en"]
    other_languages: Literal["skip", "drop", "table"] = "table"
    dup_line_frac: float | None = Field(0.3, description="Gopher table A1: duplicate line fraction 0.30")
    dup_para_frac: float | None = Field(0.3, description="Gopher table A1: duplicate paragraph fraction 0.30")
    dup_line_char_frac: float | None = Field(0.2, description="Gopher table A1: duplicate line character fraction 0.20")
    dup_para_char_frac: float | None = Field(
        0.2, description="Gopher table A1: duplicate paragraph character fraction 0.20")
    top_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)],
        description="Gopher table A1: top 2/3/4-gram character fraction 0.20/0.18/0.16")
    dup_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)],
        description="Gopher table A1: duplicate 5..10-gram character fraction 0.15 .. 0.10")


_PARA = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_P = np.uint64(1_000_003)


def duplicates(items: list[str]) -> tuple[int, int]:
    """(number of elements seen before, characters in them)."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


def ngram_hashes(ids: np.ndarray, n_max: int) -> list[np.ndarray]:
    """hashes[n] = uint64 rolling hash of every n-gram (index 0 and 1 unused except 1 = ids)."""
    out: list[np.ndarray] = [ids, ids]
    h = ids
    with np.errstate(over="ignore"):
        for n in range(2, n_max + 1):
            if len(h) < 2:
                h = h[:0]
            else:
                h = h[:-1] * _P + ids[n - 1:]
            out.append(h)
    return out


def top_ngram_chars(h: np.ndarray, cum: np.ndarray, n: int) -> int:
    """Characters covered by the most frequent n-gram: len(" ".join(gram)) * count; ties go to the
    n-gram seen first."""
    uniq, first, counts = np.unique(h, return_index=True, return_counts=True)
    best = counts.max()
    i = int(first[counts == best].min())
    return int(cum[i + n] - cum[i] + n - 1) * int(best)


def dup_ngram_chars(h: np.ndarray, cum: np.ndarray, n: int) -> int:
    """Characters in n-grams that repeat an earlier one, scanning left to right and jumping over a
    repeated n-gram (so overlapping repeats are not counted twice).

    Same result as the plain scan (:func:`dup_ngram_chars_scan`), but the Python loop only visits
    positions whose n-gram occurred before: a first occurrence is never counted, it only matters
    whether it was visited (not jumped over) when a later copy asks "seen before?".
    """
    size = len(h)
    if size < 2:
        return 0
    order = np.argsort(h, kind="stable")
    sh = h[order]
    repeat = sh[1:] == sh[:-1]
    if not repeat.any():
        return 0
    group_start = np.flatnonzero(np.r_[True, ~repeat])           # in sorted order
    gid_sorted = np.cumsum(np.r_[True, ~repeat]) - 1
    gid = np.empty(size, dtype=np.int64)
    gid[order] = gid_sorted
    candidates = np.sort(order[1:][repeat]).tolist()
    gid_l = gid.tolist()
    order_l = order.tolist()
    starts = group_start.tolist() + [size]
    cum_l = cum.tolist()
    first_visited: dict[int, int] = {}    # group -> earliest visited position found so far
    scanned: dict[int, int] = {}          # group -> index (into sorted order) scanned up to
    jumps_start: list[int] = []           # jumped-over ranges [a, b), non-overlapping, increasing
    jumps_end: list[int] = []
    total = 0
    next_free = 0
    for c in candidates:
        if c < next_free:
            continue                      # inside the previous jump: not visited
        g = gid_l[c]
        fv = first_visited.get(g)
        if fv is None:
            k = scanned.get(g, starts[g])
            stop = starts[g + 1]
            while k < stop:
                pos = order_l[k]
                if pos >= c:
                    break
                k += 1
                # visited unless inside a jump
                j = bisect_right(jumps_start, pos) - 1
                if j < 0 or pos >= jumps_end[j]:
                    fv = pos
                    first_visited[g] = pos
                    break
            scanned[g] = k
        if fv is not None and fv < c:
            total += cum_l[c + n] - cum_l[c]
            next_free = c + n
            jumps_start.append(c + 1)
            jumps_end.append(c + n)
    return total


def dup_ngram_chars_scan(keys: list, lens: list[int], n: int) -> int:
    """The plain left-to-right scan (reference for tests)."""
    seen: set = set()
    total, i = 0, 0
    while i < len(keys):
        if keys[i] in seen:
            total += sum(lens[i:i + n])
            i += n
        else:
            seen.add(keys[i])
            i += 1
    return total


@register
class GopherRepetition(Rule[GopherRepetitionConfig]):
    name = "gopher_repetition"
    config_cls = GopherRepetitionConfig

    def table_overrides(self, profile) -> dict | None:
        # FineWeb-2 disables the paragraph and line-character checks (trafilatura leaves few paragraphs;
        # FineWebQuality checks duplicate line characters) and takes the rest from the table. Without
        # word segmentation only the line check is meaningful.
        return {"dup_para_frac": 0, "dup_para_char_frac": 0, "dup_line_char_frac": 0,
                "dup_line_frac": profile.dup_line_frac,
                "top_n_grams": list(profile.top_n_grams) if profile.has_words else [],
                "dup_n_grams": list(profile.dup_n_grams) if profile.has_words else []}

    def check(self, doc: DocView) -> Drop | None:
        c: GopherRepetitionConfig = self.cfg
        text = doc.text
        if not text:
            return Drop("empty", 0)
        n_chars = len(text)
        paragraphs = _PARA.split(text.strip())
        n, chars = duplicates(paragraphs)
        if c.dup_para_frac and n / len(paragraphs) > c.dup_para_frac:
            return Drop("dup_para_frac", n / len(paragraphs))
        if c.dup_para_char_frac and chars / n_chars > c.dup_para_char_frac:
            return Drop("dup_para_char_frac", chars / n_chars)
        lines = _LINES.split(text)
        n, chars = duplicates(lines)
        if c.dup_line_frac and n / len(lines) > c.dup_line_frac:
            return Drop("dup_line_frac", n / len(lines))
        if c.dup_line_char_frac and chars / n_chars > c.dup_line_char_frac:
            return Drop("dup_line_char_frac", chars / n_chars)
        if not c.top_n_grams and not c.dup_n_grams:
            return None
        ids, lens = doc.token_ids()
        if len(ids) == 0:
            return None
        cum = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=cum[1:])
        n_max = max([n for n, _ in c.top_n_grams] + [n for n, _ in c.dup_n_grams])
        hashes = ngram_hashes(ids, n_max)
        for n, frac in c.top_n_grams:
            h = hashes[n]
            if len(h) == 0:
                continue
            r = top_ngram_chars(h, cum, n) / n_chars
            if r > frac:
                return Drop(f"top_{n}_gram", r)
        for n, frac in c.dup_n_grams:
            r = dup_ngram_chars(hashes[n], cum, n) / n_chars
            if r > frac:
                return Drop(f"duplicated_{n}_n_grams", r)
        return None
