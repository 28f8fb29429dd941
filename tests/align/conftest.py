"""Fixtures for the alignment tests: a real HH-RLHF subset with learnable signal, trained stages."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from refinery_testlib import shared_file

HH = "preference/hh-rlhf-harmless-base-test.jsonl.gz"
DPO_EN = "preference/dpo_en_demo.json"


def _reply(transcript: str) -> str:
    return transcript[transcript.rfind("\n\nAssistant:") + len("\n\nAssistant:"):]


@pytest.fixture(scope="session")
def hh_path(shared_data) -> Path:
    return shared_file(shared_data, HH)


@pytest.fixture(scope="session")
def dpo_en_path(shared_data) -> Path:
    return shared_file(shared_data, DPO_EN)


@pytest.fixture(scope="session")
def hh_subset(hh_path, tmp_path_factory) -> Path:
    """600 real HH-RLHF harmless pairs whose two replies differ in length by 3x or more (a choice
    that does not look at which one is chosen, so held-out accuracy stays honest; in these pairs
    the harmless reply tends to be the shorter, a signal a tiny random model can pick up), written
    unchanged as .jsonl.gz so the tests read them through the file path like any user."""
    out = tmp_path_factory.mktemp("hh") / "hh-length-subset.jsonl.gz"
    kept = []
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            a, b = len(_reply(rec["chosen"]).strip()), len(_reply(rec["rejected"]).strip())
            if min(a, b) > 0 and max(a, b) >= 3 * min(a, b):
                kept.append(line)
            if len(kept) == 620:  # a few are skipped by the loader (e.g. differing prompts)
                break
    with gzip.open(out, "wt", encoding="utf-8") as f:
        f.writelines(kept)
    return out


@pytest.fixture(scope="session")
def align_store(tmp_path_factory):
    from refinery.tasks.store import Store

    return Store(tmp_path_factory.mktemp("align_store"))


@pytest.fixture(scope="session")
def trained_reward(align_store, tiny_causal_lm_dir, hh_subset):
    """The reward stage trained on the real HH subset (used by the reward and PPO tests)."""
    from refinery.tasks.align.reward import RewardConfig
    from refinery.tasks.align.stage import RewardStageConfig, reward_stage

    cfg = RewardStageConfig(model=str(tiny_causal_lm_dir), data=str(hh_subset), max_pairs=600, val_fraction=0.25,
                            train=RewardConfig(lr=1e-3, head_lr=1e-3, epochs=2, batch_size=16, max_prompt_len=32, max_len=128))
    return reward_stage.run(align_store, [], cfg)
