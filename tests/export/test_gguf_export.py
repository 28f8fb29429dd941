"""GGUF export (refinery.tasks.export.gguf): the file is read back through transformers' own GGUF
loader (``from_pretrained(..., gguf_file=...)``) and its logits, tokenizer and config compared with
the exported model. llama.cpp itself is checked by bench/gguf_llamacpp.py (it builds llama.cpp)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

TEXTS = [
    "The quick brown fox jumps over the lazy dog, then returns home.",
    "Return a new dictionary initialized from an optional positional argument.",
    "  Leading spaces, émigrés, 東京, emoji 🙂 and a tab\tstay lossless.",
]


def _corpus() -> list[str]:
    import collections
    import json as js

    out = []
    for mod in (js, collections):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str):
                out.append(doc)
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """What pretrain writes, in miniature: the tokenizer stage's own BPE (trained here, with its special
    tokens and sentinels), a Llama with tied embeddings padded past the tokenizer (multiple of 64),
    grouped-query attention (4 heads, 2 key/value heads), and the finetune stage's chat template."""
    import torch
    from transformers import AutoModelForCausalLM

    from refinery.tasks.finetune.data import DEFAULT_CHAT_TEMPLATE
    from refinery.tasks.tokens.tokenizer import TokenizerConfig, save_hf, train_bpe
    from refinery.tasks.train.models import model_config, padded_vocab

    out = tmp_path_factory.mktemp("tiny_llama")
    cfg = TokenizerConfig(vocab_size=600, sentinels=3)
    fast = save_hf(train_bpe(_corpus(), cfg), cfg, out)
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.save_pretrained(out)
    n = len(fast)
    assert padded_vocab(n) > n, "the test wants embedding rows beyond the tokenizer"
    conf = model_config("clm", "tiny", padded_vocab(n), 128,
                        {"eos": fast.eos_token_id, "pad": fast.pad_token_id, "bos": fast.bos_token_id},
                        overrides={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf)
    with torch.no_grad():   # weights of a trained model's scale, not the init's near-zero logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(out)
    return out


def _ids(tok, texts=TEXTS):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _round_trip(model, qtype: str):
    """``model`` with every matrix passed through the file's type (quantized, then dequantized by the
    gguf package), as the file should hold it."""
    import gguf
    import torch

    t = gguf.GGMLQuantizationType[qtype]
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                w = p.detach().float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, t), t).reshape(w.shape)))
    return model


def _compare(src: Path, gguf_file: Path, rel_tol: float, agree: float, exact: str | None = None):
    """Logits of the GGUF model (read by transformers) against the source model on the texts, BOS
    first: within ``rel_tol`` of the logit range, the same greedy token at ``agree`` of the positions;
    ``exact``: the file's matrix type, and the logits equal (to float rounding) the source model's
    with its matrices rounded to that type, which no layout mistake survives."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rounded = _round_trip(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), exact) if exact else None
    got = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    assert got.config.num_key_value_heads == ref.config.num_key_value_heads
    assert got.config.vocab_size == ref.config.vocab_size
    same = total = 0
    for ids in _ids(tok):
        ids = [tok.bos_token_id] + ids
        a, b = _logits(ref, ids), _logits(got, ids)
        err = (a - b).abs().max().item() / a.abs().max().item()
        assert err < rel_tol, f"{gguf_file.name}: max logit error {err:.4f} of the logit range"
        if rounded is not None:
            torch.testing.assert_close(b, _logits(rounded, ids), rtol=1e-4, atol=1e-4)
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
    assert same / total >= agree, f"{gguf_file.name}: greedy agreement {same}/{total}"
    return got


@pytest.mark.parametrize("quant,rel_tol,agree", [("f16", 0.01, 0.98), ("q8_0", 0.08, 0.85)])
def test_gguf_read_back_through_transformers(tiny_llama, tmp_path, quant, rel_tol, agree):
    import gguf

    from refinery.tasks.export.gguf import export_gguf

    res = export_gguf(str(tiny_llama), tmp_path / "out" / f"m.{quant}.gguf", quant=quant)
    assert res.path.is_file() and res.bytes == res.path.stat().st_size
    assert [p.name for p in res.path.parent.iterdir()] == [res.path.name]   # no temporary file left
    want = {"f16": "F16", "q8_0": "Q8_0"}[quant]
    # 2 norms per block + the final norm stay float32; every matrix takes the chosen type; tied: no output.weight
    assert res.tensor_types == {"F32": 2 * 2 + 1, want: 1 + 2 * 7}
    _compare(tiny_llama, res.path, rel_tol, agree, exact=want)

    reader = gguf.GGUFReader(str(res.path))
    def field(key):
        f = reader.fields[key]
        return f.contents()
    conf = json.loads((tiny_llama / "config.json").read_text())
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == conf["vocab_size"]
    assert tokens[conf["eos_token_id"]] == "<|endoftext|>" and types[conf["eos_token_id"]] == gguf.TokenType.CONTROL
    assert tokens[-1] == f"[PAD{conf['vocab_size'] - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert field("llama.attention.head_count_kv") == 2
    assert "### Assistant:" in field("tokenizer.chat_template")


def test_gguf_tokenizer_round_trips(tiny_llama, tmp_path):
    """The tokenizer transformers builds from the file encodes and decodes as the exported one does,
    special tokens and chat template included."""
    from transformers import AutoTokenizer

    from refinery.tasks.export.gguf import export_gguf

    res = export_gguf(str(tiny_llama), tmp_path / "m.gguf", quant="f16")
    src = AutoTokenizer.from_pretrained(tiny_llama)
    got = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    texts = TEXTS + ["<|endoftext|>two docs<|endoftext|>", "x <extra_id_1> y"]
    assert _ids(got, texts) == _ids(src, texts)
    for ids in _ids(src, texts):
        assert got.decode(ids) == src.decode(ids)
    assert got.eos_token == src.eos_token and got.pad_token == src.pad_token
    msgs = [{"role": "user", "content": "Name three rivers."}]
    assert (got.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == src.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    assert res.chat_template


def test_gguf_merged_lora_model(tiny_llama, tmp_path):
    """A LoRA fine-tune merged into its base (what finetune publishes as ``merged``) exports like any
    Llama, and the file carries the merged weights, not the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from refinery.tasks.export.gguf import export_gguf

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    merged = peft.merge_and_unload()
    out = tmp_path / "merged"
    merged.save_pretrained(out)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            (out / f.name).write_bytes(f.read_bytes())
    res = export_gguf(str(out), tmp_path / "merged.gguf", quant="f16")
    got = _compare(out, res.path, 0.01, 0.98)
    ids = [0] + _ids(__import__("transformers").AutoTokenizer.from_pretrained(out))[0]
    assert (_logits(got, ids) - _logits(base.__class__.from_pretrained(tiny_llama), ids)).abs().max() > 0.05


def test_gguf_refuses_what_it_cannot_export(tiny_llama, tmp_path):
    from transformers import AutoModelForMaskedLM

    from refinery.tasks.export.gguf import ExportError, export_gguf
    from refinery.tasks.train.models import model_config

    enc = tmp_path / "mlm"
    AutoModelForMaskedLM.from_config(model_config("mlm", "tiny", 640, 64, {"eos": 0, "pad": 1, "mask": 2},
                                                  overrides={"hidden_size": 32, "intermediate_size": 64,
                                                             "num_hidden_layers": 1, "num_attention_heads": 2})
                                     ).save_pretrained(enc)
    with pytest.raises(ExportError, match=r"ModernBertForMaskedLM \(model_type 'modernbert'\).*LlamaForCausalLM"):
        export_gguf(str(enc), tmp_path / "x.gguf")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match="PEFT adapter"):
        export_gguf(str(adapter), tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="unknown --quant 'q5_k'"):
        export_gguf(str(tiny_llama), tmp_path / "x.gguf", quant="q5_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_q4_k_m_without_llama_cpp_says_what_to_do(tiny_llama, tmp_path, monkeypatch):
    import sys

    from refinery.tasks.export.gguf import ExportError, export_gguf

    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # as if llama-cpp-python were not installed
    with pytest.raises(ExportError, match=r"q4_k_m.*cannot write K-quants.*pip install llama-cpp-python.*llama-quantize"):
        export_gguf(str(tiny_llama), tmp_path / "m.gguf", quant="q4_k_m")
    assert list(tmp_path.iterdir()) == []   # neither the output nor a temporary file


def test_q4_k_m_through_llama_cpp(tiny_llama, tmp_path):
    """Where llama-cpp-python is installed (bench/gguf_llamacpp.py builds it), q4_k_m is llama.cpp's
    own quantizer; the tiny model's 64-wide rows are below Q4_K's 256, so llama.cpp falls back."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as e:   # OSError: installed without a loadable llama.cpp library
        pytest.skip(f"llama-cpp-python is not usable here: {e}")
    from refinery.tasks.export.gguf import export_gguf

    res = export_gguf(str(tiny_llama), tmp_path / "m.gguf", quant="q4_k_m")
    assert res.tensor_types.get("F32") == 5 and res.notes
    _compare(tiny_llama, res.path, 0.25, 0.7)


def test_cli_export(tiny_llama, tmp_path, capsys):
    from refinery.flows.cli import main

    assert main(["export", str(tiny_llama), "--format", "gguf", "--quant", "q8_0", "--out", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(info["path"]) == tmp_path / f"{tiny_llama.name}.q8_0.gguf" and Path(info["path"]).is_file()
    assert info["quant"] == "q8_0" and info["tensor_types"]["Q8_0"] == 15 and info["chat_template"] is True
    enc = tmp_path / "t5"
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(enc)
    assert main(["export", str(enc), "--out", str(tmp_path / "t5.gguf")]) == 2
    err = capsys.readouterr().err
    assert "refinery export:" in err and "T5ForConditionalGeneration (model_type 't5')" in err
    assert not (tmp_path / "t5.gguf").exists()
