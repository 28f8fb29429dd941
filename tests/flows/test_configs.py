"""Every YAML in configs/ validates against its flow's parameter model."""
from pathlib import Path

import pytest

from refinery.flows.cli import build_params, load_flow

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FLOW_OF = {"demo.yaml": "demo", "cc-snapshot.yaml": "curate", "pretrain-124m.yaml": "pretrain",
           "lora.yaml": "finetune", "align-ppo.yaml": "align", "ablate-demo.yaml": "ablate",
           "align-grpo.yaml": "align", "align-kto.yaml": "align"}


@pytest.mark.parametrize("name", sorted(FLOW_OF))
def test_config_validates(name):
    flow = load_flow(FLOW_OF[name])
    sets = [] if name in ("demo.yaml", "cc-snapshot.yaml", "ablate-demo.yaml") else ["input=x", "data=y.json"]
    if FLOW_OF[name] == "pretrain":
        sets = ["input=x"]
    build_params(flow, str(CONFIGS / name), sets, None)


def test_every_config_is_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(FLOW_OF)
