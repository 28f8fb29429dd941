"""Fixtures for the fine-tuning tests: small instruction files (synthetic and from ../shared/data)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from refinery_testlib import shared_file

ALPACA_EN = "sft/alpaca_en_demo.json"
ALPACA_ZH = "sft/alpaca_zh_demo.json"
GLAIVE = "sft/glaive_toolcall_en_demo.json"
SELF_INSTRUCT = "sft/self-instruct-seed-tasks.jsonl"

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light", "music", "north",
         "paper", "smile"]


def synthetic_records(n: int = 24) -> list[dict]:
    """Learnable Alpaca records: repeat / reverse a few words (no shared data needed)."""
    recs = []
    for i in range(n):
        a, b, c = WORDS[i % 12], WORDS[(i * 5 + 1) % 12], WORDS[(i * 7 + 3) % 12]
        if i % 2:
            recs.append({"instruction": "Repeat the words.", "input": f"{a} {b} {c}", "output": f"{a} {b} {c}"})
        else:
            recs.append({"instruction": "Reverse the words.", "input": f"{a} {b} {c}", "output": f"{c} {b} {a}"})
    return recs


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("sft") / "words.json"
    p.write_text(json.dumps(synthetic_records(24), indent=1))
    return p


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def alpaca_en(shared_data) -> Path:
    return shared_file(shared_data, ALPACA_EN)


@pytest.fixture(scope="session")
def alpaca_zh(shared_data) -> Path:
    return shared_file(shared_data, ALPACA_ZH)


@pytest.fixture(scope="session")
def glaive(shared_data) -> Path:
    return shared_file(shared_data, GLAIVE)


@pytest.fixture(scope="session")
def self_instruct(shared_data) -> Path:
    return shared_file(shared_data, SELF_INSTRUCT)
