"""The align flow: nested trainer configs -> stage configs (no flat shortcuts; unknown nested keys
fail), and the CLI acceptance run (PPO trains its reward model first, then the policy; reward/KL
land in the manifests and the JSON line)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from refinery.flows.align import AlignParams, dpo_config, ppo_config, reward_config


def test_nested_configs_become_stage_configs():
    p = AlignParams(input="m", data="d.jsonl", method="ppo", seed=5, max_pairs=10, val_fraction=0.2,
                    ppo={"max_steps": 7, "kl_coef": 0.3, "clip_range": 0.1, "batch_size": 6, "mini_batch_size": 3,
                         "max_new_tokens": 5, "temperature": 0.7, "top_k": 9, "ppo_epochs": 3,
                         "lora": {"enabled": True, "r": 4}},
                    reward={"max_steps": 2, "batch_size": 4, "lora": {"enabled": True}})
    pc = ppo_config(p, "rm").train
    assert (pc.max_steps, pc.kl_coef, pc.clip_range, pc.batch_size, pc.mini_batch_size) == (7, 0.3, 0.1, 6, 3)
    assert (pc.max_new_tokens, pc.temperature, pc.top_k, pc.ppo_epochs, pc.lora.enabled, pc.lora.r) == (5, 0.7, 9, 3, True, 4)
    rc = reward_config(p)
    assert (rc.train.max_steps, rc.train.batch_size, rc.train.lora.enabled, rc.seed, rc.max_pairs) == (2, 4, True, 5, 10)
    assert rc.val_fraction == 0.2 and ppo_config(p, "rm").seed == 5
    d = dpo_config(AlignParams(input="m", data="d.jsonl", dpo={"beta": 0.5, "max_steps": 3, "lr": 1e-4}))
    assert (d.train.beta, d.train.max_steps, d.train.lr, d.train.lora.enabled) == (0.5, 3, 1e-4, False)
    # each trainer keeps its own defaults for the shared knobs
    assert (p.dpo.lr, p.reward.lr, AlignParams(input="m", data="d").ppo.lr) == (5e-6, 2e-5, 1e-5)
    # the new layers (reward score head, PPO value head) take their own, higher rate
    assert (p.reward.resolved_head_lr(), AlignParams(input="m", data="d").ppo.resolved_head_lr()) == (1e-4, 1e-4)


def test_grpo_and_kto_settings_become_stage_configs(tmp_path):
    from refinery.flows.align import grpo_config, kto_config

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    p = AlignParams(input="m", data=str(data), method="grpo", max_pairs=7, seed=3, reward_model="rm",
                    grpo={"max_steps": 4, "num_generations": 6, "beta": 0.0, "reward_funcs": "exact_match,format",
                          "reward_weights": "1,0.25"},
                    kto={"beta": 0.3, "desirable_weight": 1.5})
    g = grpo_config(p)
    assert (g.max_prompts, g.seed, g.reward_model, g.train.max_steps, g.train.num_generations) == (7, 3, "rm", 4, 6)
    assert g.train.reward_funcs == ["exact_match", "format"] and g.train.reward_weights == [1.0, 0.25]
    k = kto_config(p)
    assert (k.max_examples, k.train.beta, k.train.desirable_weight, k.train.lr) == (7, 0.3, 1.5, 5e-6)
    from refinery.flows.align import rloo_config   # rloo: GRPO's inputs, its own settings (TRL's beta 0.05)

    r = rloo_config(AlignParams(input="m", data=str(data), method="rloo", max_pairs=7, reward_model="rm",
                                rloo={"max_steps": 3, "num_generations": 3, "normalize_advantages": True,
                                      "reward_funcs": "format"}))
    assert (r.max_prompts, r.reward_model, r.train.max_steps, r.train.num_generations) == (7, "rm", 3, 3)
    assert r.train.normalize_advantages and r.train.beta == 0.05 and r.reward_funcs_id == {"format": "builtin:format"}
    with pytest.raises(ValidationError, match="loss_type"):
        AlignParams(input="m", data="d", rloo={"loss_type": "dapo"})   # a GRPO knob RLOO does not have
    with pytest.raises(ValidationError, match="reward_weights"):
        AlignParams(input="m", data="d", grpo={"reward_funcs": ["exact_match"], "reward_weights": [1, 2]})


@pytest.mark.parametrize("bad", [{"ppo": {"kl_coeff": 0.5}}, {"dpo": {"lora": {"rank": 4}}}, {"reward": {"steps": 3}},
                                 {"max_steps": 3}, {"kl_coef": 0.1}, {"lora": True},
                                 {"online_dpo": {"num_generations": 4}}])   # a GRPO knob: online DPO samples pairs
def test_unknown_or_flat_keys_fail(bad):
    """Typos in nested configs and the old flat shortcuts are errors, not silently ignored."""
    with pytest.raises(ValidationError) as e:
        AlignParams(input="m", data="d", **bad)
    assert "Extra inputs are not permitted" in str(e.value)


def test_cli_rejects_nested_typo_before_running(tmp_path, capsys):
    from refinery.flows.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "align", "--workdir", str(tmp_path / "w"), "--set", "input=m", "--set", "data=d",
              "--set", "ppo.kl_coeff=0.5"])
    assert "kl_coeff" in str(e.value) or "kl_coeff" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_cli_ppo_trains_reward_model_then_policy(tmp_path, tiny_causal_lm_dir, hh_path, capsys):
    """``refinery run align ... --json`` (in-process, so the Prefect server is shared with other tests)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from refinery.flows.cli import main

    work = tmp_path / "work"
    argv = ["run", "align", "--workdir", str(work), "--json",
           "--set", f"input={tiny_causal_lm_dir}", "--set", f"data={hh_path}", "--set", "method=ppo",
           "--set", "ppo.max_steps=2", "--set", "max_pairs=48", "--set", "reward.max_steps=3",
           "--set", "reward.batch_size=8", "--set", "ppo.batch_size=4", "--set", "ppo.mini_batch_size=2",
           "--set", "ppo.max_new_tokens=6",
           "--set", "reward.max_len=96", "--set", "ppo.max_prompt_len=32"]
    # a loaded test machine can take longer than Prefect's default 20 s to start its temporary server
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120}):
        assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["outputs"]) == {"reward", "ppo"}
    assert out["counts"]["reward"]["steps"] == 3 and out["counts"]["ppo"]["steps"] == 2
    rm = json.loads((Path(out["outputs"]["reward"]) / "manifest.json").read_text())
    pm = json.loads((Path(out["outputs"]["ppo"]) / "manifest.json").read_text())
    assert "held_out_accuracy" in rm["metrics"] and rm["model"] == "model"
    assert pm["config"]["reward_model"] == out["outputs"]["reward"]
    assert pm["config"]["reward_model_id"] == f"dataset:reward:{rm['fingerprint']}"
    for k in ("reward_last", "kl_last", "entropy_last"):
        assert isinstance(pm["metrics"][k], float) and out["metrics"]["ppo"][k] == pm["metrics"][k]
    assert Path(out["model"], "config.json").exists() and Path(out["model"], "tokenizer.json").exists()
    # both trainers wrote the common metrics folder; the exported model keeps its history and curves
    from refinery.tasks.train.metrics import read_metrics

    for name, steps in (("reward", 3), ("ppo", 2)):
        mdir = Path(out["outputs"][name]) / "metrics"
        rows = read_metrics(mdir)
        assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, steps + 1))
        assert all({"step", "split", "seconds", "tokens", "loss"} <= set(r) for r in rows if r["split"] == "train")
        assert (mdir / "loss.png").exists() and (mdir / "curves.png").exists()
        assert list((mdir / "tensorboard").glob("events.out.tfevents.*"))
    assert read_metrics(Path(out["model"], "metrics")) == read_metrics(Path(out["outputs"]["ppo"]) / "metrics")
