"""KTO: the loss against TRL's KTOTrainer on the same batch, the unpaired data format, and a run on
the real KTO demo file whose held-out loss falls."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from refinery.tasks.align.kto import KTOConfig, kto_loss


def _trl_kto_loss(logps, ref, kl_logps, ref_kl, labels, beta, dw, uw):
    """TRL 1.16's KTOTrainer._compute_loss (loss_type="kto", precomputed reference log-probs) run
    as is, with the model's output replaced by per-token log-probs whose sums are ``logps``."""
    from trl.trainer.kto_trainer import KTOTrainer

    B, T = len(logps), 4
    per_tok = (logps / (T - 1))[:, None].expand(B, T - 1)   # sums back to logps
    outputs = SimpleNamespace(log_probs=per_tok, entropy=torch.zeros(B, T - 1), mean_logits=torch.zeros(B, T - 1),
                              aux_loss=None)
    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, calculate_KL=True,
                           _compute_kl_logps=lambda model, batch: kl_logps, aux_loss_enabled=False,
                           precompute_ref_logps=True, loss_type="kto", beta=beta, desirable_weight=dw,
                           undesirable_weight=uw, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T, dtype=torch.long),
             "completion_mask": torch.ones(B, T, dtype=torch.long), "label": labels.long(),
             "ref_logps": ref, "ref_KL_logps": ref_kl}
    return KTOTrainer._compute_loss(fake, lambda **kw: outputs, batch, return_outputs=False)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.8)])
def test_kto_loss_equals_trl(weights):
    g = torch.Generator().manual_seed(0)
    B = 8
    ref = -10 - 5 * torch.rand(B, generator=g)
    logps = ref + 3 * torch.randn(B, generator=g)
    ref_kl = -12 - 5 * torch.rand(B, generator=g)
    kl = ref_kl + 2 + torch.randn(B, generator=g)        # z0 > 0
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    ours, z0, _ = kto_loss(logps, ref, kl, ref_kl, labels, 0.1, *weights)
    theirs = _trl_kto_loss(logps, ref, kl, ref_kl, labels, 0.1, *weights)
    assert z0 > 0 and torch.allclose(ours, theirs, atol=1e-6), (ours.item(), theirs.item())
    # a KL estimate below zero is clamped to 0 in both
    ours0, z00, _ = kto_loss(logps, ref, ref_kl - 1, ref_kl, labels, 0.1, *weights)
    assert z00 == 0 and torch.allclose(ours0, _trl_kto_loss(logps, ref, ref_kl - 1, ref_kl, labels, 0.1, *weights), atol=1e-6)


def test_unpaired_formats_and_bad_records(tmp_path):
    import json

    from refinery.tasks.align.data import load_unpaired

    f = tmp_path / "kto.jsonl"
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "label": True},
            {"prompt": "q?", "completion": "a.", "label": False},
            {"prompt": "q?", "completion": "a.", "label": "maybe"},
            {"messages": [{"role": "user", "content": "hi"}], "label": True},
            {"prompt": "q?", "completion": "a."}]
    f.write_text("\n".join(json.dumps(r) for r in recs))
    ex, counts = load_unpaired(f)
    assert [(e.prompt, e.completion, e.label) for e in ex] == [((("user", "hi"),), "hello", True),
                                                                ((("user", "q?"),), "a.", False)]
    assert counts["skipped"] == {"bad_label": 1, "no_reply": 1, "no_label": 1} and counts["desirable"] == 1


def test_kto_on_real_demo_file_lowers_held_out_loss(tmp_path, tiny_causal_lm_dir, shared_data):
    from refinery_testlib import shared_file

    from refinery.tasks.align.stage import KTOStageConfig, kto_stage

    data = shared_file(shared_data, "preference/kto_en_demo.json")
    cfg = KTOStageConfig(model=str(tiny_causal_lm_dir), data=str(data), max_examples=160, val_fraction=0.2,
                         train=KTOConfig(lr=1e-3, batch_size=8, epochs=2, max_prompt_len=32, max_len=96))
    ds = kto_stage.run(tmp_path, [], cfg)
    m, s = ds.manifest["metrics"], ds.manifest["stats"]
    assert ds.manifest["counts"]["examples_held_out"] == 32 and ds.manifest["counts"]["desirable"] > 40
    # before training the policy is the reference: every implicit reward 0, loss 0.5 per example
    assert s["held_out_before"]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert m["held_out_loss"] < m["held_out_loss_before"], m
    assert s["held_out_after"]["margin"] > 0   # desirable replies gained on undesirable ones, unseen examples
    print(f"KTO demo: held-out loss {m['held_out_loss_before']:.4f} -> {m['held_out_loss']:.4f}, "
          f"reward margin {s['held_out_after']['margin']:.3f}, sign accuracy {s['held_out_after']['accuracy']:.3f}")
