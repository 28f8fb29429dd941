"""Every model pretrain makes can be fine-tuned through the same finetune stage, chosen from the
model's config: text-to-text fine-tuning of the span-corruption (T5-style) model and classification
fine-tuning of the masked-LM encoder (full and LoRA each)."""
from __future__ import annotations

import json

import pytest

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


@pytest.fixture(scope="module")
def sentinel_tokenizer(tiny_tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("s2s_tok")
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(16)]})
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def span_model(sentinel_tokenizer, sft_file, tmp_path_factory):
    """A tiny T5 model pretrained (span corruption) for a few steps by the pretrain loop: its HF folder."""
    return _pretrained("span", sentinel_tokenizer, sft_file, tmp_path_factory)


def _pretrained(objective, sentinel_tokenizer, sft_file, tmp_path_factory):
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from refinery.tasks.train.config import TrainConfig
    from refinery.tasks.train.data import open_reader, tokenize_texts
    from refinery.tasks.train.loop import train

    torch.set_num_threads(1)
    recs = json.loads(sft_file.read_text())
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in recs] * 20
    root = tmp_path_factory.mktemp(objective)
    np.save(root / "t.npy", tokenize_texts(texts, sentinel_tokenizer))
    tok = AutoTokenizer.from_pretrained(str(sentinel_tokenizer))
    spec = {"kind": "array", "tokens": str(root / "t.npy"), "tokenizer_path": str(sentinel_tokenizer),
            "vocab_size": len(tok), "eos_id": tok.eos_token_id}
    cfg = TrainConfig(objective=objective, model=TINY, seq_len=32, batch_size=8, max_steps=5, warmup_steps=1,
                      lr=3e-3, eval_every=5, eval_batches=1, unigram_max_tokens=1000, device="cpu", devices=1)
    tr, va, uni = (open_reader(spec, cfg.seq_len, split=s) for s in ("train", "val", "train"))
    res = train(cfg, tr, va, root / "ck", unigram_reader=uni, log=lambda m: None, progress=False)
    return res["final_checkpoint"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_text_to_text_finetune_of_the_span_model(span_model, sft_file, tmp_path, method):
    from transformers import AutoModelForSeq2SeqLM

    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.finetune.stage import finetune

    cfg = FinetuneConfig(model=span_model, data=str(sft_file), method=method, lr=3e-3 if method == "full" else 1e-2,
                         max_steps=12, device="cpu", seq_len=32, batch_size=6, val_fraction=0.25, warmup_steps=1,
                         eval_every=6, num_samples=1, sample_max_new_tokens=4)
    ds = finetune.run(tmp_path / "s", cfg=cfg)
    s = ds.manifest["stats"]
    assert s["val_loss_after"] < s["val_loss_before"] - 0.5, (s["val_loss_before"], s["val_loss_after"])
    assert ds.manifest["chat_template"].startswith("none")
    assert s["samples_after"][0]["instruction"].startswith(("Repeat", "Reverse"))
    folder = ds.path if method == "full" else ds.file(ds.manifest["merged"])
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert model.config.is_encoder_decoder
    assert ds.manifest["memory_plan"]["params_total"] == sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def mlm_model(sentinel_tokenizer, sft_file, tmp_path_factory):
    """A tiny masked-LM encoder pretrained for a few steps by the pretrain loop: its HF folder."""
    return _pretrained("mlm", sentinel_tokenizer, sft_file, tmp_path_factory)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_classification_finetune_of_the_mlm_encoder(mlm_model, sft_file, tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.finetune.stage import finetune

    recs = json.loads(sft_file.read_text())
    data = tmp_path / "labels.jsonl"
    rows = [{"text": f"{r['instruction']} {r['input']}", "label": r["instruction"].split()[0].lower()} for r in recs]
    data.write_text("\n".join(json.dumps(x) for x in rows * 3) + "\n{\"text\": \"no label\"}\n")
    cfg = FinetuneConfig(model=mlm_model, data=str(data), method=method, lr=1e-3, head_lr=1e-2, max_steps=20,
                         device="cpu", seq_len=32, batch_size=8, val_fraction=0.25, warmup_steps=1, eval_every=10)
    ds = finetune.run(tmp_path / "s", cfg=cfg)
    s = ds.manifest["stats"]
    assert s["classes"] == ["repeat", "reverse"] and ds.counts["bad_records"] == 1
    assert s["accuracy_after"] >= 0.9 and s["val_loss_after"] < s["val_loss_before"], (s["val_history"], s["train_loss_first"], s["train_loss_last"], s["val_loss_before"])
    model = AutoModelForSequenceClassification.from_pretrained(ds.path)
    assert model.config.id2label == {0: "repeat", 1: "reverse"}


# --------------------------------------------------------------------------- on the engine: resume
def _train_seq2seq(cfg, ckpt, stop_after=None):
    from tests.finetune.test_finetune_resume import _train

    return _train(cfg, ckpt, stop_after)


def test_seq2seq_resumes_to_the_uninterrupted_run(span_model, sft_file, tmp_path):
    from refinery.tasks.finetune.config import FinetuneConfig
    from tests.finetune.test_finetune_resume import COMMON, check_resume

    cfg = FinetuneConfig(model=span_model, data=str(sft_file), method="lora", lr=1e-2, lora={"dropout": 0.1},
                         **{**COMMON, "seq_len": 32})
    check_resume(cfg, tmp_path, _train_seq2seq)


def _labels_file(sft_file, tmp_path):
    recs = json.loads(sft_file.read_text())
    data = tmp_path / "labels.jsonl"
    rows = [{"text": f"{r['instruction']} {r['input']}", "label": r["instruction"].split()[0].lower()} for r in recs]
    data.write_text("\n".join(json.dumps(x) for x in rows * 3) + "\n")
    return data


def _train_classifier(cfg, ckpt, stop_after=None):
    import torch

    from refinery.tasks.finetune import classify as C
    from refinery.tasks.train.common import seed_everything

    torch.set_num_threads(1)
    _, classes, _, train, val, tok = C._data(cfg, cfg.model)
    seed_everything(cfg.seed)
    model = C._model(cfg, cfg.model, classes, torch.device("cpu"), tok)
    _, result = C.train_classifier(cfg, model, tok, train, val, cfg.seq_len, torch.device("cpu"), ckpt_dir=ckpt,
                                   log=lambda m: None, stop_after=stop_after)
    return result, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_classification_resumes_to_the_uninterrupted_run(mlm_model, sft_file, tmp_path):
    from refinery.tasks.finetune.config import FinetuneConfig
    from tests.finetune.test_finetune_resume import COMMON, check_resume

    cfg = FinetuneConfig(model=mlm_model, data=str(_labels_file(sft_file, tmp_path)), method="lora", lr=1e-3,
                         head_lr=1e-2, **{**COMMON, "seq_len": 32, "batch_size": 4})
    whole = check_resume(cfg, tmp_path, _train_classifier)
    assert {"val_loss", "val_accuracy"} <= set(whole.val_rows()[-1])
    assert {"loss", "accuracy", "lr", "head_lr", "epoch"} <= set(whole.train_rows()[0])


def test_classification_accumulates_stops_early_and_writes_metrics(mlm_model, sft_file, tmp_path):
    """grad_accum equals a bigger batch; early stopping stops and brings the best weights back;
    the stage publishes metrics/ as SFT does."""
    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.finetune.stage import finetune
    from refinery.tasks.train.metrics import read_metrics

    data = str(_labels_file(sft_file, tmp_path))
    common = dict(model=mlm_model, data=data, method="full", lr=1e-3, head_lr=1e-2, max_steps=3, device="cpu",
                  seq_len=32, val_fraction=0.25, warmup_steps=1, eval_every=3, load_best=False)
    big, _ = _train_classifier(FinetuneConfig(batch_size=8, grad_accum=1, **common), None)
    acc, _ = _train_classifier(FinetuneConfig(batch_size=4, grad_accum=2, **common), None)
    assert [r["loss"] for r in big.train_rows()] == pytest.approx([r["loss"] for r in acc.train_rows()], abs=1e-5)
    assert big.last_val["loss"] == pytest.approx(acc.last_val["loss"], abs=1e-5)

    # min_delta so large that only the starting point counts: two validations later it stops
    cfg = FinetuneConfig(**{**common, "max_steps": 20, "eval_every": 1, "early_stopping_patience": 2,
                            "early_stopping_min_delta": 100.0, "load_best": True, "batch_size": 8})
    ds = finetune.run(tmp_path / "s", cfg=cfg)
    s = ds.manifest["stats"]
    assert ds.counts["steps"] == 2 and s["stopped_early"] and s["best_step"] == 0 and s["restored_best"]
    assert s["val_loss_after"] == pytest.approx(s["val_loss_before"], abs=1e-6)
    rows = read_metrics(ds.file("metrics"))
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 1, 2]
    assert {"metrics/metrics.jsonl", "metrics/loss.png"} <= {f["path"] for f in ds.manifest["files"]}


def test_classification_on_two_processes_matches_one(mlm_model, sft_file, tmp_path):
    """devices=2 (DDP, gloo on CPU) through the finetune worker: the same global batch as one
    process, the same curve (within 1e-4); rank 0's metrics are published."""
    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.finetune.stage import finetune
    from refinery.tasks.train.metrics import read_metrics

    common = dict(model=mlm_model, data=str(_labels_file(sft_file, tmp_path)), method="full", lr=1e-3, head_lr=1e-2,
                  max_steps=3, device="cpu", seq_len=32, val_fraction=0.25, warmup_steps=1, eval_every=3,
                  load_best=False)
    one = finetune.run(tmp_path / "one", cfg=FinetuneConfig(batch_size=8, **common))
    two = finetune.run(tmp_path / "two", cfg=FinetuneConfig(batch_size=4, devices=2, strategy="ddp", **common))
    ra, rb = read_metrics(one.file("metrics")), read_metrics(two.file("metrics"))
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    for x, y in zip(ra, rb):
        for k in ("loss", "val_loss", "val_accuracy"):
            if k in x:
                assert abs(x[k] - y[k]) < 1e-4, (k, x, y)
    a, b = one.manifest["stats"], two.manifest["stats"]
    assert abs(a["val_loss_after"] - b["val_loss_after"]) < 1e-4


def test_seq2seq_fsdp_on_two_processes_matches_one(span_model, sft_file, tmp_path):
    """devices=2, strategy=fsdp (FSDP2 over the T5 encoder and decoder blocks, gloo on CPU) through
    the finetune worker: the same global batch as one process, the same curve (within 1e-4); the
    trained weights come back into the stage's model."""
    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.finetune.stage import finetune
    from refinery.tasks.train.metrics import read_metrics

    common = dict(model=span_model, data=str(sft_file), method="full", lr=3e-3, max_steps=3, device="cpu",
                  seq_len=32, val_fraction=0.25, warmup_steps=1, eval_every=3, num_samples=1,
                  sample_max_new_tokens=2, load_best=False)
    one = finetune.run(tmp_path / "one", cfg=FinetuneConfig(batch_size=6, **common))
    two = finetune.run(tmp_path / "two", cfg=FinetuneConfig(batch_size=3, devices=2, strategy="fsdp", **common))
    ra, rb = read_metrics(one.file("metrics")), read_metrics(two.file("metrics"))
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    for x, y in zip(ra, rb):
        for k in ("loss", "val_loss"):
            if k in x:
                assert abs(x[k] - y[k]) < 1e-4, (k, x, y)
    a, b = one.manifest["stats"], two.manifest["stats"]
    assert two.manifest["memory_plan"]["setup"]["world_size"] == 2
    assert abs(a["val_loss_after"] - b["val_loss_after"]) < 1e-4   # the stage's model got the workers' weights
    assert b["val_loss_after"] < b["val_loss_before"]
