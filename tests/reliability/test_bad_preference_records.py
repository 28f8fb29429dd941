"""Preference, prompt and labelled data: an empty prompt or reply is a bad record, and a file
that is mostly bad records fails with the counts instead of training on the few left."""
from __future__ import annotations

import json

import pytest

from refinery.tasks.align.data import (MIN_VALID_FRACTION, TooManyBadRecords, load_pairs, load_prompts,
                                       load_unpaired)

GOOD = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "London."}


def _jsonl(tmp_path, name, records) -> str:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(p)


@pytest.mark.parametrize("record", [
    {"prompt": "", "chosen": "a", "rejected": "b"},
    {"prompt": "   \n", "chosen": "a", "rejected": "b"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ""}],
     "chosen": "a", "rejected": "b"},
    {"conversations": [{"from": "human", "value": " "}], "chosen": {"from": "gpt", "value": "a"},
     "rejected": {"from": "gpt", "value": "b"}},
    {"chosen": "\n\nHuman: \n\nAssistant: a", "rejected": "\n\nHuman: \n\nAssistant: b"},
], ids=["empty", "blank", "empty-user-message", "sharegpt", "hh-transcript"])
def test_an_empty_prompt_is_a_bad_record(tmp_path, record):
    pairs, counts = load_pairs(_jsonl(tmp_path, "p.jsonl", [record, GOOD]))
    assert len(pairs) == 1 and counts["skipped"] == {"empty_prompt": 1}


def test_empty_fields_of_every_format_are_bad_records(tmp_path):
    pairs, counts = load_pairs(_jsonl(tmp_path, "p.jsonl", [
        GOOD, {**GOOD, "chosen": ""}, {**GOOD, "rejected": "  "}]))
    assert len(pairs) == 1 and counts["skipped"] == {"empty_reply": 2}
    ex, counts = load_unpaired(_jsonl(tmp_path, "k.jsonl", [
        {"prompt": "q?", "completion": "a.", "label": True},
        {"prompt": "", "completion": "a.", "label": True},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a."}], "label": False},
        {"prompt": "q?", "completion": "", "label": False}]))
    assert len(ex) == 1 and counts["skipped"] == {"empty_prompt": 2, "empty_reply": 1}
    prompts, counts = load_prompts(_jsonl(tmp_path, "g.jsonl", [{"question": "2+2?"}, {"question": ""},
                                                                 {"prompt": " "}]))
    assert len(prompts) == 1 and counts["skipped"] == {"empty_prompt": 2}


def test_a_file_of_mostly_bad_pairs_fails_naming_the_counts(tmp_path):
    """5 bad pairs of 6 used to train on the one left and exit 0."""
    path = _jsonl(tmp_path, "mostly-bad.jsonl", [
        GOOD, {**GOOD, "prompt": ""}, {**GOOD, "prompt": ""}, {**GOOD, "chosen": ""},
        {**GOOD, "rejected": GOOD["chosen"]}, "{not json"])
    with pytest.raises(TooManyBadRecords) as e:
        load_pairs(path, min_valid_fraction=MIN_VALID_FRACTION)
    msg = str(e.value)
    assert "mostly-bad.jsonl" in msg and "only 1 of the 6 records" in msg and "5 bad" in msg
    assert "bad_json=1, empty_prompt=2, empty_reply=1, identical_replies=1" in msg
    assert "min_valid_fraction" in msg
    assert len(load_pairs(path, min_valid_fraction=0.1)[0]) == 1          # a lower minimum lets it through
    # half usable is enough at the default minimum
    ok = _jsonl(tmp_path, "half.jsonl", [GOOD, {**GOOD, "chosen": "Paris!"}, {**GOOD, "prompt": ""}, "{"])
    assert len(load_pairs(ok, min_valid_fraction=MIN_VALID_FRACTION)[0]) == 2


def test_kto_and_grpo_files_of_mostly_bad_records_fail(tmp_path):
    kto = _jsonl(tmp_path, "k.jsonl", [{"prompt": "q?", "completion": "a.", "label": True},
                                       {"prompt": "", "completion": "a.", "label": True},
                                       {"prompt": "q?", "completion": "a.", "label": "maybe"}])
    with pytest.raises(TooManyBadRecords, match=r"only 1 of the 3 records.*bad_label=1, empty_prompt=1"):
        load_unpaired(kto, min_valid_fraction=MIN_VALID_FRACTION)
    grpo = _jsonl(tmp_path, "g.jsonl", [{"question": "2+2?"}, {"question": ""}, {"answer": "4"}])
    with pytest.raises(TooManyBadRecords, match=r"only 1 of the 3 records.*empty_prompt=1, no_prompt=1"):
        load_prompts(grpo, min_valid_fraction=MIN_VALID_FRACTION)


def test_the_align_stages_apply_the_configured_minimum(tmp_path):
    """Through the stage config (``min_valid_fraction``, default :data:`MIN_VALID_FRACTION`): the
    DPO/ORPO/reward/PPO loader fails on the mostly-bad file before any model is loaded."""
    from refinery.tasks.align.stage import DPOStageConfig, _load_split

    path = _jsonl(tmp_path, "mostly-bad.jsonl", [GOOD] + [{**GOOD, "prompt": ""}] * 5)
    cfg = DPOStageConfig(model=str(tmp_path / "model"), data=path)
    assert cfg.min_valid_fraction == MIN_VALID_FRACTION
    with pytest.raises(TooManyBadRecords, match="only 1 of the 6 records"):
        _load_split(cfg)
    train, held_out, counts = _load_split(cfg.model_copy(update={"min_valid_fraction": 0.1}))
    assert counts["pairs"] == 1
