"""The align flow: flat shortcuts -> stage configs, and the CLI acceptance run (PPO trains its
reward model first, then the policy; reward/KL land in the manifests and the JSON line)."""
from __future__ import annotations

import json
from pathlib import Path

from refinery.flows.align import AlignParams, dpo_config, ppo_config, reward_config


def test_flat_shortcuts_override_nested_configs():
    p = AlignParams(input="m", data="d.jsonl", method="ppo", max_steps=7, kl_coef=0.3, clip_range=0.1,
                    rollout_batch_size=6, mini_batch_size=3, max_new_tokens=5, temperature=0.7, top_k=9,
                    batch_size=4, lora=True, reward_max_steps=2, seed=5, max_pairs=10, ppo={"ppo_epochs": 3})
    pc = ppo_config(p, "rm").train
    assert (pc.steps, pc.kl_coef, pc.clip_range, pc.rollout_batch_size, pc.mini_batch_size) == (7, 0.3, 0.1, 6, 3)
    assert (pc.max_new_tokens, pc.temperature, pc.top_k, pc.ppo_epochs, pc.lora.enabled) == (5, 0.7, 9, 3, True)
    rc = reward_config(p)
    assert (rc.train.max_steps, rc.train.batch_size, rc.train.lora.enabled, rc.seed, rc.max_pairs) == (2, 4, True, 5, 10)
    d = dpo_config(AlignParams(input="m", data="d.jsonl", beta=0.5, max_steps=3, lr=1e-4))
    assert (d.train.beta, d.train.max_steps, d.train.lr, d.train.lora.enabled) == (0.5, 3, 1e-4, False)
    # unset shortcuts leave the nested defaults alone
    assert dpo_config(AlignParams(input="m", data="d", dpo={"beta": 0.2})).train.beta == 0.2


def test_cli_ppo_trains_reward_model_then_policy(tmp_path, tiny_causal_lm_dir, hh_path, capsys):
    """``refinery run align ... --json`` (in-process, so the Prefect server is shared with other tests)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from refinery.flows.cli import main

    work = tmp_path / "work"
    argv = ["run", "align", "--workdir", str(work), "--json",
           "--set", f"input={tiny_causal_lm_dir}", "--set", f"data={hh_path}", "--set", "method=ppo",
           "--set", "max_steps=2", "--set", "max_pairs=48", "--set", "reward_max_steps=3", "--set", "batch_size=8",
           "--set", "rollout_batch_size=4", "--set", "mini_batch_size=2", "--set", "max_new_tokens=6",
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
