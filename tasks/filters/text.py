"""Text primitives shared by the filter rules: one word tokenizer, character classes, a per-document view.

Word tokenization follows the rules of spaCy's blank English tokenizer (what datatrove's filters use
for English): split on whitespace, then peel prefixes/suffixes (punctuation, quotes, currency, units,
"'s", a final period after a lowercase letter or digit), keep special cases whole or split as listed
(``data/en_tokenizer_exceptions.json``: "don't" -> "do" "n't", "Mr.", emoticons), keep URLs/e-mails
whole, and split infixes (hyphens between letters, "..." and "/" or ":" between letters, "," between
letters, "." between a lowercase and an uppercase letter). It is written from those rules, not from
spaCy's code, and needs no model. Results are cached per whitespace-separated chunk (web text is
Zipfian, so almost every chunk is a cache hit) together with the per-chunk figures the Gopher rules
need, so one pass over ``text.split()`` serves every rule.
"""
from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import regex

DATA_DIR = Path(__file__).resolve().parent / "data"

# Characters that make a token a "symbol" for the Gopher rules: ASCII and CJK punctuation, control
# characters and sentence terminals. Kept equal to datatrove's utils/text.py PUNCTUATION so the
# Gopher word counts are comparable with the reference implementation.
_PUNCT_CHARS = ("!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
                + "".join(chr(x) for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b)))


@lru_cache(maxsize=1)
def terminal_punctuation() -> frozenset[str]:
    """Unicode ``Sentence_Terminal`` characters (., !, ?, 。, ।, ...), the set FineWeb's line rule uses."""
    pat = regex.compile(r"\p{Sentence_Terminal}")
    return frozenset(chr(c) for c in range(0x20000) if pat.match(chr(c)))


@lru_cache(maxsize=1)
def punctuation_set() -> frozenset[str]:
    return frozenset(_PUNCT_CHARS) | terminal_punctuation()


def is_punct_token(tok: str) -> bool:
    """spaCy's ``is_punct``: every character is Unicode punctuation (category P*)."""
    return all(unicodedata.category(c)[0] == "P" for c in tok)


# spaCy's sentencizer boundary characters (its default ``punct_chars``): the Sentence_Terminal set.
def sentence_punct() -> frozenset[str]:
    return terminal_punctuation()


# --------------------------------------------------------------------------- the tokenizer rules
_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧"
_PUNCT_LIST = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_CURRENCY = r"\$|£|€|¥|฿|US\$|C\$|A\$|₽|﷼|[₠-₿]"
_UNITS = ("km|km²|km³|m|m²|m³|dm|dm²|dm³|cm|cm²|cm³|mm|mm²|mm³|ha|µm|nm|yd|in|ft|kg|g|mg|µg|t|lb|oz|m/s|km/h|"
          "kmh|mph|hPa|Pa|mbar|mb|MB|kb|KB|gb|GB|tb|TB|T|G|M|K|%|км|км²|км³|м|м²|м³|дм|дм²|дм³|см|см²|см³|"
          "мм|мм²|мм³|нм|кг|г|мг|м/с|км/ч|кПа|Па|мбар|Кб|КБ|кб|Мб|МБ|мб|Гб|ГБ|гб|Тб|ТБ|тб")
_PQ = regex.escape(_PUNCT_LIST + _QUOTES)

_PREFIX = regex.compile(
    r"^(?:§|%|=|—|–|\+(?![0-9])|…|……|[" + regex.escape(_PUNCT_LIST) + r"]|\.\.+|[" + regex.escape(_QUOTES)
    + r"]|" + _CURRENCY + r"|\p{So})")
_SUFFIX = regex.compile(
    r"(?:…|……|[" + regex.escape(_PUNCT_LIST) + r"]|\.\.+|[" + regex.escape(_QUOTES) + r"]|\p{So}"
    r"|'s|'S|’s|’S|—|–"
    r"|(?<=[0-9])\+|(?<=°[FfCcKk])\.|(?<=[0-9])(?:" + _CURRENCY + r")|(?<=[0-9])(?:" + _UNITS + r")"
    r"|(?<=[0-9\p{Ll}%²\-+|" + _PQ + r"])\.|(?<=\p{Lu}\p{Lu})\.)$")
_INFIX = regex.compile(
    r"\.\.+|…|\p{So}|(?<=[0-9])[+\-*^](?=[0-9-])"
    r"|(?<=[\p{Ll}" + regex.escape(_QUOTES) + r"])\.(?=[\p{Lu}" + regex.escape(_QUOTES) + r"])"
    r"|(?<=\p{L}),(?=\p{L})"
    r"|(?<=[\p{L}0-9])(?:-|–|—|--|---|——|~)(?=\p{L})"
    r"|(?<=[\p{L}0-9])[:<>=/](?=\p{L})")
# URLs, host names and e-mail addresses stay one token (after prefixes/suffixes are peeled).
_URL = regex.compile(
    r"^(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?"
    r"(?:(?:\d{1,3}\.){3}\d{1,3}|(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?"
    r"[A-Za-z0-9\u00a1-\uffff]\.)+(?:\p{Ll}{2,63}|xn--[a-z0-9]{1,59}))"
    r"(?::\d{2,5})?(?:[/?#]\S*)?$")


@lru_cache(maxsize=1)
def _exceptions() -> dict[str, list[str]]:
    with open(DATA_DIR / "en_tokenizer_exceptions.json", encoding="utf-8") as f:
        return json.load(f)


def _split_chunk(chunk: str, specials: dict[str, list[str]]) -> list[str]:
    """Tokens of one whitespace-free chunk (prefixes, core, suffixes)."""
    if chunk in specials:
        return list(specials[chunk])
    prefixes: list[str] = []
    suffixes: list[str] = []
    s = chunk
    last = -1
    while s and len(s) != last:
        if s in specials:
            break
        last = len(s)
        m = _PREFIX.match(s)
        pre = m.end() if m else 0
        if pre:
            rest = s[pre:]
            if rest and rest in specials:
                prefixes.append(s[:pre])
                s = rest
                break
        # every suffix but a run of dots is at most 3 characters: search only the tail
        m = _SUFFIX.search(s, pre if s.endswith("..") else max(pre, len(s) - 4))
        suf = (len(s) - m.start()) if m else 0
        if suf:
            rest = s[:-suf]
            if rest and rest in specials:
                suffixes.append(s[-suf:])
                s = rest
                break
        if pre and suf and pre + suf <= len(s):
            prefixes.append(s[:pre])
            suffixes.append(s[-suf:])
            s = s[pre:-suf]
        elif pre:
            prefixes.append(s[:pre])
            s = s[pre:]
        elif suf:
            suffixes.append(s[-suf:])
            s = s[:-suf]
    out = prefixes
    if s:
        if s in specials:
            out.extend(specials[s])
        elif _URL.match(s):
            out.append(s)
        else:
            start = 0
            for m in _INFIX.finditer(s):
                a, b = m.span()
                if a == 0 and b == 0:
                    continue
                if a != start:
                    out.append(s[start:a])
                if a != b:
                    out.append(s[a:b])
                start = b
            if start < len(s):
                out.append(s[start:])
    out.extend(reversed(suffixes))
    return [t for t in out if t]


@lru_cache(maxsize=1)
def _affix_specials() -> tuple[dict[tuple[str, ...], list[str]], int]:
    """Special cases that the affix rules would cut up (":)", "Mr.", "''"): as spaCy does, they are
    found again in the token sequence of a chunk and merged back."""
    out = {}
    for key, toks in _exceptions().items():
        natural = tuple(_split_chunk(key, {}))
        if len(natural) > 1 and list(natural) != toks:
            out[natural] = toks
    return out, max((len(k) for k in out), default=0)


def _merge_specials(toks: list[str]) -> list[str]:
    table, longest = _affix_specials()
    out: list[str] = []
    i, n = 0, len(toks)
    while i < n:
        for size in range(min(longest, n - i), 1, -1):
            hit = table.get(tuple(toks[i:i + size]))
            if hit is not None:
                out.extend(hit)
                i += size
                break
        else:
            out.append(toks[i])
            i += 1
    return out


class ChunkInfo:
    """Tokens of one chunk and the per-token figures the Gopher/FineWeb rules add up."""
    __slots__ = ("tokens", "ids", "lens", "n", "n_word", "len_word", "n_alpha")

    def __init__(self, tokens: list[str], punct: frozenset[str], token_id):
        self.tokens = tokens
        self.ids = [token_id(t) for t in tokens]
        self.lens = [len(t) for t in tokens]
        if len(tokens) == 1 and tokens[0].isalpha():
            self.n = self.n_word = self.n_alpha = 1
            self.len_word = len(tokens[0])
            return
        self.n = len(tokens)
        words = [t for t in tokens if any(c not in punct for c in t)]
        self.n_word = len(words)                       # tokens that are not only symbols
        self.len_word = sum(len(t) for t in words)
        self.n_alpha = sum(1 for t in tokens if any(c.isalpha() for c in t))


class WordTokenizer:
    """spaCy-English-style word tokenizer with a bounded per-chunk cache (see module doc)."""

    def __init__(self, cache_size: int = 500_000):
        self.cache: dict[str, ChunkInfo] = {}
        self.vocab: dict[str, int] = {}       # token -> id (ids only compared within one document)
        self._next_id = 0
        self.cache_size = cache_size
        self.specials = _exceptions()
        self.punct = punctuation_set()

    def chunk(self, chunk: str) -> ChunkInfo:
        info = self.cache.get(chunk)
        if info is None:
            if len(self.cache) >= self.cache_size:
                self.cache.clear()
                self.vocab.clear()
            if chunk.isalpha() and chunk not in self.specials:   # no affix rule can apply
                toks = [chunk]
            else:
                toks = _split_chunk(chunk, self.specials)
                if len(toks) > 1:
                    toks = _merge_specials(toks)
            info = ChunkInfo(toks, self.punct, self.token_id)
            self.cache[chunk] = info
        return info

    def token_id(self, tok: str) -> int:
        i = self.vocab.get(tok)
        if i is None:   # ids are never reused, even after the cache is cleared
            self._next_id += 1
            i = self.vocab[tok] = self._next_id
        return i

    def infos(self, text: str) -> list[ChunkInfo]:
        get = self.cache.get
        out = []
        for c in text.split():
            info = get(c)
            out.append(info if info is not None else self.chunk(c))
        return out

    def tokenize(self, text: str) -> list[str]:
        toks: list[str] = []
        for info in self.infos(text):
            toks.extend(info.tokens)
        return toks


_TOKENIZER: WordTokenizer | None = None


def tokenizer() -> WordTokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = WordTokenizer()
    return _TOKENIZER


def count_sentences(tokens: list[str]) -> int:
    """Sentences as spaCy's rule-based sentencizer splits them: a new sentence starts at the first
    non-punctuation token after a sentence-terminal token ("." "!" "?" "。" ...)."""
    if not tokens:
        return 1
    term = terminal_punctuation()
    n = 1
    seen = False
    for t in tokens:
        if t in term:
            seen = True
        elif seen and not _is_punct_cached(t):
            n += 1
            seen = False
    return n


@lru_cache(maxsize=100_000)
def _is_punct_cached(tok: str) -> bool:
    return is_punct_token(tok)


_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")


class DocView:
    """A document as the rules see it: text plus lazily computed, shared views of it.

    Rules that rewrite the text (C4 line cleaning, PII) call :meth:`set_text`, which drops the views.
    """
    __slots__ = ("text", "url", "lang", "_infos", "_words", "_tok", "segmenter", "meta")

    def __init__(self, text: str, url: str | None = None, lang: str | None = None,
                 tok: WordTokenizer | None = None, segmenter: str | None = None, meta: dict | None = None):
        self.text = text
        self.url = url
        self.lang = lang
        self.meta = meta          # the document's parsed metadata, for rules that ask for it (code)
        self._tok = tok or tokenizer()
        # languages written without spaces: words come from a segmenter (segment.py), not the tokenizer
        self.segmenter = segmenter
        self._infos: list[ChunkInfo] | None = None
        self._words: list[str] | None = None

    def set_text(self, text: str) -> None:
        if text != self.text:
            self.text = text
            self._infos = None
            self._words = None

    @property
    def infos(self) -> list[ChunkInfo]:
        if self._infos is None:
            if self.segmenter is None:
                self._infos = self._tok.infos(self.text)
            else:
                from refinery.tasks.filters.segment import segment

                # one "chunk" holding the whole document's words: the rules only add up its figures
                words = segment(self.text, self.segmenter)
                self._infos = [ChunkInfo(words, self._tok.punct, self._tok.token_id)] if words else []
        return self._infos

    @property
    def words(self) -> list[str]:
        if self._words is None:
            toks: list[str] = []
            for info in self.infos:
                toks.extend(info.tokens)
            self._words = toks
        return self._words

    def token_ids(self):
        """(uint64 token ids, int64 token lengths) of the words, for n-gram statistics."""
        from itertools import chain

        import numpy as np

        infos = self.infos
        n = sum(i.n for i in infos)
        ids = np.fromiter(chain.from_iterable([i.ids for i in infos]), dtype=np.uint64, count=n)
        lens = np.fromiter(chain.from_iterable([i.lens for i in infos]), dtype=np.int64, count=n)
        return ids, lens

    @property
    def n_words(self) -> int:
        return sum(i.n for i in self.infos)

    @property
    def tokenizer(self) -> WordTokenizer:
        return self._tok


__all__ = ["WordTokenizer", "tokenizer", "DocView", "count_sentences", "terminal_punctuation",
           "punctuation_set", "is_punct_token", "DATA_DIR"]
