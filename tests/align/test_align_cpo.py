"""CPO and SimPO (reference-free): the whole objective of a batch against TRL 1.16's CPOTrainer
(its own ``get_batch_loss_metrics``: forward, reply log-probs summed or averaged, ``cpo_loss`` and
the NLL term, run as is on a small model), and runs on real pairs whose held-out loss falls."""
from __future__ import annotations

import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from refinery.tasks.align.cpo import (LOSS_TYPES, CPOConfig, SimPOConfig, chosen_nll, pair_logps, pair_loss)
from refinery.tasks.align.dpo import reply_logps

VOCAB, PAD = 13, 0


class _LM(torch.nn.Module):
    """Logits from an embedding of the token and its predecessor (so every position differs)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g))
        self.b = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, **_):
        prev = torch.cat([input_ids[:, :1], input_ids[:, :-1]], 1)
        return SimpleNamespace(logits=self.a[input_ids] + 0.5 * self.b[prev])


def _pairs(B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(B):
        p = torch.randint(1, VOCAB, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(1, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(1, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        out.append((p, c, r))
    return out


def _side(pairs, which):
    """TRL's tokenized side: input ids right-padded, labels -100 over the prompt and the padding."""
    seqs = [p + (c if which == "chosen" else r) for p, c, r in pairs]
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), PAD)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    labels = torch.full((len(seqs), n), -100)
    for i, ((p, _, _), s) in enumerate(zip(pairs, seqs)):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        labels[i, len(p):len(s)] = torch.tensor(s[len(p):])
    return {f"{which}_input_ids": ids, f"{which}_attention_mask": mask, f"{which}_labels": labels}


def _trl_objective(model, pairs, loss_type, beta, label_smoothing, gamma, alpha):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(is_encoder_decoder=False, pad_token_id=PAD, accelerator=acc, aux_loss_enabled=False,
                           cpo_alpha=alpha, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                           simpo_gamma=gamma, alpha=0.0, concatenated_inputs=CPOTrainer.concatenated_inputs,
                           get_batch_logps=CPOTrainer.get_batch_logps)
    fake.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, fake)
    fake.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, fake)
    batch = {**_side(pairs, "chosen"), **_side(pairs, "rejected")}
    loss, metrics = CPOTrainer.get_batch_loss_metrics(fake, model, batch)
    return loss, metrics


def _our_objective(model, pairs, cfg):
    spec = cfg.pair_loss()
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    plens = [len(p) for p, _, _ in pairs] * 2
    sums, lens = reply_logps(model, seqs, plens, PAD)
    n = len(pairs)
    lp = pair_logps(sums, lens, spec.loss_type)
    per_pair, rc, rr = pair_loss(lp[:n], lp[n:], spec)
    return per_pair.mean() + spec.cpo_alpha * chosen_nll(sums[:n], lens[:n]), (rc - rr).mean()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_cpo_objective_equals_trl(loss_type, alpha):
    """Loss, reward margin and gradients of every CPO loss type, with and without the NLL term."""
    smoothing = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    cfg = CPOConfig(loss_type=loss_type, beta=0.7, cpo_alpha=alpha, simpo_gamma=0.3, label_smoothing=smoothing)
    pairs = _pairs()
    m1, m2 = _LM(), _LM()
    ours, margin = _our_objective(m1, pairs, cfg)
    theirs, metrics = _trl_objective(m2, pairs, loss_type, 0.7, smoothing, 0.3, alpha)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours.item(), theirs.item())
    assert margin.item() == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    ours.backward()
    theirs.backward()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-5)


def test_simpo_is_trls_cpo_simpo_without_nll_and_knobs_are_checked():
    pairs = _pairs(seed=2)
    cfg = SimPOConfig(beta=2.5, gamma=1.2)
    assert cfg.pair_loss().loss_type == "simpo" and cfg.pair_loss().cpo_alpha == 0.0
    ours, _ = _our_objective(_LM(), pairs, cfg)
    theirs, _ = _trl_objective(_LM(), pairs, "simpo", 2.5, 0.0, 1.2, 0.0)
    assert torch.allclose(ours, theirs, atol=1e-5)
    with pytest.raises(ValueError, match="label_smoothing.*hinge does not use it"):
        CPOConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="gamma"):
        SimPOConfig(gamma=-1)
    with pytest.raises(ValueError, match="simpo_gamma"):   # strict: CPO's names stay CPO's
        SimPOConfig(simpo_gamma=1.0)


def test_cpo_stage_on_real_pairs_lowers_held_out_loss(tmp_path, tiny_causal_lm_dir, hh_subset):
    """method=cpo end to end on real HH pairs: held-out loss falls, the model is published."""
    from refinery.tasks.align.stage import CPOStageConfig, cpo_stage

    train = {"lr": 1e-3, "batch_size": 12, "max_prompt_len": 32, "max_len": 64, "eval_every": 5, "device": "cpu"}
    cfg = CPOStageConfig(model=str(tiny_causal_lm_dir), data=str(hh_subset), max_pairs=80, val_fraction=0.25, train=train)
    ds = cpo_stage.run(tmp_path, [], cfg)
    m = ds.manifest["metrics"]
    assert ds.manifest["method"] == "cpo" and ds.manifest["counts"]["steps"] == 5
    assert m["held_out_loss"] < m["held_out_loss_before"], m
    assert (Path(ds.path) / ds.manifest["model"] / "model.safetensors").is_file()
    print(f"CPO HH subset: held-out loss {m['held_out_loss_before']:.4f} -> {m['held_out_loss']:.4f}")


def test_simpo_lowers_its_loss_and_widens_the_margin_on_its_pairs(tiny_causal_lm_dir, hh_subset):
    """SimPO's optimisation (the stage runs the same code as CPO's): on the pairs it trains on,
    the loss falls and the length-normalised reward margin grows."""
    from refinery.tasks.align.cpo import train_simpo
    from refinery.tasks.align.data import load_pairs

    pairs, _ = load_pairs(hh_subset, 48)
    cfg = SimPOConfig(lr=1e-3, batch_size=12, epochs=2, max_prompt_len=32, max_len=64, device="cpu")
    res = train_simpo(str(tiny_causal_lm_dir), pairs, pairs[:24], cfg, seed=0)
    before, after = res.stats["held_out_before"], res.stats["held_out_after"]
    assert res.stats["steps"] == 8 and res.stats["loss_type"] == "simpo"
    assert after["loss"] < before["loss"] and after["margin"] > before["margin"], (before, after)


def test_align_help_lists_every_loss_type_with_its_line():
    """``refinery run align --help`` (generated from the config models): each loss type of DPO,
    GRPO and CPO, and each reward scaling, on a line of its own with its description."""
    from refinery.flows.align import AlignParams
    from refinery.flows.helptext import params_help
    from refinery.tasks.align import dpo, grpo

    text = params_help(AlignParams, width=200)
    for section, choices in (("dpo", dpo.LOSS_TYPES), ("grpo", grpo.LOSS_TYPES), ("grpo", grpo.SCALES),
                             ("cpo", LOSS_TYPES)):
        for name, line in choices.items():
            assert f"        {name}: {line}" in text.splitlines(), (section, name)
    assert "method: ppo|dpo|grpo|rloo|online_dpo|kto|orpo|cpo|simpo, default dpo" in text
    assert "  rloo.normalize_advantages: bool, default false" in text and "  online_dpo.skip_ties: bool, default false" in text
    assert "  simpo.gamma: float, default 1.0" in text and "  grpo.dynamic_sampling: bool, default false" in text


def test_align_flow_settings_reach_the_new_stage_configs(tmp_path):
    """The align flow's cpo/simpo sections become the stage configs; the loss knobs of dpo and
    grpo come through; unknown keys and contradicting knobs fail at validation."""
    from pydantic import ValidationError

    from refinery.flows.align import AlignParams, cpo_config, dpo_config, grpo_config, simpo_config

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    p = AlignParams(input="m", data=str(data), method="simpo", max_pairs=9, simpo={"beta": 2.5, "gamma": 1.4, "max_steps": 3},
                    cpo={"loss_type": "simpo", "cpo_alpha": 0.5}, dpo={"loss_type": "ipo", "rpo_alpha": 0.2},
                    grpo={"loss_type": "dapo", "beta": 0, "clip_range_high": 0.28, "dynamic_sampling": True})
    s, c = simpo_config(p), cpo_config(p)
    assert (s.max_pairs, s.train.beta, s.train.gamma, s.train.max_steps) == (9, 2.5, 1.4, 3)
    assert (c.train.loss_type, c.train.cpo_alpha, c.train.beta) == ("simpo", 0.5, 0.1)
    assert (dpo_config(p).train.loss_type, dpo_config(p).train.rpo_alpha) == ("ipo", 0.2)
    g = grpo_config(p).train
    assert (g.loss_type, g.beta, g.clip_range_high, g.dynamic_sampling, g.reward_scaling) == ("dapo", 0.0, 0.28, True, "group")
    for bad in ({"simpo": {"cpo_alpha": 1.0}}, {"cpo": {"gamma": 1.0}}, {"dpo": {"loss_type": "simpo"}},
                {"grpo": {"loss_type": "dr_grpo", "scale_rewards": "batch"}}, {"method": "reinforce"}):
        with pytest.raises(ValidationError):
            AlignParams(input="m", data="d", **bad)
