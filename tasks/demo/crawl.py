"""A small, deterministic demo crawl written as real WARC files.

``make_demo_crawl(out_dir, seed=0, n_pages=400, n_files=4)`` writes ``demo-00000.warc.gz`` ...
(WARC/1.1, one gzip member per record: a ``warcinfo`` record, then a ``request`` and a
``response`` record per page) and ``ground_truth.json`` beside them. Page text is real
English prose (standard-library docstrings, see :mod:`refinery.tasks.demo.prose`) wrapped in HTML
with menus, cookie banners, sidebars, comments and footers, so main-text extraction has work
to do. Planted for the curation stages to find, and listed in ``ground_truth.json``:

- exact duplicates (the same HTTP body at several URLs),
- near-duplicates (date and boilerplate changed, a few words changed, a sentence added),
- spam and low-quality pages (keyword lists, link farms, lorem ipsum, very short pages,
  repeated lines, gambling and adult spam),
- pages with personal data (emails, phone numbers, IP addresses),
- pages on a blocklistable domain,
- foreign-language pages (de, fr, es; zh served as gb2312, ru as windows-1251),
- HTTP errors and redirects, a ``robots.txt`` (text/plain),
- one corrupt record: the last response record of one file is a damaged gzip member (whole, but
  its data turns invalid halfway), so a reader gets every record before it and then a
  decompression error; the file itself ends where it should (a file cut short is a file error).

Output is byte-identical for the same (seed, n_pages, n_files) on one Python installation:
fixed dates, seeded record ids, gzip mtime 0, sorted iteration everywhere.
"""
from __future__ import annotations

import base64
import datetime as _dt
import functools
import gzip
import hashlib
import html
import ipaddress
import json
import os
import random
import re
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from refinery.tasks.demo import texts as T
from refinery.tasks.demo.prose import Passage, stdlib_prose

GENERATOR_VERSION = 2
BASE_DATE = _dt.datetime(2024, 5, 20, 6, 0, 0, tzinfo=_dt.timezone.utc)
MIN_PAGES = 30
FILE_PATTERN = "demo-{:05d}.warc.gz"
USER_AGENT = "RefineryDemoBot/1.0 (+https://refinery.invalid/bot)"


@dataclass
class Page:
    url: str
    body: bytes                       # HTTP payload
    kind: str                         # normal, duplicate, near_duplicate, spam, pii, foreign, ...
    status: int = 200
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)  # extra HTTP headers
    text: str = ""                    # the main text as planted (paragraphs joined by blank lines)
    title: str = ""
    info: dict = field(default_factory=dict)   # extra ground-truth details
    corrupt: bool = False
    heads: list = field(default_factory=list)  # subheading before each paragraph (or None)
    comments: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Planning

def _plan(n: int) -> dict[str, int]:
    """How many pages of each planted kind for ``n`` pages in total."""
    if n < MIN_PAGES:
        raise ValueError(f"n_pages must be at least {MIN_PAGES} (got {n})")
    k = n / 400
    plan = {
        "foreign_per_lang": 2 if n >= 150 else 1,
        "dup_copies": max(2, round(12 * k)),
        "near": max(3, round(12 * k)),
        "spam": max(7, round(21 * k)),
        "pii": max(2, round(8 * k)),
        "blocklisted": max(1, round(4 * k)),
        "http_error": max(2, round(3 * k)),
        "non_html": 1,
        "corrupt": 1,
    }
    planted = (5 * plan["foreign_per_lang"] + plan["dup_copies"] + plan["near"] + plan["spam"] + plan["pii"]
               + plan["blocklisted"] + plan["http_error"] + plan["non_html"] + plan["corrupt"])
    plan["normal"] = n - planted
    plan["dup_originals"] = (plan["dup_copies"] + 1) // 2
    if plan["normal"] < plan["dup_originals"] + plan["near"]:
        raise ValueError(f"n_pages={n} is too small for the planted pages")
    return plan


@functools.lru_cache(maxsize=1)
def corpus_articles() -> tuple[tuple[str, tuple[Passage, ...]], ...]:
    """The stdlib prose grouped into article-sized lists of paragraphs (about 100-320 words each).

    Consecutive short docstring paragraphs of one module are merged into paragraphs of at least
    40 words; a module's paragraphs are then cut into articles.
    """
    by_mod: dict[str, list[Passage]] = {}
    for p in stdlib_prose():
        by_mod.setdefault(p.module.split(".")[0], []).append(p)
    articles: list[tuple[str, tuple[Passage, ...]]] = []
    for mod in sorted(by_mod):
        paras: list[Passage] = []
        buf: list[Passage] = []
        for p in by_mod[mod]:
            buf.append(p)
            if sum(len(b.text.split()) for b in buf) >= 40:
                paras.append(Passage(buf[0].module, buf[0].obj, " ".join(b.text for b in buf)))
                buf = []
        if buf and paras and len(" ".join(b.text for b in buf).split()) < 40:
            last = paras[-1]
            paras[-1] = Passage(last.module, last.obj, last.text + " " + " ".join(b.text for b in buf))
        elif buf:
            paras.append(Passage(buf[0].module, buf[0].obj, " ".join(b.text for b in buf)))
        cur: list[Passage] = []
        words = 0
        for p in paras:
            cur.append(p)
            words += len(p.text.split())
            if words >= 120 and (words >= 200 or len(cur) >= 3):
                articles.append((mod, tuple(cur)))
                cur, words = [], 0
        if cur and words >= 80:
            articles.append((mod, tuple(cur)))
        elif cur and articles and articles[-1][0] == mod:
            articles[-1] = (mod, articles[-1][1] + tuple(cur))
    return tuple(articles)


def _articles(rng: random.Random, n_needed: int) -> list[tuple[str, list[Passage]]]:
    """``n_needed`` articles in a seeded order. When the corpus has fewer, the extra ones are remixed
    from paragraphs of three different articles (a remix shares under a third of its text with any
    one article, so it is not a near-duplicate of it)."""
    articles = [(m, list(ps)) for m, ps in corpus_articles()]
    rng.shuffle(articles)
    if len(articles) < n_needed:
        pool = [p for _, ps in articles for p in ps]
        extra_rng = random.Random(rng.random())
        while len(articles) < n_needed:
            picks = extra_rng.sample(pool, 3)
            articles.append((picks[0].module.split(".")[0], picks))
    return articles[:n_needed]


# --------------------------------------------------------------------------------------------
# HTML

_TITLES = ["Working with the {m} module", "A practical guide to {m}", "{m} in depth: {o}", "Notes on {m} and {o}",
           "Understanding {m}", "How {o} works in {m}", "The {m} module explained", "A closer look at {o}",
           "Everything about {o} in {m}"]


def _title_for(rng: random.Random, mod: str, paras: list[Passage], used: set[str]) -> str:
    """A title not used yet (templates in a seeded order, then numbered parts)."""
    objs = [p.obj.split(".")[-1] for p in paras if p.obj]
    obj = objs[0] if objs else mod
    templates = list(_TITLES)
    rng.shuffle(templates)
    for t in templates:
        title = t.format(m=mod, o=obj)
        if title not in used:
            return title
    k = 2
    while f"{title} (part {k})" in used:
        k += 1
    return f"{title} (part {k})"


def _fmt_date(d: _dt.date, lang: str = "en") -> str:
    if lang == "en":
        return d.strftime("%B ") + str(d.day) + d.strftime(", %Y")
    return d.isoformat()


def _li(items: list[str], prefix: str = "/") -> str:
    return "".join(f'<li><a href="{prefix}{_slug(x)}">{html.escape(x)}</a></li>' for x in items)


def _slug(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", s.lower()).strip("-")
    return s or "page"


def _render(layout: str, *, site: str, title: str, section: str, byline: str, body_html: str, lang: str = "en",
            charset: str = "utf-8", path: str = "/", nav: list[str] | None = None, footer: list[str] | None = None,
            cookie: str = "We use cookies to improve your experience. By continuing to browse this site you "
                          "agree to our use of cookies.",
            accept: str = "Accept all", related: str = "Related articles", related_items: Sequence[str] = (),
            rights: str = "All rights reserved.", comments: Sequence[str] = (), year: int = 2024) -> str:
    nav = nav or T.EN_NAV
    footer = footer or T.EN_FOOTER
    e = html.escape
    head = (f'<!DOCTYPE html>\n<html lang="{lang}">\n<head>\n<meta charset="{charset}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{e(title)} | {e(site)}</title>\n"
            f'<meta name="description" content="{e(title)}">\n'
            f'<link rel="stylesheet" href="/assets/main.css">\n'
            f'<script async src="/assets/analytics.js"></script>\n'
            f"<script>window.dataLayer = window.dataLayer || []; function track(){{dataLayer.push(arguments);}} "
            f"track('pageview', '{path}');</script>\n</head>\n")
    cookie_html = (f'<div id="cookie-notice" class="cookie-banner" role="dialog"><p>{e(cookie)}</p>'
                   f"<button>{e(accept)}</button> <button>Settings</button></div>\n")
    rel = "".join(f'<li><a href="/{section}/{_slug(x)}">{e(x)}</a></li>' for x in related_items)
    if layout == "semantic":
        return (head + '<body class="post">\n' + cookie_html +
                f'<header class="site-header">\n<a class="brand" href="/">{e(site)}</a>\n'
                f'<nav class="main-menu"><ul>{_li(nav)}</ul></nav>\n'
                f'<form class="search-form" action="/search" method="get"><input type="search" name="q" '
                f'placeholder="Search"><button>Search</button></form>\n</header>\n'
                f'<div class="breadcrumb"><a href="/">{e(nav[0])}</a> &rsaquo; '
                f'<a href="/{section}/">{e(section.title())}</a></div>\n'
                f'<main class="content">\n<article class="post">\n<h1>{e(title)}</h1>\n'
                f'<p class="meta">{e(byline)}</p>\n{body_html}\n'
                f'<div class="share">Share: <a href="#">Twitter</a> <a href="#">Facebook</a> '
                f'<a href="#">LinkedIn</a></div>\n</article>\n'
                f'<aside class="sidebar">\n<section class="widget"><h3>{e(related)}</h3><ul>{rel}</ul></section>\n'
                f'<section class="widget newsletter"><h3>Newsletter</h3><p>Get new articles in your inbox every '
                f'week.</p><form><input type="email" placeholder="Email address"><button>Subscribe</button>'
                f"</form></section>\n</aside>\n</main>\n"
                f'<footer class="site-footer">\n<p>&copy; {year} {e(site)}. {e(rights)}</p>\n'
                f'<ul class="footer-links">{_li(footer)}</ul>\n</footer>\n</body>\n</html>\n')
    comments_html = "".join(f'<div class="comment"><span class="author">reader{i + 1}</span> <p>{e(c)}</p></div>'
                            for i, c in enumerate(comments))
    return (head + "<body>\n"
            f'<div id="top-bar"><a href="/login">Log in</a> | <a href="/register">Register</a></div>\n'
            f'<div id="logo"><a href="/">{e(site)}</a></div>\n'
            f'<div id="menu">{" | ".join(f"<a href=/{_slug(x)}>{e(x)}</a>" for x in nav)}</div>\n'
            f'<div id="wrapper">\n<div id="content" class="entry">\n<h1 class="entry-title">{e(title)}</h1>\n'
            f'<div class="entry-meta">{e(byline)}</div>\n<div class="entry-content">\n{body_html}\n</div>\n'
            f'<div id="comments" class="comments"><h4>{len(comments)} comments</h4>{comments_html}</div>\n'
            f'</div>\n<div id="sidebar">\n<div class="widget"><h4>{e(related)}</h4><ul>{rel}</ul></div>\n'
            f'<div class="widget ad">Advertisement</div>\n</div>\n</div>\n'
            f'<div id="footer">Copyright &copy; {year} {e(site)}. {e(rights)} '
            f'{" | ".join(f"<a href=/{_slug(x)}>{e(x)}</a>" for x in footer)}</div>\n' + cookie_html +
            "</body>\n</html>\n")


def _body_html(paras: list[str], heads: list[str | None], layout: str) -> str:
    tag = "h2" if layout == "semantic" else "h3"
    out = []
    for para, head in zip(paras, heads):
        if head:
            out.append(f"<{tag}>{html.escape(head)}</{tag}>")
        out.append(f"<p>{html.escape(para)}</p>")
    return "\n".join(out)


def _headings(passages: list[Passage]) -> list[str | None]:
    heads: list[str | None] = []
    shown = 0
    prev = passages[0].obj if passages else ""
    for i, p in enumerate(passages):
        if i > 0 and p.obj and p.obj != prev and shown < 2:
            heads.append(f"About {p.obj.split('.')[-1]}")
            shown += 1
        else:
            heads.append(None)
        prev = p.obj
    return heads


# --------------------------------------------------------------------------------------------
# Page builders

class _Builder:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.urls: set[str] = set()
        self.titles: set[str] = set()

    def url(self, domain: str, path: str) -> str:
        base = f"https://{domain}{path}"
        url, i = base, 2
        while url in self.urls:
            url, i = f"{base}-{i}", i + 1
        self.urls.add(url)
        return url

    def date(self) -> _dt.date:
        return _dt.date(2023, 1, 1) + _dt.timedelta(days=self.rng.randrange(500))

    def article_page(self, mod: str, passages: list[Passage], kind: str, *, site: dict | None = None,
                     paras: list[str] | None = None, byline_date: _dt.date | None = None, title: str | None = None,
                     byline_word: str = "Published", domain: str | None = None, site_name: str | None = None,
                     path: str | None = None, heads: list[str | None] | None = None, author: str | None = None,
                     comments: list[str] | None = None) -> Page:
        rng = self.rng
        site = site or rng.choice(T.EN_SITES)
        layout = site["layout"]
        if title is None:
            title = _title_for(rng, mod, passages, self.titles)
            self.titles.add(title)
        paras = paras if paras is not None else [p.text for p in passages]
        section = rng.choice(site["sections"])
        domain = domain or site["domain"]
        if path is None:
            path = f"/{section}/{_slug(title)}"
        url = self.url(domain, path)
        bdate = byline_date or self.date()
        author = author or rng.choice(T.AUTHORS)
        byline = f"By {author} · {byline_word} {_fmt_date(bdate)} · {max(1, len(' '.join(paras).split()) // 200)} min read"
        related = rng.sample(["Getting started with Python", "Ten tips for cleaner code", "Testing made simple",
                              "Reading files the right way", "A tour of the standard library",
                              "Debugging like a pro", "Packaging your project"], 3)
        if comments is None:
            comments = rng.sample(T.COMMENTS, rng.randrange(0, 3)) if layout == "divs" else []
        if heads is None:
            heads = _headings(passages)
        heads = (heads + [None] * len(paras))[: len(paras)]
        doc = _render(layout, site=site_name or site["site"], title=title, section=section, byline=byline,
                      body_html=_body_html(paras, heads, layout),
                      path=path, related_items=related, comments=comments)
        page = Page(url=url, body=doc.encode("utf-8"), kind=kind, text="\n\n".join(paras), title=title, heads=heads,
                    headers=[("Last-Modified", _http_date(_dt.datetime.combine(bdate, _dt.time(9, 30),
                                                                                tzinfo=_dt.timezone.utc)))])
        page.info["byline_date"] = bdate.isoformat()
        page.info["layout"] = layout
        page.info["author"] = author
        page.comments = comments
        return page

    def foreign_page(self, lang: str, idx: int) -> Page:
        d = T.FOREIGN[lang]
        title, paras = d["articles"][idx % len(d["articles"])]
        bdate = self.date()
        path = f"/{_slug(d['nav'][2]) if lang not in ('zh', 'ru') else 'article'}/{idx + 1:04d}.html"
        url = self.url(d["domain"], path)
        doc = _render("semantic", site=d["site"], title=title, section="article", lang=lang, charset=d["charset"],
                      byline=f"{d['byline']} {_fmt_date(bdate, lang)}", body_html=_body_html(paras, [None] * len(paras),
                                                                                            "semantic"),
                      path=path, nav=d["nav"], footer=d["footer"], cookie=d["cookie"], accept=d["accept"],
                      related=d["related"], related_items=[a[0] for a in d["articles"] if a[0] != title],
                      rights=d["rights"])
        page = Page(url=url, body=doc.encode(d["charset"]), kind="foreign",
                    content_type=f"text/html; charset={d['charset']}", text="\n\n".join(paras), title=title)
        page.info.update(lang=lang, charset=d["charset"])
        return page

    def spam_page(self, kind: str, i: int) -> Page:
        rng = self.rng
        domain = T.SPAM_DOMAINS[i % len(T.SPAM_DOMAINS)]
        e = html.escape
        if kind == "keyword_list":
            words = [rng.choice(T.SPAM_KEYWORDS) for _ in range(120)]
            title = " ".join(rng.sample(T.SPAM_KEYWORDS, 4))
            body = "\n".join(f"<p>{e(', '.join(words[j:j + 12]))}</p>" for j in range(0, len(words), 12))
        elif kind == "link_farm":
            title = "Click here for the best offers"
            links = [f'<a href="https://{rng.choice(T.SPAM_DOMAINS)}/go?id={rng.randrange(10**6)}">'
                     f"{e(rng.choice(T.CLICK_HERE))}</a>" for _ in range(60)]
            body = "\n".join(f"<p>{' '.join(links[j:j + 3])}</p>" for j in range(0, len(links), 3))
        elif kind == "lorem_ipsum":
            title = "Lorem ipsum dolor sit amet"
            body = "\n".join(f"<p>{e(p)}</p>" for p in T.LOREM)
        elif kind == "short":
            title, text = T.SHORT_PAGES[i % len(T.SHORT_PAGES)]
            body = f"<p>{e(text)}</p>"
        elif kind == "repeated_lines":
            title = "Huge sale today only"
            body = "\n".join(f"<p>{e(T.REPEATED_LINE)}</p>" for _ in range(40))
        elif kind == "gambling":
            title = "Best online casino bonus and free spins"
            body = "\n".join(f"<p>{e(rng.choice(T.GAMBLING))}</p>" for _ in range(12))
        elif kind == "adult":
            title = "xxx free videos"
            body = "\n".join(f"<p>{e(rng.choice(T.ADULT))}</p>" for _ in range(10))
        else:  # pragma: no cover - programming error
            raise ValueError(kind)
        doc = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title>'
               f'<meta name="keywords" content="{e(", ".join(T.SPAM_KEYWORDS[:8]))}"></head>\n'
               f"<body>\n<h1>{e(title)}</h1>\n{body}\n</body></html>\n")
        page = Page(url=self.url(domain, f"/{_slug(title)}-{rng.randrange(1000, 9999)}.html"), body=doc.encode(),
                    kind="spam", title=title)
        page.info["spam"] = kind
        return page


def _http_date(d: _dt.datetime) -> str:
    return d.strftime("%a, %d %b %Y %H:%M:%S GMT")


def _edit_words(rng: random.Random, text: str, n: int = 4) -> tuple[str, list[tuple[str, str]]]:
    """Replace ``n`` words by synonyms (or, lacking candidates, delete long words); returns the edits."""
    tokens = text.split(" ")
    core = [t.strip(".,;:!?()'\"") for t in tokens]
    syn = [i for i, c in enumerate(core) if c.lower() in T.SYNONYMS]
    picks = rng.sample(syn, min(n, len(syn)))
    if len(picks) < n:
        rest = [i for i, c in enumerate(core) if c.isalpha() and len(c) > 6 and i not in syn]
        picks += rng.sample(rest, min(n - len(picks), len(rest)))
    changes = []
    for i in sorted(picks, reverse=True):
        old = core[i]
        new = T.SYNONYMS.get(old.lower(), "")
        if new and old[0].isupper():
            new = new[0].upper() + new[1:]
        changes.append((old, new))
        if new:
            tokens[i] = tokens[i].replace(old, new, 1)
        elif tokens[i] == old:
            tokens[i] = ""
        else:
            tokens[i] = tokens[i].replace(old, "", 1)   # keep the punctuation
    text = re.sub(r" +", " ", " ".join(tokens)).replace(" .", ".").replace(" ,", ",").strip()
    return text, changes[::-1]


# --------------------------------------------------------------------------------------------
# WARC records

def _digest(data: bytes) -> str:
    return "sha1:" + base64.b32encode(hashlib.sha1(data).digest()).decode()


def _record(headers: list[tuple[str, str]], block: bytes) -> bytes:
    lines = ["WARC/1.1"] + [f"{k}: {v}" for k, v in headers] + [f"Content-Length: {len(block)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + block + b"\r\n\r\n"


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def _damaged_gz(data: bytes) -> tuple[bytes, bytes]:
    """A whole gzip member of ``data`` (header, deflate data, CRC and size trailer) whose deflate
    data turns invalid after the first half (a block of the reserved type 3), and that half: what
    a reader inflates before the error."""
    half = data[: len(data) // 2]
    c = zlib.compressobj(6, zlib.DEFLATED, 31)   # gzip wrapper, mtime 0
    body = c.compress(half) + c.flush(zlib.Z_FULL_FLUSH)
    return body + b"\x07" + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF), half


def _reason(status: int) -> str:
    return {200: "OK", 301: "Moved Permanently", 404: "Not Found", 410: "Gone"}[status]


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write; an existing identical file is left alone (its mtime too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    # a unique name in the same folder (open "x" respects the umask, unlike mkstemp's 0600)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Main entry point: plan, plant each kind of page, shuffle into files, write WARC records, then
# the ground truth. Every phase draws from the one seeded ``rng`` in a fixed order, so the phase
# order below is part of the output: reordering phases changes the bytes.

@dataclass
class _Crawl:
    """The pages planted so far and what ``ground_truth.json`` lists about them."""
    pages: list[Page] = field(default_factory=list)
    dup_groups: list[list[str]] = field(default_factory=list)   # [original url, copy urls...]
    near: list[dict] = field(default_factory=list)
    pii: dict[str, dict] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)
    foreign: dict[str, dict] = field(default_factory=dict)
    spam: dict[str, str] = field(default_factory=dict)
    non_200: dict[str, int] = field(default_factory=dict)
    non_html: dict[str, str] = field(default_factory=dict)
    corrupt_page: Page | None = None


def _pick_originals(rng: random.Random, normal: list[Page], plan: dict) -> tuple[list[Page], list[Page]]:
    """(near-duplicate originals, exact-duplicate originals), disjoint. Near-duplicates are made
    from long articles, so that a small edit keeps them near (Jaccard > 0.8)."""
    long_pages = [p for p in normal if len(p.text.split()) >= 180]
    if len(long_pages) < plan["near"]:
        long_pages = sorted(normal, key=lambda p: -len(p.text.split()))[: plan["near"]]
    near_origs = rng.sample(long_pages, plan["near"])
    taken = {p.url for p in near_origs}
    dup_origs = rng.sample([p for p in normal if p.url not in taken], plan["dup_originals"])
    return near_origs, dup_origs


def _plant_exact_duplicates(b: _Builder, crawl: _Crawl, dup_origs: list[Page], n_copies: int) -> None:
    """The same HTTP body at other URLs: a mirror site, or tracking/referral parameters."""
    for j in range(n_copies):
        orig = dup_origs[j % len(dup_origs)]
        dom = orig.url.split("/")[2]
        path = "/" + orig.url.split("/", 3)[3]
        variant = j // len(dup_origs)
        if variant == 0 and j % 3 == 2:
            url = b.url("mirror." + dom, path)
        else:
            url = b.url(dom, path + ("?utm_source=newsletter&utm_medium=email" if variant == 0 else "?ref=sidebar"))
        crawl.pages.append(Page(url=url, body=orig.body, kind="duplicate", headers=list(orig.headers), text=orig.text,
                                title=orig.title, info={"of": orig.url}))
        for g in crawl.dup_groups:
            if g[0] == orig.url:
                g.append(url)
                break
        else:
            crawl.dup_groups.append([orig.url, url])


def _plant_near_duplicates(b: _Builder, crawl: _Crawl, near_origs: list[Page]) -> None:
    """The same article on another site of the same layout, re-dated, with one small edit in
    turn: only the date, two words changed, or a sentence added."""
    rng = b.rng
    edits = ["date_changed", "words_changed", "sentence_added"]
    for j, orig in enumerate(near_origs):
        edit = edits[j % 3]
        paras = orig.text.split("\n\n")
        detail: dict = {}
        if edit == "words_changed":
            k = rng.randrange(len(paras))
            paras[k], changes = _edit_words(rng, paras[k], n=2)
            detail["changes"] = changes
        elif edit == "sentence_added":
            k = len(paras) - 1
            sentence = rng.choice(T.ADDED_SENTENCES)
            paras[k] = paras[k] + " " + sentence
            detail["sentence"] = sentence
        other_sites = [s for s in T.EN_SITES if s["domain"] != orig.url.split("/")[2]
                       and s["layout"] == orig.info["layout"]]
        site = rng.choice(other_sites)
        new_date = _dt.date.fromisoformat(orig.info["byline_date"]) + _dt.timedelta(days=rng.randrange(30, 300))
        page = b.article_page("", [], "near_duplicate", site=site, paras=paras, title=orig.title,
                              byline_date=new_date, byline_word="Updated", heads=orig.heads,
                              author=orig.info["author"], comments=orig.comments)
        page.info.update({"of": orig.url, "edit": edit, **detail})
        crawl.pages.append(page)
        crawl.near.append({"url": page.url, "of": orig.url, "edit": edit, **detail})


def _plant_pii(b: _Builder, crawl: _Crawl, articles, n: int, seed: int) -> None:
    """Articles with one sentence of personal data (email, phone, public IP) in the middle."""
    rng = b.rng
    for j in range(n):
        m, ps = next(articles)
        first, last = T.PII_PEOPLE[(j + seed) % len(T.PII_PEOPLE)]
        email = f"{first.lower()}.{last.lower()}@{T.PII_MAIL_DOMAINS[j % len(T.PII_MAIL_DOMAINS)]}"
        phone = ["+1 (415) 555-01{:02d}", "(212) 555-01{:02d}", "+44 20 7946 0{:03d}"][j % 3].format(rng.randrange(100))
        ip = _public_ip(rng)
        sentence = T.PII_TEMPLATES[j % len(T.PII_TEMPLATES)].format(email=email, phone=phone, ip=ip,
                                                                    name=f"{first} {last}")
        paras = [p.text for p in ps]
        paras.insert(len(paras) // 2 + 1, sentence)
        page = b.article_page(m, ps, "pii", paras=paras)
        crawl.pii[page.url] = {"emails": [email], "phones": [phone], "ips": [ip]}
        page.info.update(crawl.pii[page.url])
        crawl.pages.append(page)


def _plant_blocklisted(b: _Builder, crawl: _Crawl, articles, n: int) -> None:
    """Ordinary-looking articles on the one blocklistable domain."""
    for j in range(n):
        m, ps = next(articles)
        page = b.article_page(m, ps, "blocklisted", domain=T.BLOCKLIST_DOMAIN, site_name="Royal Casino Bets Blog",
                              path=f"/blog/{j + 1:03d}-{_slug(m)}")
        crawl.pages.append(page)
        crawl.blocked.append(page.url)


def _plant_foreign(b: _Builder, crawl: _Crawl, per_lang: int) -> None:
    for lang in sorted(T.FOREIGN):
        for j in range(per_lang):
            page = b.foreign_page(lang, j)
            crawl.pages.append(page)
            crawl.foreign[page.url] = {"lang": lang, "charset": page.info["charset"]}


def _plant_spam(b: _Builder, crawl: _Crawl, n: int) -> None:
    kinds = ["keyword_list", "link_farm", "lorem_ipsum", "short", "repeated_lines", "gambling", "adult"]
    for j in range(n):
        page = b.spam_page(kinds[j % len(kinds)], j // len(kinds))
        crawl.pages.append(page)
        crawl.spam[page.url] = page.info["spam"]


def _plant_http_errors(b: _Builder, crawl: _Crawl, n: int) -> None:
    """404 pages and 301 redirects, alternating."""
    for j in range(n):
        site = T.EN_SITES[j % len(T.EN_SITES)]
        if j % 2 == 0:
            url = b.url(site["domain"], f"/old/page-{j + 1}.html")
            body = (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1>"
                    b"<p>The requested URL was not found on this server.</p></body></html>\n")
            page = Page(url=url, body=body, kind="http_error", status=404, title="404 Not Found")
        else:
            url = b.url(site["domain"], f"/{j + 1}")
            target = f"https://{site['domain']}/{site['sections'][0]}/"
            body = (f'<html><head><title>301 Moved Permanently</title></head><body><h1>Moved Permanently</h1>'
                    f'<p>The document has moved <a href="{target}">here</a>.</p></body></html>\n').encode()
            page = Page(url=url, body=body, kind="redirect", status=301, headers=[("Location", target)],
                        title="301 Moved Permanently")
        crawl.pages.append(page)
        crawl.non_200[url] = page.status


def _plant_non_html(b: _Builder, crawl: _Crawl, n: int) -> None:
    """``robots.txt`` files (text/plain)."""
    for j in range(n):
        site = T.EN_SITES[j % len(T.EN_SITES)]
        page = Page(url=b.url(site["domain"], "/robots.txt"), body=b"User-agent: *\nDisallow: /admin/\n"
                    b"Disallow: /search\n\nSitemap: https://" + site["domain"].encode() + b"/sitemap.xml\n",
                    kind="non_html", content_type="text/plain; charset=utf-8")
        crawl.pages.append(page)
        crawl.non_html[page.url] = page.content_type


def _plant_pages(rng: random.Random, plan: dict, seed: int) -> _Crawl:
    """Every planted page, in the order the rng is drawn from (see the note above)."""
    b = _Builder(rng)
    crawl = _Crawl()
    n_articles = plan["normal"] + plan["pii"] + plan["blocklisted"] + plan["corrupt"]
    articles = iter(_articles(rng, n_articles))
    normal = [b.article_page(m, ps, "normal") for m, ps in (next(articles) for _ in range(plan["normal"]))]
    crawl.pages += normal
    near_origs, dup_origs = _pick_originals(rng, normal, plan)
    _plant_exact_duplicates(b, crawl, dup_origs, plan["dup_copies"])
    _plant_near_duplicates(b, crawl, near_origs)
    _plant_pii(b, crawl, articles, plan["pii"], seed)
    _plant_blocklisted(b, crawl, articles, plan["blocklisted"])
    _plant_foreign(b, crawl, plan["foreign_per_lang"])
    _plant_spam(b, crawl, plan["spam"])
    _plant_http_errors(b, crawl, plan["http_error"])
    _plant_non_html(b, crawl, plan["non_html"])
    # the corrupt record: normal content, written as a damaged gzip member (see _WarcWriter)
    m, ps = next(articles)
    crawl.corrupt_page = b.article_page(m, ps, "corrupt")
    crawl.corrupt_page.corrupt = True
    return crawl


def _distribute(rng: random.Random, crawl: _Crawl, n_files: int) -> list[list[Page]]:
    """Shuffled pages round-robin over the files; the corrupt record goes last into the last file
    (a reader gets every record before it)."""
    pages = list(crawl.pages)
    rng.shuffle(pages)
    per_file = [pages[i::n_files] for i in range(n_files)]
    assert crawl.corrupt_page is not None, "_plant_pages plants the corrupt page"
    per_file[-1].append(crawl.corrupt_page)
    return per_file


@dataclass
class _WarcWriter:
    """Writes WARC files: seeded record ids and a clock that advances 7 s per page, across files."""
    out: Path
    seed: int
    ids: random.Random
    t: int = 0
    files: list[Path] = field(default_factory=list)
    records: dict[str, dict[str, int]] = field(default_factory=dict)   # file -> record counts
    gt_pages: dict[str, dict] = field(default_factory=dict)            # url -> ground truth
    corrupt_info: list[dict] = field(default_factory=list)

    def new_id(self) -> str:
        return f"<urn:uuid:{uuid.UUID(int=self.ids.getrandbits(128), version=4)}>"

    def write_file(self, fi: int, pages: list[Page]) -> None:
        name = FILE_PATTERN.format(fi)
        info_id = self.new_id()
        chunks = [self._warcinfo(name, info_id)]
        counts = {"warcinfo": 1, "request": 0, "response": 0}
        for page in pages:
            self.t += 7
            chunks += self._page_records(name, info_id, page)
            counts["request"] += 1
            counts["response"] += 1
        path = self.out / name
        _write_if_changed(path, b"".join(chunks))
        self.files.append(path)
        self.records[name] = counts

    def _warcinfo(self, name: str, info_id: str) -> bytes:
        block = (f"software: refinery-demo/{GENERATOR_VERSION}\r\nformat: WARC File Format 1.1\r\n"
                 f"conformsTo: https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/\r\n"
                 f"isPartOf: refinery-demo-seed{self.seed}\r\nhostname: demo-crawler\r\n"
                 f"description: Synthetic demo crawl with planted duplicates, spam, personal data and "
                 f"foreign pages (see ground_truth.json)\r\nrobots: classic\r\n"
                 f"http-header-user-agent: {USER_AGENT}\r\n").encode()
        date = BASE_DATE + _dt.timedelta(seconds=self.t)
        return _gz(_record([("WARC-Type", "warcinfo"), ("WARC-Date", _warc_date(date)), ("WARC-Filename", name),
                            ("WARC-Record-ID", info_id), ("Content-Type", "application/warc-fields")], block))

    def _page_records(self, name: str, info_id: str, page: Page) -> list[bytes]:
        """The request and response records of one page (gzip members)."""
        date = BASE_DATE + _dt.timedelta(seconds=self.t)
        host = page.url.split("/")[2]
        ip = _ip_for(host)
        path = "/" + page.url.split("/", 3)[3] if page.url.count("/") >= 3 else "/"
        req_block = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
                     f"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
                     f"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
                     ).encode()
        resp_head = [f"HTTP/1.1 {page.status} {_reason(page.status)}", f"Date: {_http_date(date)}",
                     "Server: nginx/1.24.0", f"Content-Type: {page.content_type}",
                     f"Content-Length: {len(page.body)}"]
        resp_head += [f"{k}: {v}" for k, v in page.headers]
        resp_head += ["Cache-Control: max-age=600", "Connection: close"]
        resp_block = ("\r\n".join(resp_head) + "\r\n\r\n").encode("ascii") + page.body
        req_id, resp_id = self.new_id(), self.new_id()
        request = _gz(_record([
            ("WARC-Type", "request"), ("WARC-Date", _warc_date(date)), ("WARC-Record-ID", req_id),
            ("WARC-Warcinfo-ID", info_id), ("WARC-Target-URI", page.url), ("WARC-IP-Address", ip),
            ("WARC-Concurrent-To", resp_id), ("WARC-Block-Digest", _digest(req_block)),
            ("Content-Type", "application/http; msgtype=request")], req_block))
        mime = page.content_type.split(";")[0]
        raw = _record([
            ("WARC-Type", "response"), ("WARC-Date", _warc_date(date)), ("WARC-Record-ID", resp_id),
            ("WARC-Warcinfo-ID", info_id), ("WARC-Target-URI", page.url), ("WARC-IP-Address", ip),
            ("WARC-Block-Digest", _digest(resp_block)), ("WARC-Payload-Digest", _digest(page.body)),
            ("WARC-Identified-Payload-Type", mime),
            ("Content-Type", "application/http; msgtype=response")], resp_block)
        response = _gz(raw)
        if page.corrupt:
            # bit rot in storage: the gzip member is whole but its data turns invalid halfway, so
            # the record's block comes up short (a damaged record, not a file cut short)
            response, partial = _damaged_gz(raw)
            self.corrupt_info.append({
                "file": name, "url": page.url, "record_id": resp_id, "kind": "damaged_gzip_member",
                "position": "last record of the file", "content_length": len(resp_block),
                "block_bytes_present": len(partial) - (raw.index(b"\r\n\r\n") + 4),
                "detect": "invalid deflate data; block shorter than its Content-Length; WARC-Payload-Digest mismatch"})
        self.gt_pages[page.url] = {"kind": page.kind, "file": name, "status": page.status,
                                   "content_type": page.content_type, "record_id": resp_id,
                                   "date": _warc_date(date), "title": page.title, **page.info}
        return [request, response]


def _remove_stale(out: Path, files: list[Path]) -> None:
    """Files of an earlier generation with more files would be picked up by a glob."""
    keep = {p.name for p in files}
    for stale in sorted(out.glob("demo-[0-9][0-9][0-9][0-9][0-9].warc.gz")):
        if stale.name not in keep:
            stale.unlink()


def _ground_truth(crawl: _Crawl, w: _WarcWriter, *, seed: int, n_pages: int, n_files: int) -> dict:
    records, gt_pages = w.records, w.gt_pages
    n_resp = sum(c["response"] for c in records.values())
    return {
        "generator": "refinery.tasks.demo.crawl", "version": GENERATOR_VERSION, "seed": seed, "n_pages": n_pages,
        "n_files": n_files, "files": [p.name for p in w.files], "records": records,
        "totals": {"warcinfo": len(w.files), "request": sum(c["request"] for c in records.values()),
                   "response": n_resp, "complete_responses": n_resp - len(w.corrupt_info),
                   "html_200": sum(1 for v in gt_pages.values() if v["status"] == 200
                                   and v["content_type"].startswith("text/html") and v["kind"] != "corrupt")},
        "kinds": _count(v["kind"] for v in gt_pages.values()),
        "exact_duplicates": crawl.dup_groups,
        "near_duplicates": crawl.near,
        "spam": dict(sorted(crawl.spam.items())),
        "pii": dict(sorted(crawl.pii.items())),
        "foreign": dict(sorted(crawl.foreign.items())),
        "blocklist_domains": [T.BLOCKLIST_DOMAIN],
        "blocklisted": sorted(crawl.blocked),
        "non_200": dict(sorted(crawl.non_200.items())),
        "non_html": dict(sorted(crawl.non_html.items())),
        "corrupt": w.corrupt_info,
        "pages": dict(sorted(gt_pages.items())),
    }


def make_demo_crawl(out_dir: str | Path, *, seed: int = 0, n_pages: int = 400, n_files: int = 4) -> list[Path]:
    """Write a deterministic demo crawl of ``n_pages`` pages into ``n_files`` WARC files.

    Returns the sorted list of ``*.warc.gz`` paths; ``ground_truth.json`` is written beside them.
    """
    if n_files < 1:
        raise ValueError("n_files must be at least 1")
    plan = _plan(n_pages)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"refinery-demo-crawl/{seed}")
    crawl = _plant_pages(rng, plan, seed)
    writer = _WarcWriter(out, seed, ids=random.Random(f"refinery-demo-ids/{seed}"))
    for fi, pages in enumerate(_distribute(rng, crawl, n_files)):
        writer.write_file(fi, pages)
    _remove_stale(out, writer.files)
    truth = _ground_truth(crawl, writer, seed=seed, n_pages=n_pages, n_files=n_files)
    _write_if_changed(out / "ground_truth.json",
                      (json.dumps(truth, indent=1, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))
    return writer.files


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def _warc_date(d: _dt.datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%M:%SZ")


def _public_ip(rng: random.Random) -> str:
    """A globally routable IPv4 address (so that PII redaction limited to public addresses sees it)."""
    while True:
        ip = ipaddress.IPv4Address(rng.getrandbits(32))
        if ip.is_global and not ip.is_multicast and 11 <= int(str(ip).split(".")[0]) <= 223:
            return str(ip)


def _ip_for(host: str) -> str:
    h = hashlib.sha1(host.encode()).digest()
    net = ["192.0.2", "198.51.100", "203.0.113"][h[0] % 3]
    return f"{net}.{1 + h[1] % 254}"


def load_ground_truth(out_dir: str | Path) -> dict:
    """The ``ground_truth.json`` written by :func:`make_demo_crawl` into ``out_dir``."""
    return json.loads((Path(out_dir) / "ground_truth.json").read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    """``python -m refinery.tasks.demo.crawl OUT_DIR [--seed N] [--pages N] [--files N]``: write a demo crawl."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pages", type=int, default=400)
    ap.add_argument("--files", type=int, default=4)
    args = ap.parse_args(argv)
    files = make_demo_crawl(args.out_dir, seed=args.seed, n_pages=args.pages, n_files=args.files)
    truth = load_ground_truth(args.out_dir)
    for f in files:
        print(f"{f}  {f.stat().st_size:,} bytes  {truth['records'][f.name]}")
    print(json.dumps({"totals": truth["totals"], "kinds": truth["kinds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
