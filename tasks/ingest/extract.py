"""HTML bytes -> Unicode -> main text.

Decoding order (first that decodes cleanly wins):
  1. the charset of the HTTP ``Content-Type`` header,
  2. a ``<meta charset>`` / ``<meta http-equiv=Content-Type>`` declaration in the first 4 KB,
  3. statistical detection (resiliparse's ``detect_encoding``, uchardet-style),
  4. UTF-8 with replacement characters.
Declared names are mapped to their WHATWG (HTML5) superset as browsers do: ``gb2312`` -> ``gbk``
(GB2312 pages routinely contain GBK characters), ``iso-8859-1`` -> ``windows-1252``, etc. A declared
charset that fails a strict decode is ignored (servers lie), and detection decides.

Extractors (``IngestConfig.extractor``):

* ``resiliparse`` (default): ``extract_plain_text(main_content=True)`` on resiliparse's Lexbor DOM.
* ``trafilatura``: ``trafilatura.extract`` (readability-style scoring with many fallbacks).

Why resiliparse is the default (``python bench/ingest.py``, 86 HTML pages of the shared WARC files,
one process, 2-core machine shared with other jobs so absolute numbers are pessimistic):

* speed: resiliparse 216-308 pages/s/core vs trafilatura 6-14 pages/s/core over two runs, i.e.
  trafilatura is 22-37x slower; extraction is the dominant cost of ingest, so whole-file ingest runs
  at ~178 docs/s/core with resiliparse and ~22 with trafilatura (second, quieter run).
* quality, by eye (``bench/ingest.py --show N``): on article-like pages (creativecommons.org,
  semanticscholar.org, the Russian and Dutch company pages) both keep the same paragraphs;
  trafilatura drops a few more headings and menu lines, resiliparse keeps short headings. On a
  Japanese shop page (ClueWeb) trafilatura picked a sidebar ranking table as the "main content" while
  resiliparse kept the product description. Neither returned empty text on these pages (median
  output 1031 vs 1165 characters).
* resiliparse leaves borderline boilerplate to the filter stage (gopher/c4/fineweb line rules),
  which is where quality decisions belong in this pipeline.

Trafilatura stays selectable (``extractor: trafilatura``) for small corpora where a stricter main-text
choice matters more than throughput.
"""
from __future__ import annotations

import re
from typing import Callable

from refinery.tasks.extras import require

_META_RE = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]+)""", re.I)

EXTRACTORS = ("resiliparse", "trafilatura")


def _html5_name(name: str | None) -> str | None:
    """Map a declared charset to the codec name a browser would use; None if unknown."""
    if not name:
        return None
    import codecs

    from resiliparse.parse.encoding import map_encoding_to_html5

    name = name.strip().strip("\"'").lower()
    mapped = map_encoding_to_html5(name, fallback_utf8=False)
    if not mapped:
        mapped = name
    if mapped == "x-user-defined":
        return None
    try:
        return codecs.lookup(mapped).name
    except LookupError:
        return None


def meta_charset(data: bytes) -> str | None:
    m = _META_RE.search(data[:4096])
    return m.group(1).decode("ascii", "ignore") if m else None


def decode_html(data: bytes, http_charset: str | None = None) -> tuple[str, str, str]:
    """(text, codec, how) where ``how`` is ``http``, ``meta``, ``bom``, ``detected`` or ``fallback``."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", "replace"), "utf-8", "bom"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", "replace"), "utf-16", "bom"
    for how, declared in (("http", http_charset), ("meta", meta_charset(data))):
        codec = _html5_name(declared)
        if codec:
            try:
                return data.decode(codec), codec, how
            except (UnicodeDecodeError, LookupError):
                pass
    codec = detect_charset(data)
    if codec:
        try:
            return data.decode(codec), codec, "detected"
        except (UnicodeDecodeError, LookupError):
            pass
    return data.decode("utf-8", "replace"), "utf-8", "fallback"


def detect_charset(data: bytes) -> str | None:
    """The charset statistical detection finds for ``data`` (its first 64 KB), as a Python codec
    name (WHATWG superset), or None."""
    from resiliparse.parse.encoding import detect_encoding

    return _html5_name(detect_encoding(data[:65536]))


def decode_text(data: bytes, declared: str | None = "utf-8") -> str:
    codec = _html5_name(declared) or "utf-8"
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, LookupError):
        from resiliparse.parse.encoding import bytes_to_str, detect_encoding

        return bytes_to_str(data, detect_encoding(data[:65536]) or "utf-8")


def _resiliparse(html: str) -> str:
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, main_content=True, preserve_formatting=True, alt_texts=False,
                              list_bullets=True, links=False, form_fields=False, noscript=False)


def _trafilatura(html: str) -> str:
    trafilatura = require("trafilatura", "ingest.extractor=trafilatura")

    out = trafilatura.extract(html, include_comments=False, include_tables=True, favor_precision=False,
                              deduplicate=False, with_metadata=False, output_format="txt")
    return out or ""


def get_extractor(name: str) -> Callable[[str], str]:
    """A function ``html str -> main text`` for an extractor name in :data:`EXTRACTORS`."""
    if name == "resiliparse":
        return _resiliparse
    if name == "trafilatura":
        import logging

        require("trafilatura", "ingest.extractor=trafilatura")   # missing: fail before the first page

        logging.getLogger("trafilatura").setLevel(logging.ERROR)
        return _trafilatura
    raise ValueError(f"unknown extractor {name!r}; choose one of {EXTRACTORS}")


_WS_LINES = re.compile(r"[ \t\u00a0]+\n")
_MANY_NL = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Trim trailing blanks per line and runs of blank lines (extractor-independent tidy-up)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _WS_LINES.sub("\n", text)
    text = _MANY_NL.sub("\n\n", text)
    return text.strip()
