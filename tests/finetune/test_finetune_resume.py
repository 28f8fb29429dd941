"""SFT on the training engine: a run stopped after step 8 of 12 (checkpoints every 4) resumes to the
uninterrupted run's metrics (every row, timing aside, within 1e-6) and weights, for LoRA (dropout
on: the RNG state is part of the checkpoint) and full fine-tuning; through the stage, a stopped run
publishes nothing and the same stage run again resumes it."""
from __future__ import annotations

import functools

import pytest
from refinery_testlib import assert_same_metrics

from refinery.tasks.finetune.config import FinetuneConfig

TOL = 1e-6
COMMON = dict(max_steps=12, checkpoint_every=4, eval_every=4, device="cpu", seq_len=64, batch_size=3, grad_accum=2,
              val_fraction=0.25, warmup_steps=2, num_samples=0)


def _rows(folder):
    from refinery.tasks.train.metrics import read_metrics, without_timing

    return without_timing(read_metrics(folder))


def _train(cfg: FinetuneConfig, ckpt, stop_after=None):
    """The stage's data and model (same seeds), trained on the engine into ``ckpt``."""
    import torch

    from refinery.tasks.finetune import methods as M
    from refinery.tasks.finetune.seq2seq import model_kind
    from refinery.tasks.finetune.train import prepare_data, train_sft
    from refinery.tasks.train.common import seed_everything

    torch.set_num_threads(1)
    source = M.resolve_model_source(cfg.model)
    tok = M.load_tokenizer(cfg, source)
    data = prepare_data(cfg, source, tok, model_kind(source))
    device = torch.device("cpu")
    compute, weights = M.resolve_dtypes(cfg, device)
    seed_everything(cfg.seed)
    model = M.wrap_model(cfg, M.load_base_model(cfg, source, device, compute, weights), source)
    seed_everything(cfg.seed)
    _, result = train_sft(cfg, model, data.train_items, data.val_batches, data.pad_id, device, compute,
                          seq_len=data.seq_len, ckpt_dir=ckpt, log=lambda m: None, stop_after=stop_after)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return result, trained


def check_resume(cfg: FinetuneConfig, tmp_path, train=_train):
    whole, w_whole = train(cfg, tmp_path / "a")
    part, _ = train(cfg, tmp_path / "b", stop_after=8)
    assert part.status == "stopped" and part.steps == 8
    assert sorted(p.name for p in (tmp_path / "b").glob("step-*")) == ["step-00000004", "step-00000008"]
    rest, w_rest = train(cfg, tmp_path / "b")
    assert whole.status == rest.status == "done" and rest.steps == 12
    assert rest.resumed_from and rest.resumed_from.endswith("step-00000008")
    a, b = _rows(tmp_path / "a" / "metrics"), _rows(tmp_path / "b" / "metrics")
    assert [r["step"] for r in a if r["split"] == "val"] == [0, 4, 8, 12]
    assert [r["step"] for r in a if r["split"] == "train"] == list(range(1, 13))
    assert_same_metrics(a, b, TOL)
    assert w_whole.keys() == w_rest.keys()
    for n in w_whole:
        assert (w_whole[n] - w_rest[n]).abs().max() < 1e-5, n
    return whole


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sft_resumes_to_the_uninterrupted_run(method, tiny_causal_lm_dir, sft_file, tmp_path):
    cfg = FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(sft_file), method=method,
                         lr=1e-2 if method == "lora" else 1e-3, lora={"dropout": 0.1}, **COMMON)
    whole = check_resume(cfg, tmp_path)
    rows = whole.train_rows()
    assert {"loss", "lr", "grad_norm", "epoch", "label_tokens", "tokens"} <= set(rows[0])
    assert rows[-1]["epoch"] >= 1   # 18 examples, 6 per step: the stream ran on into later epochs
    assert rows[-1]["label_tokens"] > rows[0]["label_tokens"] > 0


def test_stopped_stage_publishes_nothing_and_resumes(tiny_causal_lm_dir, sft_file, tmp_path, monkeypatch):
    from refinery.tasks.engine.trainer import TrainingInterrupted
    from refinery.tasks.finetune import train as T
    from refinery.tasks.finetune.stage import finetune
    from refinery.tasks.train.metrics import read_metrics

    cfg = FinetuneConfig(model=str(tiny_causal_lm_dir), data=str(sft_file), method="lora", lr=1e-2,
                         **{**COMMON, "max_steps": 6, "checkpoint_every": 2, "eval_every": 3, "grad_accum": 1})
    with monkeypatch.context() as m:   # a run that stops after step 4 (as a SIGTERM would stop it)
        m.setattr(T, "train_sft", functools.partial(T.train_sft, stop_after=4))
        with pytest.raises(TrainingInterrupted, match="step 4"):
            finetune.run(tmp_path / "s", cfg=cfg)
    assert not list((tmp_path / "s").glob("finetune/*/manifest.json"))
    ds = finetune.run(tmp_path / "s", cfg=cfg)
    s = ds.manifest["stats"]
    assert s["resumed_from"].endswith("step-00000004") and ds.counts["steps"] == 6
    rows = read_metrics(ds.file("metrics"))
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 3, 6]
    assert [h["step"] for h in s["val_history"]] == [3, 6] and s["train_loss_last"] == rows[-2]["loss"]
