"""Continued pretraining (init_from): a tiny model pretrained a few steps is continued from its
weights (first-step loss far below a fresh model's); a token dataset made with another tokenizer,
or the wrong objective, stops before any step with every mismatch named."""
from __future__ import annotations

import json
import shutil

import pytest
from train_fixtures import (TINY_MODEL, corpus_texts, corpus_tokens, cfg_for, losses, one_thread, readers,  # noqa: F401
                            run, token_dataset, train_tokenizer_dir)


@pytest.fixture(scope="module")
def pretrained(corpus_tokens, tmp_path_factory):
    """A tiny causal LM after 30 steps (an HF folder with the data's tokenizer) and its loss curve."""
    from refinery.tasks.train.data import open_reader

    cfg = cfg_for(max_steps=30, eval_every=30)
    tr, va, uni = (open_reader(corpus_tokens, cfg.seq_len, split=s) for s in ("train", "val", "train"))
    from refinery.tasks.train.loop import train

    res = train(cfg, tr, va, tmp_path_factory.mktemp("scratch"), unigram_reader=uni, log=lambda m: None,
                progress=False)
    return res["final_checkpoint"], losses(res)


def init_cfg(model: str, **kw):
    from refinery.tasks.train.config import TrainConfig

    base = dict(init_from=model, seq_len=64, batch_size=8, max_steps=3, warmup_steps=0, eval_every=3,
                eval_batches=4, log_every=1000, unigram_max_tokens=50_000, device="cpu", devices=1)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_default_and_identity(pretrained):
    from refinery.tasks.train.config import CONTINUED_LR, TrainConfig

    model, _ = pretrained
    cfg = init_cfg(model)
    assert cfg.lr == CONTINUED_LR and 1e-5 <= cfg.lr <= 5e-5
    assert init_cfg(model, lr=1e-4).lr == 1e-4
    assert TrainConfig().lr == 3e-3, "from scratch keeps its own default"
    assert cfg.init_identity.startswith("dir:")
    again = TrainConfig.model_validate(cfg.model_dump(mode="json"))   # what a DDP worker gets
    assert again.lr == cfg.lr and again.init_identity == cfg.init_identity


def test_continues_from_the_weights(pretrained, readers, tmp_path):
    model, scratch = pretrained
    res = run(init_cfg(model), readers, tmp_path / "ck")
    first = losses(res)[1]
    # a random model starts near ln(vocab); 30 steps later the curve is far below, and the continued
    # run starts where the pretrained one ended (its lr of 3e-5 barely moves the weights)
    assert first < scratch[1] - 1.0, (first, scratch[1])
    assert abs(first - scratch[30]) < 0.5, (first, scratch[30])
    assert res["init_from"] == model and res["steps"] == 3


def test_tokenizer_mismatch_stops_before_any_step(pretrained, corpus_tokens, tiny_tokenizer_dir, tmp_path):
    from refinery.tasks.train.loop import run_training

    model, _ = pretrained
    # the same ids but a tokenizer without the model's <extra_id_N> sentinels: smaller vocabulary,
    # another hash, other special tokens
    other = dict(corpus_tokens, tokenizer_path=str(tiny_tokenizer_dir))
    with pytest.raises(ValueError) as e:
        run_training(init_cfg(model), other, tmp_path / "ck", log=lambda m: None, progress=False)
    msg = str(e.value)
    assert "vocab size" in msg and "tokenizer hash" in msg and "special tokens" in msg, msg
    assert "tokenizer.path=" in msg
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").glob("step-*")), "no step ran"

    # a changed special token alone (same vocabulary) is caught as well
    tok_dir = tmp_path / "tok"
    shutil.copytree(corpus_tokens["tokenizer_path"], tok_dir)
    tc = json.loads((tok_dir / "tokenizer_config.json").read_text())
    tc["eos_token"] = "<|pad|>"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ValueError, match="special tokens: eos_token"):
        run_training(init_cfg(model), dict(corpus_tokens, tokenizer_path=str(tok_dir)), tmp_path / "ck2",
                     log=lambda m: None, progress=False)


def test_objective_must_match_the_model(pretrained, corpus_tokens, tmp_path):
    from refinery.tasks.train.loop import run_training

    model, _ = pretrained
    with pytest.raises(ValueError, match="objective: the model is a causal LM.*set objective=clm"):
        run_training(init_cfg(model, objective="mlm"), corpus_tokens, tmp_path / "ck", log=lambda m: None,
                     progress=False)


def test_stage_continues_a_pretrain_dataset(token_dataset, tmp_path):
    """The stage with a refinery model dataset (the pretrain output) as init_from, on real token shards."""
    from refinery.tasks.store import Store
    from refinery.tasks.train.config import TrainConfig
    from refinery.tasks.train.stage import pretrain

    base = dict(model=TINY_MODEL, seq_len=64, batch_size=16, max_steps=20, warmup_steps=2, lr=1e-2, eval_every=20,
                eval_batches=2, log_every=1000, device="cpu", devices=1)
    store = Store(tmp_path)
    first = pretrain.run(store, [token_dataset], TrainConfig(**base))
    cont = pretrain.run(store, [token_dataset], TrainConfig(**{**base, "lr": None, "init_from": first.path,
                                                              "max_steps": 2, "eval_every": 2}))
    assert cont.fingerprint != first.fingerprint
    t = cont.manifest["training"]
    assert t["init_from"] == first.path
    plan = cont.manifest["memory_plan"]
    assert plan["setup"]["flow"] == "pretrain" and plan["params_total"] == cont.counts["params"]
    scratch = first.manifest["training"]
    # 20 steps take a fresh model from ~6.25 to ~5.3; the continued run starts there
    assert t["loss_start"] < scratch["loss_start"] - 0.8, (t["loss_start"], scratch["loss_start"])
    assert abs(t["loss_start"] - scratch["loss_end"]) < 0.3, (t["loss_start"], scratch["loss_end"])
