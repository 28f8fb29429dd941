"""Preference formats, splits, rendering, model-folder resolution and input identities."""
from __future__ import annotations

import gzip
import json
import os

import pytest

from refinery.tasks.align.common import model_identity, resolve_model_dir
from refinery.tasks.align.data import load_pairs, parse_record, render_prompt, render_reply, split_pairs


def test_hh_rlhf_real(hh_path):
    pairs, counts = load_pairs(hh_path)
    assert counts["records"] == 2312
    assert counts["pairs"] == len(pairs) > 2250
    # the real file has a few pairs whose transcripts differ before the last turn, and empty replies
    assert counts["skipped"].get("prompt_mismatch", 0) > 0
    assert sum(counts["skipped"].values()) + len(pairs) == counts["records"]
    p = pairs[0]
    assert p.prompt[0] == ("user", "what are some pranks with a pen i can do?")
    assert p.prompt[-1][0] == "user" and all(r in ("user", "assistant") for r, _ in p.prompt)
    assert "\n\nAssistant" not in p.chosen and "\n\nHuman" not in p.rejected
    assert p.chosen.startswith("No, sorry!") and p.rejected.startswith("There are lots of funny things")


def test_sharegpt_real(dpo_en_path):
    pairs, counts = load_pairs(dpo_en_path)
    raw = json.loads(dpo_en_path.read_text())
    assert counts["records"] == len(raw) == 300 and counts["pairs"] == 300
    with_system = [i for i, r in enumerate(raw) if r["conversations"][0]["from"] == "system"]
    assert with_system, "the demo file has system prompts"
    p = pairs[with_system[0]]
    assert p.prompt[0][0] == "system" and p.prompt[-1][0] == "user"
    assert p.chosen == raw[with_system[0]]["chosen"]["value"]
    assert len(pairs[0].prompt) == len(raw[0]["conversations"])


def test_prompt_format_corrupt_records_and_max_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."}),
        "{not json",
        json.dumps({"prompt": [{"role": "user", "content": "2+2?"}],
                    "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}),
        json.dumps({"chosen": "only one side"}),
        json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}),
        json.dumps([1, 2]),
        json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    pairs, counts = load_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ((("user", "Say hi"),), "Hi!", "Go away."),
        ((("user", "2+2?"),), "4", "5"),
        ((("user", "a"),), "b", "c"),
    ]
    assert counts["records"] == 7
    assert counts["skipped"] == {"bad_json": 1, "identical_replies": 1, "missing_field": 1, "not_object": 1}
    assert load_pairs(path, max_pairs=2)[1]["pairs"] == 2


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "broken.jsonl.gz"
    bad.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="broken.jsonl.gz"):
        load_pairs(bad)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="obj.json"):
        load_pairs(obj)
    wrapped = tmp_path / "wrapped.json.gz"
    with gzip.open(wrapped, "wt") as f:
        json.dump({"data": [{"prompt": "p", "chosen": "a", "rejected": "b"}]}, f)
    assert load_pairs(wrapped)[1]["pairs"] == 1
    with pytest.raises(ValueError, match="missing.json"):
        load_pairs(tmp_path / "missing.json")


def test_split_is_deterministic_and_disjoint(dpo_en_path):
    pairs, _ = load_pairs(dpo_en_path)
    tr, ev = split_pairs(pairs, 0.1, seed=3)
    tr2, ev2 = split_pairs(pairs, 0.1, seed=3)
    assert (tr, ev) == (tr2, ev2) and len(ev) == 30 and len(tr) == 270
    assert not {p.key() for p in tr} & {p.key() for p in ev}
    assert split_pairs(pairs, 0.1, seed=4)[1] != ev
    assert len(split_pairs(pairs, 0.5, seed=3, eval_max=7)[1]) == 7


def test_render_transcript_style_and_chat_template(tiny_causal_lm_dir):
    from transformers import AutoTokenizer

    rec = parse_record({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}],
                        "chosen": {"from": "gpt", "value": "Hello."}, "rejected": {"from": "gpt", "value": "What?"}})
    tok = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    assert render_prompt(rec.prompt, tok) == "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant:"
    assert render_reply(rec.chosen, tok) == " Hello."
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert render_prompt(rec.prompt, tok) == "<system>Be brief.<user>Hi<assistant>"
    assert render_reply(rec.chosen, tok) == "Hello."


def test_resolve_model_dir(tmp_path, tiny_causal_lm_dir):
    plain = str(tiny_causal_lm_dir)
    assert resolve_model_dir(plain) == plain
    # a finetune-style dataset: manifest names the merged folder
    ds = tmp_path / "finetune" / "abc"
    (ds / "merged").mkdir(parents=True)
    (ds / "adapter").mkdir()
    (ds / "merged" / "config.json").write_text("{}")
    (ds / "manifest.json").write_text(json.dumps({"stage": "finetune", "fingerprint": "abc", "merged": "merged",
                                                  "adapter": "adapter"}))
    assert resolve_model_dir(ds) == str(ds / "merged")
    assert model_identity(str(ds)) == "dataset:finetune:abc"
    # "model" key, as a {"path": ...} record
    ds2 = tmp_path / "sft" / "def"
    (ds2 / "weights").mkdir(parents=True)
    (ds2 / "weights" / "config.json").write_text("{}")
    (ds2 / "manifest.json").write_text(json.dumps({"stage": "sft", "fingerprint": "def", "model": {"path": "weights"}}))
    assert resolve_model_dir(ds2) == str(ds2 / "weights")
    # a dataset that holds no model
    ds3 = tmp_path / "docs" / "x"
    ds3.mkdir(parents=True)
    (ds3 / "manifest.json").write_text(json.dumps({"stage": "filter", "fingerprint": "x"}))
    with pytest.raises(ValueError, match="names no model folder"):
        resolve_model_dir(ds3)
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match="neither"):
        resolve_model_dir(tmp_path)


def test_model_identity_follows_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    a = model_identity(str(d))
    assert model_identity(str(d)) == a
    (d / "model.safetensors").write_bytes(b"123")
    b = model_identity(str(d))
    assert b != a
    os.utime(d / "model.safetensors", ns=(1, 1))
    assert model_identity(str(d)) != b
    assert model_identity("org/some-hub-model") == "hub:org/some-hub-model@main"
