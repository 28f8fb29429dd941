"""Instruction (Alpaca) and preference (HH-RLHF) data built from curated demo documents."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from refinery.tasks.demo.instructions import (
    INSTRUCTIONS, REJECTION_KINDS, TASKS, instruction_examples, keywords, make_instructions, make_preferences,
    preference_pairs, split_sentences,
)


def test_alpaca_file_is_valid_and_grounded(curated_docs, demo_crawl, tmp_path):
    path = make_instructions(curated_docs, tmp_path / "sft.json", seed=0, n=120)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, list) and len(data) == 120
    for rec in data:
        assert set(rec) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in rec.values()) and rec["output"].strip() and rec["instruction"]
    examples = instruction_examples(curated_docs, seed=0, n=120)
    assert [{k: e[k] for k in ("instruction", "input", "output")} for e in examples] == data
    by_task = Counter(e["task"] for e in examples)
    assert set(by_task) == set(TASKS) and max(by_task.values()) - min(by_task.values()) <= 1
    flat_docs = [" ".join(d["text"].split()) for d in curated_docs]
    truth = demo_crawl[1]["pages"]
    titled = {truth[d["url"]]["title"]: flat for d, flat in zip(curated_docs, flat_docs)}

    def source(passage: str) -> str:
        """A document all sentences of ``passage`` come from."""
        docs = [f for f in flat_docs if all(s in f for s in split_sentences(passage))]
        assert docs, passage
        return docs[0]

    for e in examples:
        assert e["instruction"] == INSTRUCTIONS[e["task"]]
        if e["task"] == "summarize":
            assert e["output"] == split_sentences(e["input"])[0] and len(split_sentences(e["input"])) >= 3
            source(e["input"])
        elif e["task"] == "continue":
            doc = source(e["input"] + " " + e["output"])
            last = split_sentences(e["input"])[-1]
            after = doc[doc.index(last) + len(last):]
            assert after.startswith(" " + e["output"]) or len(after[:after.index(e["output"])].split()) <= 4
        elif e["task"] == "title":
            assert titled.get(e["output"]) == source(e["input"])          # the title of that very document
        elif e["task"] == "keywords":
            kws = e["output"].split(", ")
            assert len(kws) == 5 and all(k in e["input"].lower() for k in kws)
            source(e["input"])
        elif e["task"] == "topic":
            assert e["output"].startswith("The text discusses ")
            source(e["input"])
        elif e["task"] == "write":
            assert e["input"] in titled and e["output"] in titled[e["input"]]


def test_instructions_deterministic_and_order_independent(curated_docs, tmp_path):
    a = make_instructions(curated_docs, tmp_path / "a.json", seed=0, n=80).read_bytes()
    shuffled = list(curated_docs)
    random.Random(7).shuffle(shuffled)
    b = make_instructions(shuffled + shuffled[:5], tmp_path / "b.json", seed=0, n=80).read_bytes()  # + duplicates
    assert a == b
    c = make_instructions(curated_docs, tmp_path / "c.json", seed=1, n=80).read_bytes()
    assert c != a
    small = json.loads(make_instructions(curated_docs[:3], tmp_path / "d.json", n=1000).read_text())
    assert 0 < len(small) <= 3 * len(TASKS)                       # n is an upper bound


def test_preferences_are_valid_hh_pairs(curated_docs, tmp_path):
    path = make_preferences(curated_docs, tmp_path / "prefs.jsonl", seed=0, n=100)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 100
    pairs = preference_pairs(curated_docs, seed=0, n=100)
    kinds = Counter(p["rejection"] for p in pairs)
    assert set(kinds) == set(REJECTION_KINDS) and min(kinds.values()) >= 15, kinds
    for line, p in zip(lines, pairs):
        rec = json.loads(line)
        assert set(rec) == {"chosen", "rejected"} and rec == {"chosen": p["chosen"], "rejected": p["rejected"]}
        for side in ("chosen", "rejected"):
            assert rec[side].startswith("\n\nHuman: ") and rec[side].count("\n\nAssistant: ") == 1
            assert rec[side].count("\n\nHuman: ") == 1
        prompt_c, good = rec["chosen"].split("\n\nAssistant: ")
        prompt_r, bad = rec["rejected"].split("\n\nAssistant: ")
        assert prompt_c == prompt_r and good.strip() and bad.strip() and good != bad
        kind = p["rejection"]
        if kind == "truncated":
            assert good.startswith(bad) and len(bad) < len(good)
        elif kind == "repetitive":
            head = bad.split()[0]
            assert bad.split().count(head) >= 3
        elif kind == "unrelated":
            assert bad not in prompt_c


def test_preferences_deterministic_and_seeded(curated_docs, tmp_path):
    a = make_preferences(curated_docs, tmp_path / "a.jsonl", seed=0, n=60).read_bytes()
    b = make_preferences(list(reversed(curated_docs)), tmp_path / "b.jsonl", seed=0, n=60).read_bytes()
    c = make_preferences(curated_docs, tmp_path / "c.jsonl", seed=2, n=60).read_bytes()
    assert a == b and a != c


def test_no_usable_documents(tmp_path):
    junk = [{"text": "too short", "url": "u"}, {"text": None, "url": "v"},
            {"text": "menu item\n" * 40, "url": "w"}]
    with pytest.raises(ValueError, match="no instruction examples"):
        make_instructions(junk, tmp_path / "x.json")
    with pytest.raises(ValueError, match="no preference pairs"):
        make_preferences([], tmp_path / "x.jsonl")
    assert not (tmp_path / "x.json").exists()


def test_helpers():
    assert split_sentences("First one. Second one! Third? yes. Fourth.") == ["First one.", "Second one!",
                                                                            "Third? yes.", "Fourth."]
    assert split_sentences("春节是节日。人们回家。") == ["春节是节日。", "人们回家。"]
    assert keywords("The parser parses files. Files are parsed by the parser, which parses them.", 3) == [
        "parser", "parses", "files"]
