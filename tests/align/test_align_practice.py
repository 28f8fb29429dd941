"""The align trainers' practice: accumulation equals one large batch, the schedule warms up and
decays, the head takes its own rate, early stopping stops and restores the best weights."""
from __future__ import annotations

import pytest
import torch

from refinery.tasks.align.practice import EarlyStopping, make_optimisation, run_loop, total_steps
from refinery.tasks.align.reward import RewardConfig
from refinery.tasks.train.metrics import MetricsLog


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 4)
        self.score = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.score(torch.tanh(self.body(x))).squeeze(-1)


def _cfg(**kw):
    return RewardConfig(**{"lr": 1e-2, "head_lr": 1e-1, "batch_size": 4, "max_steps": 10, **kw})


def test_defaults_follow_practice():
    cfg = RewardConfig()
    assert 1e-5 <= cfg.lr <= 5e-5 and cfg.resolved_head_lr() == 1e-4


def test_total_steps_count_accumulated_batches_and_cap():
    assert total_steps(100, _cfg(max_steps=0, batch_size=8, grad_accum=2), epochs=2) == 2 * 7
    assert total_steps(100, _cfg(max_steps=5, batch_size=8), epochs=3) == 5


def test_accumulated_micro_batches_give_the_large_batch_update():
    x, y = torch.randn(8, 4), torch.randn(8)

    def one_step(cfg, parts):
        model = _Model()
        optim = make_optimisation(model, cfg, total=1)
        for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
            optim.backward(((model(xs) - ys) ** 2).mean())
        optim.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    big = one_step(_cfg(batch_size=8, grad_accum=1, scheduler="constant", warmup_steps=0), 1)
    acc = one_step(_cfg(batch_size=4, grad_accum=2, scheduler="constant", warmup_steps=0), 2)
    assert torch.allclose(big, acc, atol=1e-6)
    assert not torch.allclose(big, torch.cat([p.detach().flatten() for p in _Model().parameters()]))


def test_schedule_warms_up_and_decays_each_group_from_its_own_rate():
    model = _Model()
    optim = make_optimisation(model, _cfg(warmup_steps=2, min_lr_ratio=0.1), total=10)
    rates = []
    for _ in range(10):
        optim.backward(model(torch.randn(2, 4)).sum())
        rates.append(optim.step())
    lrs = [r["lr"] for r in rates]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2] > lrs[5] > lrs[9] >= 1e-3 - 1e-9
    assert all(r["head_lr"] == pytest.approx(10 * r["lr"], rel=1e-3) for r in rates)


def test_early_stopping_stops_after_patience_and_restores_the_best():
    model = _Model()
    stop = EarlyStopping("accuracy", "max", patience=2, min_delta=0.01)
    assert stop.update(0.5, 1, model)
    best = model.score.weight.detach().clone()
    with torch.no_grad():
        model.score.weight.add_(1.0)
    assert stop.update(0.7, 2, model) and not stop.should_stop
    best = model.score.weight.detach().clone()
    with torch.no_grad():
        model.score.weight.add_(1.0)
    assert not stop.update(0.705, 3, model)     # within min_delta: not an improvement
    assert not stop.update(0.6, 4, model) and stop.should_stop
    assert stop.restore(model) == 2 and torch.equal(model.score.weight, best)
    low = EarlyStopping("loss", "min")
    assert low.update(2.0, 0, model) and low.update(1.0, 1, model) and not low.update(1.5, 2, model)


def test_run_loop_early_stops_and_restores(tmp_path):
    """A loop whose held-out figure only gets worse: it stops after `patience` validations and the
    weights of the best one come back."""
    model = _Model()
    cfg = _cfg(max_steps=50, eval_every=1, early_stopping_patience=2, grad_accum=2)
    optim = make_optimisation(model, cfg, total=50)
    x = torch.randn(4, 4)
    calls = {"micro": 0, "val": 0}

    def micro():
        calls["micro"] += 1
        loss = (model(x) ** 2).mean()
        optim.backward(loss)
        return {"tokens": 4, "loss": loss.item()}

    snapshots = []

    def validate():
        calls["val"] += 1
        snapshots.append(model.score.weight.detach().clone())
        return {"loss": float(calls["val"])}      # worse every time: the first is the best

    log = MetricsLog(None, total_steps=50, fresh=True)
    stop = EarlyStopping("loss", "min", cfg.early_stopping_patience)
    res = run_loop(model, cfg, 50, optim, micro, log, validate, stop)
    assert res.steps == 3 and calls["micro"] == 6 and res.tokens == 24
    assert res.restored_step == 1 and torch.equal(model.score.weight, snapshots[0])
    rows = log.history
    assert [r["step"] for r in rows if r["split"] == "val"] == [1, 2, 3]
    assert {"loss", "lr", "head_lr", "grad_norm"} <= set(next(r for r in rows if r["split"] == "train"))
