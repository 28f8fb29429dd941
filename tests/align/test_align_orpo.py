"""ORPO (reference-free): the odds-ratio term against TRL's on the same batch, the NLL term as TRL
computes it, and a run on real pairs whose held-out loss falls."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from refinery.tasks.align.orpo import ORPOConfig, chosen_nll, odds_ratio_loss


def test_odds_ratio_loss_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(0)
    c = -torch.rand(8, generator=g) * 3 - 0.05     # mean per-token log-probs, both sides of -ln 2
    r = -torch.rand(8, generator=g) * 3 - 0.05
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs, *_rest, their_log_odds = ORPOTrainer.odds_ratio_loss(fake, c, r)
    ours, log_odds = odds_ratio_loss(c, r, 0.25)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(log_odds.mean(), their_log_odds, atol=1e-6)


def test_chosen_nll_is_token_mean_cross_entropy_over_prompt_and_reply():
    """TRL: CrossEntropyLoss over the chosen sequences' shifted labels, pad positions -100."""
    from refinery.tasks.align.orpo import _forward

    torch.manual_seed(0)
    vocab = 11
    emb = torch.nn.Embedding(vocab, vocab)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = emb

        def forward(self, input_ids, attention_mask, position_ids):
            return SimpleNamespace(logits=self.emb(input_ids))

    seqs = [[1, 2, 3, 4], [5, 6, 7]]
    _, sums, counts = _forward(LM(), seqs, [2, 1], pad_id=0)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    labels = torch.where(torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]) == 1, ids, -100)
    logits = emb(ids)
    want = torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    assert torch.allclose(chosen_nll(sums, counts), want, atol=1e-6)


def test_orpo_on_real_pairs_lowers_held_out_loss(tmp_path, tiny_causal_lm_dir, hh_subset):
    from refinery.tasks.align.stage import ORPOStageConfig, orpo_stage

    cfg = ORPOStageConfig(model=str(tiny_causal_lm_dir), data=str(hh_subset), max_pairs=200, val_fraction=0.2,
                          train=ORPOConfig(lr=1e-3, beta=0.5, batch_size=16, max_prompt_len=32, max_len=96))
    ds = orpo_stage.run(tmp_path, [], cfg)
    m = ds.manifest["metrics"]
    assert m["held_out_loss"] < m["held_out_loss_before"], m
    assert ds.manifest["method"] == "orpo" and ds.manifest["counts"]["steps"] == 10
    print(f"ORPO HH subset: held-out loss {m['held_out_loss_before']:.4f} -> {m['held_out_loss']:.4f}, "
          f"accuracy {m['held_out_accuracy_before']:.3f} -> {m['held_out_accuracy']:.3f}")
