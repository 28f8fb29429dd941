"""Content rules: URL blocklist and PII redaction.

``url`` follows the RefinedWeb URL filter (Penedo et al. 2023, arXiv:2306.01116, section G.1 "URL
filtering": a domain blocklist plus a URL word score with hard and soft banned words) as implemented in
datatrove ``pipeline/filters/url_filter.py``. Every list is a plain text file the user can replace
(one entry per line, '#' starts a comment line, ``.gz`` files are read transparently).

``pii`` replaces e-mail addresses, public IP addresses and phone numbers with placeholders (datatrove
``pipeline/formatters/pii.py`` for e-mails and IPs, same placeholder values; phone numbers are our
addition) and counts the replacements. It never drops a document.
"""
from __future__ import annotations

import gzip
import ipaddress
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field

from refinery.tasks.filters.base import Drop, Rule, RuleConfig, register
from refinery.tasks.filters.c4 import _trie_regex
from refinery.tasks.filters.text import DATA_DIR, DocView

URL_DATA = DATA_DIR / "url"
_NON_ALNUM = re.compile(r"[^a-zA-Z0-9]+")


def read_list(path: str | Path) -> list[str]:
    """Entries of a list file: stripped lines, skipping blanks and '#' comment lines."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    except OSError as e:
        raise OSError(f"cannot read list file {path}: {e}") from e


def normalize_word(w: str) -> str:
    return _NON_ALNUM.sub("", w).lower()


class UrlConfig(RuleConfig):
    # List fields: null = the packaged file in tasks/filters/data/url/ (kept out of the config so the
    # stage fingerprint does not depend on where the code is installed), [] or "" = no list.
    domains_files: list[str] | None = Field(
        None, description="blocked domains, one per line (e.g. the UT1 'adult' list RefinedWeb used); a domain "
                          "blocks its subdomains; null = packaged blocked_domains.txt")
    urls_files: list[str] = Field(default_factory=list, description="blocked full URLs, one per line")
    banned_words_file: str | None = Field(
        None, description="a URL containing one of these words is dropped; null = packaged banned_words.txt")
    soft_banned_words_file: str | None = Field(
        None, description="words that count towards soft_word_threshold; null = packaged soft_banned_words.txt")
    banned_subwords_file: str | None = Field(
        None, description="substrings of the normalised URL that drop it; null = packaged banned_subwords.txt")
    soft_word_threshold: int = Field(
        2, description="RefinedWeb G.1 / datatrove url_filter.py: drop with >= 2 soft banned words")
    extra_domains: list[str] = Field(default_factory=list)
    extra_urls: list[str] = Field(default_factory=list)
    no_url: str = Field("keep", description="documents without a URL: 'keep' or 'drop'")
    domain_match: Literal["registered", "parents"] = Field(
        "registered",
        description="'registered' (RefinedWeb/datatrove): the host or its registered domain (public suffix "
                    "list, via tldextract's bundled snapshot, no network) must be listed; 'parents': the host "
                    "or any parent domain, so a listed 'x.blogspot.mk' also blocks 'www.x.blogspot.mk'")

    def files(self) -> dict[str, list[Path]]:
        def one(value: str | None, default: str) -> list[Path]:
            if value is None:
                return [URL_DATA / default]
            return [Path(value)] if value else []
        return {
            "domains": [URL_DATA / "blocked_domains.txt"] if self.domains_files is None
            else [Path(p) for p in self.domains_files],
            "urls": [Path(p) for p in self.urls_files],
            "banned": one(self.banned_words_file, "banned_words.txt"),
            "soft": one(self.soft_banned_words_file, "soft_banned_words.txt"),
            "subwords": one(self.banned_subwords_file, "banned_subwords.txt"),
        }


@register
class UrlFilter(Rule[UrlConfig]):
    name = "url"
    config_cls = UrlConfig

    def __init__(self, cfg: UrlConfig):
        super().__init__(cfg)
        files = cfg.files()

        def entries(kind: str) -> list[str]:
            return [e for f in files[kind] for e in read_list(f)]

        self.domains = {d.lower() for d in entries("domains")} | {d.lower() for d in cfg.extra_domains}
        self.urls = set(entries("urls")) | set(cfg.extra_urls)
        self.banned = {normalize_word(w) for w in entries("banned")} - {""}
        self.soft = {normalize_word(w) for w in entries("soft")} - {""}
        subwords = sorted({normalize_word(w) for w in entries("subwords")} - {""})
        self.subwords = re.compile(_trie_regex(subwords)) if subwords else None
        self._extract: Any = None  # tldextract.TLDExtract, built on first use

    def registered_domain(self, host: str) -> str:
        if self._extract is None:
            import tldextract

            # suffix_list_urls=(): the snapshot bundled with tldextract; never fetched, never cached to disk
            self._extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
        parts = self._extract(host)
        return f"{parts.domain}.{parts.suffix}" if parts.domain and parts.suffix else ""

    @staticmethod
    def host(url: str) -> str:
        try:
            host = urlsplit(url if "//" in url else "//" + url).hostname or ""
        except ValueError:
            host = ""
        return host.rstrip(".").lower()

    def check(self, doc: DocView) -> Drop | None:
        url = doc.url
        if not url:
            self.stats["no_url"] += 1
            return Drop("no_url", None) if self.cfg.no_url == "drop" else None
        host = self.host(url)
        if host and self.domains:
            if self.cfg.domain_match == "registered":
                if self.registered_domain(host) in self.domains:
                    return Drop("domain", None)
                if host in self.domains:
                    return Drop("subdomain", None)
            else:   # the host and each parent domain (a.b.example.com, b.example.com, example.com)
                labels = host.split(".")
                for i in range(len(labels) - 1):
                    if ".".join(labels[i:]) in self.domains:
                        return Drop("subdomain" if i == 0 and len(labels) > 2 else "domain", None)
        if url in self.urls:
            return Drop("url", None)
        words = set(_NON_ALNUM.split(url))
        if self.banned and not self.banned.isdisjoint(words):
            return Drop("hard_blacklisted", None)
        n_soft = len(self.soft.intersection(words))
        if n_soft >= self.cfg.soft_word_threshold:
            return Drop("soft_blacklisted", n_soft)
        if self.subwords is not None and self.subwords.search(normalize_word(url)):
            return Drop("blacklisted_subword", None)
        return None


# --------------------------------------------------------------------------- PII
# RFC 5322-style address: dot-atom local part, dotted host names or a bracketed IPv4 literal.
_EMAIL = (r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
          r"(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
          r"|\[(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\])")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
_IPV4 = rf"(?:{_OCTET}\.){{3}}{_OCTET}"
# Phone numbers: North American (555) 123-4567 / 555-123-4567 / +1 555 123 4567, and international
# "+CC" numbers with separated groups. Separators are required, so bare digit runs (ids, prices) stay.
_PHONE = (r"(?<![\w+])(?:"
          r"(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
          r"|\+[1-9]\d{0,2}(?:[ .-]\(?\d{1,4}\)?){2,5}"
          r")(?![\w])")

EMAIL_PLACEHOLDERS = ["email@example.com", "firstname.lastname@example.org"]   # datatrove pii.py defaults
IP_PLACEHOLDERS = ["22.214.171.124", "126.96.36.199", "188.8.131.52", "184.108.40.206", "220.127.116.11",
                   "18.104.22.168"]                                           # datatrove pii.py defaults
PHONE_PLACEHOLDERS = ["555-0100"]   # a number reserved for fiction in the North American plan


class PiiConfig(RuleConfig):
    emails: bool = True
    ips: bool = True
    only_public_ips: bool = Field(True, description="datatrove pii.py: only replace globally routable IPs")
    phones: bool = True
    email_placeholders: list[str] = Field(default_factory=lambda: list(EMAIL_PLACEHOLDERS))
    ip_placeholders: list[str] = Field(default_factory=lambda: list(IP_PLACEHOLDERS))
    phone_placeholders: list[str] = Field(default_factory=lambda: list(PHONE_PLACEHOLDERS))


class _Replacer:
    """Substitutes matches with placeholders used in turn (restarting for every document, so the output
    does not depend on how documents are sharded); a validator can veto a match."""

    def __init__(self, kind: str, pattern: str, placeholders: list[str], stats, validator=None):
        self.kind, self.re, self.placeholders = kind, re.compile(pattern), placeholders or ["<PII>"]
        self.validator, self.stats = validator, stats
        self.i = 0

    def _sub(self, m: re.Match) -> str:
        s = m.group(0)
        if self.validator is not None and not self.validator(s):
            return s
        out = self.placeholders[self.i % len(self.placeholders)]
        self.i += 1
        return out

    def __call__(self, text: str) -> str:
        self.i = 0
        new = self.re.sub(self._sub, text)
        if self.i:
            self.stats[self.kind] += self.i
        return new


def _public_ip(s: str, only_public: bool) -> bool:
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False
    return ip.is_global or not only_public


@register
class PiiRedactor(Rule[PiiConfig]):
    name = "pii"
    config_cls = PiiConfig

    def __init__(self, cfg: PiiConfig):
        super().__init__(cfg)
        self.steps: list[tuple[str | None, _Replacer]] = []
        if cfg.emails:
            self.steps.append(("@", _Replacer("emails", _EMAIL, cfg.email_placeholders, self.stats)))
        if cfg.ips:
            only = cfg.only_public_ips
            self.steps.append((".", _Replacer("ips", _IPV4, cfg.ip_placeholders, self.stats,
                                              lambda s: _public_ip(s, only))))
        if cfg.phones:
            self.steps.append((None, _Replacer("phones", _PHONE, cfg.phone_placeholders, self.stats)))

    def check(self, doc: DocView) -> Drop | None:
        text = doc.text
        for needle, step in self.steps:
            if needle is None or needle in text:   # cheap pre-check before running the regex
                text = step(text)
        if text != doc.text:
            self.stats["docs_modified"] += 1
            doc.set_text(text)
        return None
