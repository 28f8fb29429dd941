"""Word segmentation for languages written without spaces (Chinese, Japanese).

FineWeb-2 / datatrove split Chinese with jieba and Japanese with a MeCab-family analyser before counting
words and n-grams; we do the same with maintained packages, imported on first use only:

* ``jieba`` (Han script): ``rjieba`` (the jieba-rs binding: jieba's dictionary and HMM, in Rust), else the
  original ``jieba`` package if that is what is installed.
* ``mecab`` (Japanese): ``fugashi`` with the ``unidic-lite`` dictionary (UniDic, as FineWeb-2's Japanese
  tokenizer uses).

Whitespace is never a token. A missing package is a clear error naming what to install, never a silent
fall back to whitespace splitting (which would make every Chinese page a handful of 500-character
"words").
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

from refinery.tasks.extras import MissingExtra, require


class SegmenterUnavailable(RuntimeError):
    pass


@lru_cache(maxsize=None)
def _jieba() -> Callable[[str], list[str]]:
    try:
        return require("rjieba", "Chinese word segmentation").cut
    except MissingExtra as missing:
        try:
            import jieba
        except ImportError:
            raise SegmenterUnavailable(f"{missing} (or install jieba)") from missing
    jieba.setLogLevel(60)
    return lambda text: list(jieba.cut(text))


@lru_cache(maxsize=None)
def _mecab() -> Callable[[str], list[str]]:
    try:
        fugashi = require("fugashi", "Japanese word segmentation")
        require("unidic_lite", "Japanese word segmentation")
        tagger = fugashi.Tagger()   # finds the unidic-lite dictionary
    except MissingExtra as e:
        raise SegmenterUnavailable(str(e)) from e
    except RuntimeError as e:   # fugashi found no dictionary
        raise SegmenterUnavailable(f"Japanese word segmentation: {e}; pip install 'refinery[ja]'") from e

    def cut(text: str) -> list[str]:
        # MeCab works line by line; feeding lines keeps its lattice small on long pages
        out: list[str] = []
        for line in text.split("\n"):
            if line.strip():
                out.extend(w.surface for w in tagger(line))
        return out
    return cut


SEGMENTERS: dict[str, Callable[[], Callable[[str], list[str]]]] = {"jieba": _jieba, "mecab": _mecab}


def segmenter(name: str) -> Callable[[str], list[str]]:
    if name not in SEGMENTERS:
        raise ValueError(f"unknown word segmenter {name!r}; known: {sorted(SEGMENTERS)}")
    return SEGMENTERS[name]()


def segment(text: str, name: str) -> list[str]:
    """Words of ``text`` by segmenter ``name`` ('jieba' or 'mecab'), whitespace dropped."""
    return [t for t in (s.strip() for s in segmenter(name)(text)) if t]


__all__ = ["segment", "segmenter", "SegmenterUnavailable", "SEGMENTERS"]
