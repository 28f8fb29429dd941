"""Regression set: the real documents of ../shared/data/quality/, each rule alone, counts pinned.

The pinned drop counts equal datatrove 0.10.1's decisions on the same documents (bench/filters.py
measured 100% agreement for every rule), so a change here is a change of behaviour, not noise.
"""
from __future__ import annotations

import glob
import gzip
import json
from collections import Counter

import pytest

from refinery.tasks.filters import FilterChain, FilterConfig

EXPECTED = {
    "dclm-majority.jsonl": {
        "gopher_repetition": ({"dup_line_frac": 1, "top_2_gram": 1, "top_3_gram": 4, "top_4_gram": 6}, 0),
        "gopher_quality": ({"below_alpha_words_ratio": 114, "not_enough_stop_words": 1, "short_doc": 18,
                            "too_many_end_ellipsis": 2}, 0),
        "c4": ({"curly_bracket": 1, "too_few_sentences": 145}, 316),
        "c4_badwords": ({"badwords": 38}, 0),
        "fineweb": ({"char_dup_ratio": 23, "line_punct_ratio": 67, "short_line_ratio": 14}, 0),
        "pii": ({}, 38),
    },
    "c4-demo.jsonl": {
        "gopher_repetition": ({"duplicated_10_n_grams": 1, "duplicated_5_n_grams": 4, "duplicated_6_n_grams": 1,
                               "top_2_gram": 4, "top_3_gram": 2, "top_4_gram": 3}, 0),
        "gopher_quality": ({"below_alpha_words_ratio": 29, "short_doc": 28, "too_many_ellipsis": 1}, 0),
        "c4": ({"too_few_sentences": 45}, 0),
        "c4_badwords": ({}, 0),
        "fineweb": ({}, 0),
        "pii": ({}, 10),
    },
    "dolma": {
        "gopher_repetition": ({}, 0),
        "gopher_quality": ({"below_alpha_words_ratio": 8, "short_doc": 1, "too_many_end_ellipsis": 1}, 0),
        "c4": ({"too_few_sentences": 5}, 20),
        "c4_badwords": ({"badwords": 4}, 0),
        "fineweb": ({"line_punct_ratio": 2, "short_line_ratio": 1}, 0),
        "pii": ({}, 3),
    },
}
SIZES = {"dclm-majority.jsonl": 499, "c4-demo.jsonl": 300, "dolma": 30}


def _load(shared_data, name: str) -> list[str]:
    q = shared_data / "quality"
    if name != "dolma":
        with open(q / name) as f:
            return [json.loads(line)["text"] for line in f]
    texts = []
    for path in sorted(glob.glob(str(q / "dolma-tests" / "data" / "**" / "*.gz"), recursive=True)):
        if "/attributes/" in path or "/expected/" in path:
            continue
        with gzip.open(path, "rt") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quality_set_counts(shared_data, name):
    texts = _load(shared_data, name)
    assert len(texts) == SIZES[name]
    for rule, (drops, modified) in EXPECTED[name].items():
        chain = FilterChain(FilterConfig(rules=[rule]))
        got: Counter = Counter()
        changed = 0
        for t in texts:
            out, dropped = chain.apply(t)
            if dropped is None:
                changed += out != t
            else:
                got[dropped[1]] += 1
        assert dict(got) == drops, (name, rule)
        assert changed == modified, (name, rule)
        assert len(texts) - sum(got.values()) == SIZES[name] - sum(drops.values())


def test_default_chain_on_dclm_prefers_high_quality(shared_data):
    """The human labels of dclm-majority: the default chain keeps good pages more often than bad ones."""
    q = shared_data / "quality" / "dclm-majority.jsonl"
    rows = [json.loads(line) for line in open(q)]
    chain = FilterChain(FilterConfig())
    kept = Counter()
    for r in rows:
        _, dropped = chain.apply(r["text"])
        kept[r["label"]] += dropped is None
    n = Counter(r["label"] for r in rows)
    assert kept[1] / n[1] > kept[0] / n[0] + 0.1
