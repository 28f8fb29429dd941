"""C4 rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", JMLR 21, section 2.2 "Colossal Clean Crawled Corpus"), plus the two line rules that are in
the reference code but not in the paper (tensorflow_datasets text/c4_utils.py: long words, cookie/terms
policy lines). The implementation compared against is datatrove's ``pipeline/filters/c4_filters.py``
(``C4QualityFilter``, ``C4BadWordsFilter``).

``c4`` rewrites ``text`` (drops the lines that fail the line rules, removes citation markers) and drops a
document by the document rules; ``c4_badwords`` drops documents containing a word of the
"List of Dirty, Naughty, Obscene or Otherwise Bad Words" (LDNOOBW) for the document's language.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from pydantic import Field

from refinery.tasks.filters.base import Drop, Rule, RuleConfig, register
from refinery.tasks.filters.text import DATA_DIR, DocView, count_sentences

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ["terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                     "use cookies"]


class C4Config(RuleConfig):
    # The C4 heuristics were designed for English (C4 keeps only langdetect "en" pages).
    languages: list[str] | None = ["en"]
    split_paragraph: bool = Field(True, description="C4 works on lines ('\\n'); False = on sentences")
    remove_citations: bool = Field(True, description="strip Wikipedia citation markers [1], [edit], [citation needed]")
    filter_no_terminal_punct: bool = Field(
        True, description="C4 2.2: only retain lines ending in a terminal punctuation mark (. ! ? \")")
    min_num_sentences: int = Field(5, description="C4 2.2: discard pages with fewer than 5 sentences; -1 disables")
    min_words_per_line: int = Field(3, description="C4 2.2: only retain lines with at least 3 words; -1 disables")
    max_word_length: int = Field(
        1000, description="c4_utils.py: drop lines with a word over 1000 characters; -1 disables")
    filter_lorem_ipsum: bool = Field(True, description="C4 2.2: remove pages containing 'lorem ipsum'")
    filter_javascript: bool = Field(True, description="C4 2.2: remove lines with the word 'javascript'")
    filter_curly_bracket: bool = Field(True, description="C4 2.2: remove pages containing a curly bracket")
    filter_policy: bool = Field(True, description="c4_utils.py: remove lines with cookie / terms-of-use phrases")
    policy_substrings: list[str] = Field(default_factory=lambda: list(POLICY_SUBSTRINGS))


@register
class C4Quality(Rule[C4Config]):
    name = "c4"
    config_cls = C4Config

    def check(self, doc: DocView) -> Drop | None:
        c: C4Config = self.cfg
        st = self.stats
        tok = doc.tokenizer
        if c.split_paragraph:
            lines = doc.text.splitlines()
        else:
            lines = _sentences(doc.text, tok)
        kept: list[str] = []
        n_sent = 0
        policy = c.policy_substrings
        for line in lines:
            line = line.strip()
            words = line.split()
            st["lines"] += 1
            if c.max_word_length != -1 and any(len(w) > c.max_word_length for w in words):
                st["lines_dropped_too_long_word"] += 1
                continue
            if c.remove_citations and "[" in line:
                line = CITATION.sub("", line)
            if c.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                st["lines_dropped_no_terminal_punct"] += 1
                continue
            if len(words) < c.min_words_per_line:
                st["lines_dropped_too_few_words"] += 1
                continue
            low = line.lower()
            if c.filter_lorem_ipsum and "lorem ipsum" in low:
                return Drop("lorem_ipsum", None)
            if c.filter_javascript and "javascript" in low:
                st["lines_dropped_javascript"] += 1
                continue
            if c.filter_curly_bracket and "{" in line:
                return Drop("curly_bracket", None)
            if c.filter_policy and any(p in low for p in policy):
                st["lines_dropped_policy"] += 1
                continue
            if c.min_num_sentences != -1:
                n_sent += count_sentences(tok.tokenize(line)) if c.split_paragraph else 1
            kept.append(line)
            st["lines_kept"] += 1
        if n_sent < c.min_num_sentences:
            return Drop("too_few_sentences", n_sent)
        new = ("\n" if c.split_paragraph else " ").join(kept).strip()
        if new != doc.text:
            st["docs_modified"] += 1
            doc.set_text(new)
        return None


def _sentences(text: str, tok) -> list[str]:
    """Split text into sentences with the same boundary rule as :func:`count_sentences`."""
    from refinery.tasks.filters.text import _is_punct_cached, terminal_punctuation

    term = terminal_punctuation()
    out: list[str] = []
    cur: list[str] = []
    seen = False
    for chunk in text.split():
        for t in tok.chunk(chunk).tokens:
            if t in term:
                seen = True
            elif seen and not _is_punct_cached(t):
                out.append(" ".join(cur))
                cur, seen = [], False
        cur.append(chunk)
    if cur:
        out.append(" ".join(cur))
    return out


# --------------------------------------------------------------------------- bad words
class C4BadWordsConfig(RuleConfig):
    languages: list[str] | None = Field(
        None, description="null = every language that has a word list in badwords_dir")
    badwords_dir: str | None = Field(
        None, description="folder of '<lang>.txt' lists (one word or phrase per line); null = the packaged "
                          "LDNOOBW list (en, commit 25e679f, the list C4 used)")
    keep_fraction: float = Field(0.0, description="C4 2.2 drops every page with a bad word (0.0); datatrove default 0.0")
    seed: int = 0


# Words allowed because they are common sub-words in languages written without spaces (datatrove
# c4_filters.py _BADWORDS_ALLOWLIST, after mC4).
_ALLOWLIST = {"ja": {"sm", "グロ", "女の子"}, "zh": {"性"}}
_NO_SPACE_LANGS = {"ja", "th", "zh"}


def _trie_regex(words: list[str]) -> str:
    """One regex alternation factored as a trie (same language as ``a|b|c``, far fewer backtracks)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        alts = []
        end = "" in node
        for ch in sorted(k for k in node if k):
            alts.append(re.escape(ch) + emit(node[ch]))
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 and not end else "(?:" + "|".join(alts) + ")"
        return body + ("?" if end else "")

    return emit(trie)


def load_word_list(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [w.strip() for w in f if w.strip() and not w.startswith("#")]


@register
class C4BadWords(Rule[C4BadWordsConfig]):
    name = "c4_badwords"
    config_cls = C4BadWordsConfig

    def __init__(self, cfg: C4BadWordsConfig):
        super().__init__(cfg)
        self.dir = Path(cfg.badwords_dir) if cfg.badwords_dir else DATA_DIR / "badwords"
        self._regex: dict[str, re.Pattern | None] = {}
        self._rng = random.Random(cfg.seed)

    def applies(self, lang: str | None) -> bool:
        if self.cfg.languages is not None:
            return lang in self.cfg.languages
        return self.pattern(lang or "") is not None

    def pattern(self, lang: str) -> re.Pattern | None:
        if lang not in self._regex:
            path = self.dir / f"{lang}.txt"
            if not path.exists():
                self._regex[lang] = None
            else:
                words = set(load_word_list(path))
                for allow in _ALLOWLIST.values():
                    words -= allow
                body = _trie_regex(sorted(words))
                self._regex[lang] = re.compile(body if lang in _NO_SPACE_LANGS else rf"(?:\W|^)(?:{body})(?:\W|$)")
        return self._regex[lang]

    def check(self, doc: DocView) -> Drop | None:
        pat = self.pattern(doc.lang or "")
        if pat is None:
            self.stats["missing_badwords_lang"] += 1
            return None
        if pat.search(doc.text.lower()) is None:
            return None
        self.stats["docs_with_badwords"] += 1
        if self.cfg.keep_fraction > 0.0 and self._rng.random() < self.cfg.keep_fraction:
            self.stats["docs_kept_with_badwords"] += 1
            return None
        return Drop("badwords", None)
