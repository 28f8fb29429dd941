"""The offline align trainers (reward, DPO, KTO, ORPO) on the training engine: a run stopped after
step 8 of 12 resumes from its checkpoint to the uninterrupted run's metrics; a stage whose run
stops early publishes nothing and its rerun resumes; the trainers' own step count and defaults.

Accumulation, the schedule, early stopping with the best weights restored and the checkpoint
format are the engine's, tested once in tests/engine/test_engine.py."""
from __future__ import annotations

import pytest
from refinery_testlib import assert_same_metrics

from refinery.tasks.align.common import total_steps
from refinery.tasks.align.reward import RewardConfig
from refinery.tasks.train.metrics import read_metrics, without_timing


def test_defaults_follow_practice():
    cfg = RewardConfig()
    assert 1e-5 <= cfg.lr <= 5e-5 and cfg.resolved_head_lr() == 1e-4


def test_total_steps_count_accumulated_batches_and_cap():
    cfg = lambda **kw: RewardConfig(**{"batch_size": 8, **kw})  # noqa: E731
    assert total_steps(100, cfg(max_steps=0, grad_accum=2), epochs=2) == 2 * 7
    assert total_steps(100, cfg(max_steps=5), epochs=3) == 5


def test_early_stopping_min_delta():
    """An improvement smaller than ``min_delta`` is none (the engine's early stopping)."""
    import torch

    from refinery.tasks.engine.early_stopping import EarlyStopping

    model = torch.nn.Linear(2, 1)
    stop = EarlyStopping("accuracy", "max", patience=2, min_delta=0.01)
    assert stop.update(0.5, 1, model) and stop.update(0.7, 2, model)
    assert not stop.update(0.705, 3, model) and not stop.should_stop
    assert not stop.update(0.6, 4, model) and stop.should_stop and stop.best_step == 2


# --------------------------------------------------------------------------- resume, in process
def _pairs(path, n=24):
    from refinery.tasks.align.data import load_pairs, split_pairs

    pairs, _ = load_pairs(path, n)
    return split_pairs(pairs, 0.25, 0, None)


def _examples(shared_data, n=32):
    from refinery_testlib import shared_file

    from refinery.tasks.align.data import load_unpaired, split_pairs

    examples, _ = load_unpaired(shared_file(shared_data, "preference/kto_en_demo.json"), n)
    return split_pairs(examples, 0.25, 0, None)


def _trainer(method: str):
    """(train function, config class) of ``method``."""
    if method == "reward":
        from refinery.tasks.align.reward import train_reward_model

        return train_reward_model, RewardConfig
    if method == "dpo":
        from refinery.tasks.align.dpo import DPOConfig, train_dpo

        return train_dpo, DPOConfig
    if method == "kto":
        from refinery.tasks.align.kto import KTOConfig, train_kto

        return train_kto, KTOConfig
    from refinery.tasks.align.orpo import ORPOConfig, train_orpo

    return train_orpo, ORPOConfig


@pytest.mark.parametrize("method", ["reward", "dpo", "kto", "orpo"])
def test_stopped_run_resumes_to_the_uninterrupted_curve(method, tmp_path, tiny_causal_lm_dir, dpo_en_path,
                                                        shared_data):
    from refinery.tasks.engine.trainer import TrainingInterrupted

    train_fn, config = _trainer(method)
    train, held_out = _examples(shared_data) if method == "kto" else _pairs(dpo_en_path)
    cfg = config(lr=1e-3, head_lr=1e-2, batch_size=4, max_steps=12, epochs=3, checkpoint_every=4, eval_every=3,
                 warmup_steps=2, max_prompt_len=32, max_len=64, eval_batch_size=8, device="cpu")

    def run(folder, stop_after=None):
        return train_fn(str(tiny_causal_lm_dir), train, held_out, cfg, seed=0, ckpt_dir=tmp_path / folder,
                        stop_after=stop_after)

    whole = run("whole")
    part = run("part", stop_after=8)
    assert part.status == "stopped" and part.stats["steps"] == 8 and "held_out_after" not in part.stats
    with pytest.raises(TrainingInterrupted, match="step 8"):
        part.raise_if_interrupted(tmp_path / "part")
    assert sorted(p.name for p in (tmp_path / "part").glob("step-*")) == ["step-00000004", "step-00000008"]
    rest = run("part")
    assert rest.status == "done" and rest.stats["resumed_from"].endswith("step-00000008")
    a = without_timing(read_metrics(tmp_path / "whole" / "metrics" / "metrics.jsonl"))
    b = without_timing(read_metrics(tmp_path / "part" / "metrics" / "metrics.jsonl"))
    assert len(a) == 12 + 5   # 12 training rows; validation at 0, 3, 6, 9, 12
    assert [r["step"] for r in a if r["split"] == "val"] == [0, 3, 6, 9, 12]
    assert_same_metrics(a, b, what=method)
    # the figures after training come from the same weights; the reference (DPO, KTO) and the
    # held-out figures before training were computed again from the starting model
    for key in ("held_out_before", "held_out_after"):
        for k, v in whole.stats[key].items():
            assert rest.stats[key][k] == pytest.approx(v, abs=1e-6, nan_ok=True), (method, key, k)


# --------------------------------------------------------------------------- a stage that stops early
def test_interrupted_stage_publishes_nothing_and_its_rerun_resumes(tmp_path, tiny_causal_lm_dir, dpo_en_path,
                                                                   monkeypatch):
    """An ORPO stage whose run stops after step 2 (as a SIGTERM would stop it) raises
    TrainingInterrupted and publishes nothing; the same command then resumes from the checkpoint
    and ends with the uninterrupted stage's curve."""
    from refinery.tasks.align.common import OfflineMethod
    from refinery.tasks.align.orpo import ORPOConfig
    from refinery.tasks.align.stage import ORPOStageConfig, orpo_stage
    from refinery.tasks.engine.trainer import TrainingInterrupted
    from refinery.tasks.store import Store

    cfg = ORPOStageConfig(model=str(tiny_causal_lm_dir), data=str(dpo_en_path), max_pairs=16, val_fraction=0.25,
                          train=ORPOConfig(lr=1e-3, batch_size=4, max_steps=4, eval_every=2, max_prompt_len=32,
                                           max_len=64, device="cpu"))
    whole = orpo_stage.run(Store(tmp_path / "whole"), [], cfg)
    store = Store(tmp_path / "cut")
    fit = OfflineMethod.fit
    monkeypatch.setattr(OfflineMethod, "fit", lambda self, total, device, **kw: fit(self, total, device,
                                                                                    **{**kw, "stop_after": 2}))
    with pytest.raises(TrainingInterrupted, match="run the same command again"):
        orpo_stage.run(store, [], cfg)
    assert store.get("orpo", orpo_stage.fingerprint([], cfg)) is None
    monkeypatch.setattr(OfflineMethod, "fit", fit)
    again = orpo_stage.run(store, [], cfg)
    assert again.manifest["stats"]["resumed_from"].endswith("step-00000002")
    assert_same_metrics(without_timing(read_metrics(whole.file("metrics"))), without_timing(read_metrics(again.file("metrics"))))
    assert again.manifest["metrics"]["held_out_loss"] == pytest.approx(whole.manifest["metrics"]["held_out_loss"],
                                                                       abs=1e-6)
