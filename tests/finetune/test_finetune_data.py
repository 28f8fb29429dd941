"""SFT data: formats, bad-record reporting, chat templates, response-only labels, truncation, packing."""
from __future__ import annotations

import json
import shutil

import pytest

from refinery.tasks.finetune import data as D

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def labeled_text(tok, enc: D.Encoded) -> str:
    return tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != D.IGNORE])


def runs(tok, enc: D.Encoded) -> list[str]:
    """The labeled stretches of tokens, decoded one by one."""
    out, cur = [], []
    for t, l in zip(enc.input_ids, enc.labels):
        if l != D.IGNORE:
            assert l == t
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


# --------------------------------------------------------------------------- reading real files
def test_reads_alpaca_files(alpaca_en, alpaca_zh):
    ex, rep = D.read_examples(alpaca_en)
    assert rep.records == 999 and rep.bad == 0 and rep.examples == 999
    assert dict(rep.formats) == {"alpaca": 999}
    first = json.loads(alpaca_en.read_text())[0]
    msgs = ex[0].messages
    assert msgs[-1] == {"role": "assistant", "content": first["output"]}
    assert msgs[-2]["role"] == "user" and msgs[-2]["content"].startswith(first["instruction"])
    ex_zh, rep_zh = D.read_examples(alpaca_zh, max_records=50)
    assert rep_zh.records == 50 and len(ex_zh) == 50


def test_reads_sharegpt_toolcalls(glaive):
    ex, rep = D.read_examples(glaive)
    assert rep.records == 300 and rep.examples + rep.bad == 300 and rep.examples >= 290
    assert dict(rep.formats) == {"sharegpt": rep.examples}
    roles = {m["role"] for e in ex for m in e.messages}
    assert roles == {"system", "user", "assistant", "tool"}
    # tools go to the system message; function calls are assistant turns
    with_tools = [e for e in ex if e.messages[0]["role"] == "system"]
    assert with_tools and "Available tools:" in with_tools[0].messages[0]["content"]
    assert any(m["role"] == "assistant" and m["content"].startswith('{"name"') for e in ex for m in e.messages)


def test_reads_self_instruct(self_instruct):
    ex, rep = D.read_examples(self_instruct)
    assert rep.records == 175 and rep.bad == 0
    assert len(ex) == 175  # one example per instance (these tasks have one each)
    rec = json.loads(self_instruct.read_text().splitlines()[0])
    assert ex[0].messages[-1]["content"] == rec["instances"][0]["output"]
    assert dict(rep.formats) == {"self_instruct": 175}
    assert ex[0].record == 1


# --------------------------------------------------------------------------- bad records
def test_bad_records_reported_by_line_and_skipped(tmp_path):
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        "{not json",
        json.dumps({"instruction": "say x"}),  # no output
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        "",
        json.dumps({"conversations": [{"from": "human", "value": "only a question"}]}),
        json.dumps([1, 2]),
        json.dumps({"messages": [{"role": "system", "content": "s"},
                                 {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                                 {"role": "assistant", "content": "ok"}]}),
        json.dumps({"instruction": "x", "input": 3, "output": "y"}),
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(lines) + "\n")
    ex, rep = D.read_examples(p)
    assert [e.record for e in ex] == [1, 8]
    assert ex[1].messages[1]["content"] == "ab"
    assert rep.records == 8 and rep.bad == 6
    got = {b["record"]: b["reason"].split(":")[0] for b in rep.bad_records}
    assert got == {2: "invalid_json", 3: "missing_output", 4: "unknown_role", 6: "no_assistant_turn",
                   7: "not_an_object", 9: "bad_input"}
    assert rep.as_dict()["bad_by_reason"]["invalid_json"] == 1


def test_json_array_records_numbered(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "", "output": "b"},
                             {"instruction": "c", "output": "d"}]))
    ex, rep = D.read_examples(p)
    assert [e.record for e in ex] == [1, 3]
    assert rep.bad_records == [{"record": 2, "reason": "empty_instruction"}]


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        D.read_examples(tmp_path / "nope.json")
    bad = tmp_path / "broken.json"
    bad.write_text('[{"instruction": "a", "output": ')
    with pytest.raises(ValueError, match="broken.json"):
        D.read_examples(bad)


# --------------------------------------------------------------------------- templates and labels
def test_default_template_masks_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.chat_template is None
    assert D.ensure_chat_template(tok) == "default" and tok.chat_template == D.DEFAULT_CHAT_TEMPLATE
    msgs = D.alpaca_messages({"instruction": "Name a colour.", "input": "sky", "output": "The sky is blue."})
    enc = D.encode(tok, msgs, seq_len=256)
    assert runs(tok, enc) == ["The sky is blue." + tok.eos_token]
    prompt = tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l == D.IGNORE])
    assert "Name a colour." in prompt and "sky" in prompt and "The sky is blue" not in prompt
    assert enc.labels[0] == D.IGNORE and not enc.truncated


def test_multi_turn_every_assistant_turn_labeled(tiny_tokenizer):
    tok = tiny_tokenizer
    D.ensure_chat_template(tok)
    msgs = D.sharegpt_messages({"conversations": [
        {"from": "human", "value": "Find a recipe."},
        {"from": "function_call", "value": '{"name": "search"}'},
        {"from": "observation", "value": '{"recipes": []}'},
        {"from": "gpt", "value": "Nothing found."},
        {"from": "human", "value": "trailing question without answer"},
    ]})
    assert msgs[-1]["content"] == "Nothing found."  # trailing user turn dropped
    enc = D.encode(tok, msgs, seq_len=512)
    assert runs(tok, enc) == ['{"name": "search"}' + tok.eos_token, "Nothing found." + tok.eos_token]


def test_tokenizer_own_template_is_used(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    assert D.ensure_chat_template(tok) == "tokenizer"
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello again."}]
    enc = D.encode(tok, msgs, seq_len=512)
    assert runs(tok, enc) == ["Hello!<|im_end|>", "Hello again.<|im_end|>"]
    assert "<|im_start|>" in tok.decode(enc.input_ids)


def test_truncation_counted(tiny_tokenizer):
    tok = tiny_tokenizer
    D.ensure_chat_template(tok)
    long = D.Example(D.alpaca_messages({"instruction": "Write.", "output": "word " * 200}), 1)
    short = D.Example(D.alpaca_messages({"instruction": "Write.", "output": "ok"}), 2)
    huge_prompt = D.Example(D.alpaca_messages({"instruction": "Read " * 200, "output": "fine"}), 3)
    rep = D.ReadReport(path="x")
    items, counts = D.encode_all(tok, [long, short, huge_prompt], seq_len=48, report=rep)
    assert [e.record for e in items] == [1, 2]
    assert counts["truncated"] == 2 and counts["no_response_tokens"] == 1
    assert all(len(e.input_ids) <= 48 for e in items) and items[0].truncated
    assert rep.bad_records[0]["record"] == 3


def test_split_is_deterministic_and_disjoint(sft_file):
    ex, _ = D.read_examples(sft_file)
    a = D.split_examples(ex, 0.25, seed=1)
    b = D.split_examples(ex, 0.25, seed=1)
    c = D.split_examples(ex, 0.25, seed=2)
    assert [e.record for e in a[1]] == [e.record for e in b[1]] != [e.record for e in c[1]]
    assert len(a[1]) == 6 and not {e.record for e in a[0]} & {e.record for e in a[1]}


# --------------------------------------------------------------------------- packing
def test_packed_loss_equals_unpacked_loss(tiny_causal_lm_dir, tiny_tokenizer, sft_file):
    import torch
    from transformers import AutoModelForCausalLM

    from refinery.tasks.finetune.train import per_token_losses

    tok = tiny_tokenizer
    D.ensure_chat_template(tok)
    ex, _ = D.read_examples(sft_file)
    items, _ = D.encode_all(tok, ex[:6], seq_len=128)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float32).eval()

    rows = D.pack(items, seq_len=128)
    assert len(rows) < len(items) and sum(r.n_examples for r in rows) == 6
    assert rows[0].position_ids.count(0) == rows[0].n_examples  # positions restart per example
    packed = D.packed_batch(rows, tok.pad_token_id)
    assert packed.attention_mask is None and packed.n_labels == sum(e.n_labels for e in items)
    packed_loss = per_token_losses(model, packed)

    # each example alone
    alone = [per_token_losses(model, D.pad_batch([e], tok.pad_token_id))[0] for e in items]
    k = 0
    for r, row in enumerate(rows):
        off = 0
        for _ in range(row.n_examples):
            e, ref = items[k], alone[k]
            n = len(e.input_ids)
            got = packed_loss[r, off:off + n - 1]
            assert torch.allclose(got, ref, atol=1e-5), (k, (got - ref).abs().max())
            off += n
            k += 1
    total_packed = packed_loss.sum() / packed.n_labels
    total_alone = sum(a.sum() for a in alone) / sum(e.n_labels for e in items)
    assert abs(float(total_packed - total_alone)) < 1e-5

    # control: the same rows with running positions let examples see each other, and losses change
    leaky = D.Batch(packed.input_ids, packed.labels, None,
                    torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids).contiguous(),
                    packed.n_tokens, packed.n_labels)
    assert not torch.allclose(per_token_losses(model, leaky), packed_loss, atol=1e-4)


def test_padded_batches_match_single_examples(tiny_causal_lm_dir, tiny_tokenizer, sft_file):
    import torch
    from transformers import AutoModelForCausalLM

    from refinery.tasks.finetune.train import per_token_losses

    tok = tiny_tokenizer
    D.ensure_chat_template(tok)
    ex, _ = D.read_examples(sft_file)
    items, _ = D.encode_all(tok, ex[:3], seq_len=128)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float32).eval()
    batch = per_token_losses(model, D.pad_batch(items, tok.pad_token_id))
    for i, e in enumerate(items):
        ref = per_token_losses(model, D.pad_batch([e], tok.pad_token_id))[0]
        assert torch.allclose(batch[i, : len(e.input_ids) - 1], ref, atol=1e-5)


def test_sentencepiece_style_tokens_keep_first_response_token(tmp_path):
    """Metaspace tokens ("▁word") carry the space before them: a response right after a space in the
    template still gets its first token labeled."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = " ".join(f"User: question{i} Assistant: answer{i} blue sky" for i in range(50))
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator([words], trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"],
                                                                show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }} "
                         "{% else %}Assistant: {{ m['content'] }}{{ eos_token }} {% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}Assistant: {% endif %}")
    msgs = [{"role": "user", "content": "question3"}, {"role": "assistant", "content": "blue sky"}]
    enc = D.encode(tok, msgs, seq_len=64)
    first = enc.labels.index(next(x for x in enc.labels if x != D.IGNORE))
    assert tok.convert_ids_to_tokens(enc.input_ids[first]).startswith("▁")
    assert labeled_text(tok, enc).strip() == "blue sky</s>"
