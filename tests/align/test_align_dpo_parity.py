"""Our DPO loss equals TRL 1.16's DPOTrainer loss (loss_type "sigmoid", precomputed reference
log-probs) on the same batch: TRL's own _compute_loss runs as is, with the model's output
replaced by per-token log-probs whose sums are the given sequence log-probs."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from refinery.tasks.align.dpo import dpo_loss


def _trl_dpo_loss(pc, pr, rc, rr, beta):
    from trl.trainer.dpo_trainer import DPOTrainer

    B, T = len(pc), 4
    logps = torch.cat([pc, pr])
    per_tok = (logps / (T - 1))[:, None].expand(2 * B, T - 1)
    outputs = SimpleNamespace(log_probs=per_tok, entropy=torch.zeros(2 * B, T - 1),
                              mean_logits=torch.zeros(2 * B, T - 1), is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool),
                              aux_loss=None)
    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
              "completion_mask": torch.ones(2 * B, T, dtype=torch.long), "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(beta):
    g = torch.Generator().manual_seed(0)
    B = 8
    rc, rr = -20 - 10 * torch.rand(B, generator=g), -20 - 10 * torch.rand(B, generator=g)
    pc = (rc + 3 * torch.randn(B, generator=g)).requires_grad_()
    pr = (rr + 3 * torch.randn(B, generator=g)).requires_grad_()
    ours = dpo_loss(pc, pr, rc, rr, beta)[0].mean()
    theirs = _trl_dpo_loss(pc, pr, rc, rr, beta)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours.item(), theirs.item())
    g1 = torch.autograd.grad(ours, [pc, pr])
    g2 = torch.autograd.grad(theirs, [pc, pr])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
