"""Our DPO losses equal TRL 1.16's DPOTrainer losses on the same batch, for every ``loss_type``
(and ``rpo_alpha``, TRL's ``"sft"`` loss added with weight ``rpo_alpha``): TRL's own
``_compute_loss`` runs as is, with the model's output replaced by per-token log-probs whose sums
over each reply's tokens are the given sequence log-probs (replies of different lengths, so the
length-normalised losses see their token counts)."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from refinery.tasks.align.dpo import LOSS_TYPES, DPOConfig, cfg_loss, chosen_nll, dpo_loss, preference_metrics


def _trl_dpo_loss(pc, pr, rc, rr, nc, nr, beta, loss_types=("sigmoid",), loss_weights=(1.0,), label_smoothing=0.0,
                  discopop_tau=0.05):
    """TRL's loss of pairs whose replies have ``nc``/``nr`` tokens: column 0 is the prompt, the
    reply follows, padding after it; each reply token carries an equal share of its sequence's log-prob."""
    from trl.trainer.dpo_trainer import DPOTrainer

    B = len(pc)
    n = torch.cat([nc, nr])
    T = int(n.max()) + 2
    logps = torch.cat([pc, pr])
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, k in enumerate(n.tolist()):
        completion_mask[i, 1:1 + k] = 1
    shift = completion_mask[:, 1:].float()
    per_tok = shift * (logps / n)[:, None]
    outputs = SimpleNamespace(log_probs=per_tok, entropy=torch.zeros(2 * B, T - 1),
                              mean_logits=torch.zeros(2 * B, T - 1), is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool),
                              aux_loss=None)
    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=list(loss_types), loss_weights=list(loss_weights), beta=beta,
                           label_smoothing=label_smoothing, use_weighting=False,
                           args=SimpleNamespace(discopop_tau=discopop_tau),
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)


def _batch(seed=0, B=8):
    g = torch.Generator().manual_seed(seed)
    nc, nr = torch.randint(1, 9, (B,), generator=g), torch.randint(1, 9, (B,), generator=g)
    rc, rr = -nc * (1 + torch.rand(B, generator=g)), -nr * (1 + torch.rand(B, generator=g))
    pc = (rc + 2 * torch.randn(B, generator=g)).requires_grad_()
    pr = (rr + 2 * torch.randn(B, generator=g)).requires_grad_()
    return pc, pr, rc, rr, nc, nr


def _same(ours, theirs, wrt):
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours.item(), theirs.item())
    g1 = torch.autograd.grad(ours, wrt, retain_graph=True)
    g2 = torch.autograd.grad(theirs, wrt, retain_graph=True)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a, b)


SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3}


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.5])
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_every_dpo_loss_type_equals_trl(loss_type, rpo_alpha):
    """Loss and gradients of each loss type (beta 0.3; robust and exo_pair with their label
    smoothing), with and without the RPO term, against TRL's on a batch of uneven reply lengths."""
    pc, pr, rc, rr, nc, nr = _batch(seed=len(loss_type))
    cfg = DPOConfig(loss_type=loss_type, beta=0.3, label_smoothing=SMOOTHING.get(loss_type, 0.0), rpo_alpha=rpo_alpha)
    ours = cfg_loss(cfg, pc, pr, rc, rr, nc, nr)[0].mean() + rpo_alpha * chosen_nll(pc, nc)
    types, weights = ([loss_type, "sft"], [1.0, rpo_alpha]) if rpo_alpha else ([loss_type], [1.0])
    theirs = _trl_dpo_loss(pc, pr, rc, rr, nc, nr, 0.3, types, weights, cfg.label_smoothing)
    _same(ours, theirs, [pc, pr])
    # the held-out loss is the same objective
    m = preference_metrics(pc.detach(), pr.detach(), rc, rr, nc, nr, cfg)
    assert m["loss"] == pytest.approx(theirs.item(), abs=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(beta):
    pc, pr, rc, rr, nc, nr = _batch(seed=1)
    _same(dpo_loss(pc, pr, rc, rr, beta)[0].mean(), _trl_dpo_loss(pc, pr, rc, rr, nc, nr, beta), [pc, pr])


def test_loss_types_differ_and_knobs_are_checked():
    """The loss types are different functions of the same batch, and a knob a loss type does not
    read (or lacks) is an error at validation, naming it."""
    pc, pr, rc, rr, nc, nr = _batch(seed=3)
    values = {t: round(cfg_loss(DPOConfig(loss_type=t, label_smoothing=SMOOTHING.get(t, 0.0)), pc, pr, rc, rr, nc, nr)[0]
                       .mean().item(), 6) for t in LOSS_TYPES}
    assert len(set(values.values())) == len(values), values
    with pytest.raises(ValueError, match="label_smoothing.*ipo does not use it"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
        DPOConfig(loss_type="exo_pair")
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="nope")
    with pytest.raises(ValueError, match="needs the reply token counts"):
        dpo_loss(pc, pr, rc, rr, 0.1, loss_type="ipo")


def test_dpo_run_with_another_loss_type_and_the_rpo_term(tiny_causal_lm_dir, dpo_en_path):
    """On the engine: IPO plus the RPO term logs the NLL beside the loss, and lowers the loss it
    reports on the pairs it trains on (held-out figures: the same objective)."""
    from refinery.tasks.align.data import load_pairs
    from refinery.tasks.align.dpo import train_dpo

    pairs, _ = load_pairs(dpo_en_path, 16)
    cfg = DPOConfig(loss_type="ipo", beta=0.5, rpo_alpha=0.5, lr=1e-3, batch_size=8, max_steps=4, epochs=2,
                    max_prompt_len=32, max_len=64, device="cpu")
    res = train_dpo(str(tiny_causal_lm_dir), pairs, pairs[:8], cfg, seed=0)
    rows = [r for r in res.history if r["split"] == "train"]
    assert len(rows) == 4 and all(r["nll"] > 0 and r["loss"] > r["nll"] * 0.5 for r in rows)
    before, after = res.stats["held_out_before"], res.stats["held_out_after"]
    assert after["loss"] < before["loss"], (before, after)
