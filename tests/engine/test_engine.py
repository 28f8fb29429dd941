"""The engine on a toy method, in-process: accumulation equals one large batch, the schedule warms
up and decays each group from its own rate, early stopping restores the best weights, and a run
stopped mid-way resumes to the uninterrupted run's metrics."""
from __future__ import annotations

import pytest
import torch

from refinery_testlib import assert_same_metrics

from refinery.tasks.engine.data import ExampleOrder
from refinery.tasks.engine.schedule import WarmupCosine
from refinery.tasks.engine.trainer import Engine, Method, Micro
from refinery.tasks.train.config import ScheduleParams
from refinery.tasks.train.metrics import read_metrics, without_timing


class Toy(Method):
    desc = "toy"
    head_prefixes = ("score",)

    def __init__(self, n: int = 32, seed: int = 0, dropout: float = 0.1, val: bool = True):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential()
        self.model.add_module("body", torch.nn.Linear(4, 8))
        self.model.add_module("drop", torch.nn.Dropout(dropout))
        self.model.add_module("score", torch.nn.Linear(8, 1))
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, generator=g)
        self.vx, self.vy = torch.randn(8, 4, generator=g), torch.randn(8, generator=g)
        self.order = ExampleOrder(n, seed)
        self.has_val = val

    def micro_step(self, micro: int) -> Micro:
        idx = torch.tensor(self.order.batch(self.engine.cfg.batch_size))
        share = self.engine.par.share(idx.tolist())
        pred = self.engine.train_model(self.x[share.idx]).squeeze(-1)
        per = (pred - self.y[share.idx]) ** 2
        return Micro(share.mean(per), {"tokens": len(share.idx), "mse": per.mean().item()})

    def validate(self):
        if not self.has_val:
            return None
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            loss = float(((self.model(self.vx).squeeze(-1) - self.vy) ** 2).mean())
            self.model.train(was)
        return {"loss": loss}

    def stateful(self):
        return {"order": self.order}


def _cfg(**kw):
    return ScheduleParams(**{"lr": 1e-2, "head_lr": 5e-2, "batch_size": 4, "max_steps": 12, "warmup_steps": 2,
                             "eval_every": 3, **kw})


def _fit(cfg, tmp=None, stop_after=None, **kw):
    m = Toy(**kw)
    return m, Engine(m, cfg, total=cfg.max_steps, device=torch.device("cpu"), ckpt_dir=tmp,
                     stop_after=stop_after).fit()


def test_stopped_run_resumes_to_the_uninterrupted_curve(tmp_path):
    cfg = _cfg(checkpoint_every=4, grad_accum=2)
    _, whole = _fit(cfg, tmp_path / "a")
    _, part = _fit(cfg, tmp_path / "b", stop_after=6)   # a checkpoint at 4 and one on stopping at 6
    assert part.status == "stopped" and part.steps == 6
    m, rest = _fit(cfg, tmp_path / "b")
    assert rest.status == "done" and rest.resumed_from and rest.resumed_from.endswith("step-00000006")
    a = without_timing(read_metrics(tmp_path / "a" / "metrics" / "metrics.jsonl"))
    b = without_timing(read_metrics(tmp_path / "b" / "metrics" / "metrics.jsonl"))
    assert len(a) == 12 + 5   # 12 train rows; validation at 0, 3, 6, 9, 12
    assert_same_metrics(a, b)


def test_accumulation_equals_one_large_batch():
    def weights(**kw):
        m, _ = _fit(_cfg(max_steps=1, warmup_steps=0, scheduler="constant", **kw), dropout=0.0, val=False)
        return torch.cat([p.detach().flatten() for p in m.model.parameters()])

    big = weights(batch_size=8, grad_accum=1)
    acc = weights(batch_size=4, grad_accum=2)
    assert torch.allclose(big, acc, atol=1e-6)
    assert not torch.allclose(big, torch.cat([p.detach().flatten() for p in Toy(dropout=0.0).model.parameters()]))


def test_schedule_warms_up_and_each_group_keeps_its_rate():
    _, res = _fit(_cfg(max_steps=10, warmup_steps=2, min_lr_ratio=0.1), val=False)
    rows = res.train_rows()
    lr, head = [r["lr"] for r in rows], [r["head_lr"] for r in rows]
    assert lr[:3] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2], rel=1e-5)
    assert all(h == pytest.approx(5 * v, rel=1e-4) for h, v in zip(head, lr))
    assert lr[-1] < lr[3] and min(lr[2:]) >= 1e-3 - 1e-9
    f = WarmupCosine(2, 10, 0.1)
    assert [round(f(s), 6) for s in (0, 1, 2)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0] and f(10) == 0.1


def test_early_stopping_stops_and_restores_the_best(tmp_path):
    cfg = _cfg(lr=0.5, head_lr=0.5, max_steps=40, eval_every=1, early_stopping_patience=2, warmup_steps=0)
    m, res = _fit(cfg)
    assert res.status == "early_stopped" and res.steps < 40
    assert res.restored_step == res.stopper.best_step
    assert m.validate()["loss"] == pytest.approx(res.stopper.best)


def test_a_finished_run_is_not_trained_again(tmp_path):
    cfg = _cfg(checkpoint_every=4, max_steps=8)
    m = Toy()
    first = Engine(m, cfg, total=8, device=torch.device("cpu"), ckpt_dir=tmp_path, save_final=True).fit()
    again = Engine(Toy(), cfg, total=8, device=torch.device("cpu"), ckpt_dir=tmp_path, save_final=True).fit()
    assert first.status == again.status == "done" and again.steps == 8
    assert len(again.history) == len(first.history)


def test_non_finite_loss_stops_before_a_checkpoint(tmp_path):
    class Bad(Toy):
        def micro_step(self, micro):
            out = super().micro_step(micro)
            return Micro(out.loss * float("nan"), out.figures)

    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        Engine(Bad(), _cfg(checkpoint_every=1), total=4, device=torch.device("cpu"), ckpt_dir=tmp_path).fit()
    assert not list(tmp_path.glob("step-*"))


def test_a_stop_requested_from_another_thread_checkpoints_and_stops(tmp_path):
    """The program's SIGTERM handler (main thread) asks an engine training in a worker thread to stop."""
    import threading

    from refinery.tasks.engine import signals

    class Asking(Toy):
        def micro_step(self, micro):
            if self.engine.state.step == 3:
                signals.request_stop()
            return super().micro_step(micro)

    box = {}
    t = threading.Thread(target=lambda: box.update(res=Engine(Asking(), _cfg(), total=12, device=torch.device("cpu"),
                                                               ckpt_dir=tmp_path).fit()))
    try:
        t.start()
        t.join()
    finally:
        signals._REQUESTED.clear()
    assert box["res"].status == "preempted" and box["res"].steps == 4
    assert (tmp_path / "step-00000004").is_dir()
