"""The deploy-time check of the triggers (refinery.flows.deploy), on deployments/prefect.yaml and on
definitions made to fail, without a server (tests/ops/test_deployments.py runs it in `prefect deploy`)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from refinery.flows import deploy
from refinery.flows.deploy import TriggerParameterError, check_triggers, load_deployment, trigger_problems

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
ENV = {"REFINERY_WORKDIR": "/shared/refinery", "REFINERY_CRAWL_INPUT": "", "REFINERY_SFT_DATA": "/shared/sft.json"}


def _triggered() -> list[str]:
    from refinery.flows.common import FLOWS

    flow_of = {entry: name for name, entry in FLOWS.items()}
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return [f"{flow_of[d['entrypoint']]}/{d['name']}" for d in spec["deployments"] if d.get("triggers")]


def test_every_triggered_deployment_is_checked_and_listens_to_runs_of_their_own():
    """A triggered deployment without the build step would go unchecked; a trigger without the
    subflow label would fire on the demo's and the pipeline's subflows."""
    triggered = _triggered()
    assert set(triggered) == {"tokenize/default", "finetune/default", "evaluate/default"}
    for name in triggered:
        d = load_deployment(PREFECT_YAML, name)
        assert d["build"] == [{"refinery.flows.deploy.check_triggers": {"deployment": name}}], name
        for t in d["triggers"]:
            assert t["match"]["refinery.subflow"] == "false", name


def test_the_project_deployments_pass_with_their_variables_set():
    for name in _triggered():
        assert trigger_problems(load_deployment(PREFECT_YAML, name), name, ENV) == [], name


def test_empty_or_unset_instruction_data_refuses_finetune():
    d = load_deployment(PREFECT_YAML, "finetune/default")
    (empty,) = trigger_problems(d, "finetune/default", {**ENV, "REFINERY_SFT_DATA": " "})
    assert empty.startswith("trigger 1 (on refinery.pretrain.completed) gives an empty `data`, a required parameter of finetune")
    assert "$REFINERY_SFT_DATA is empty" in empty
    unset = {k: v for k, v in ENV.items() if k != "REFINERY_SFT_DATA"}
    assert trigger_problems(d, "finetune/default", unset) == [
        "trigger 1 (on refinery.pretrain.completed) gives `data` from $REFINERY_SFT_DATA, which is not set in this environment"]
    # an unset storage root would reach the runs as the text "{{ $REFINERY_WORKDIR }}"
    no_root = {k: v for k, v in ENV.items() if k != "REFINERY_WORKDIR"}
    problems = trigger_problems(load_deployment(PREFECT_YAML, "tokenize/default"), "tokenize/default", no_root)
    assert "its parameter `workdir` reads $REFINERY_WORKDIR, which is not set in this environment" in problems


def test_missing_unknown_and_supplied_by_the_deployment():
    trigger = {"type": "event", "expect": ["refinery.pretrain.completed"], "parameters": {"input": "{{ event.payload.output }}"}}
    missing = trigger_problems({"triggers": [trigger]}, "finetune/default", ENV)
    assert len(missing) == 1 and missing[0].startswith("trigger 1 (on refinery.pretrain.completed) gives no `data`, "
                                                       "a required parameter of finetune (")
    # the deployment's own parameters fill in what the trigger leaves out
    assert trigger_problems({"parameters": {"data": "/d.json"}, "triggers": [trigger]}, "finetune/default", ENV) == []
    typo = {**trigger, "parameters": {"input": "{{ event.payload.output }}", "dataset": "/d.json"}}
    problems = trigger_problems({"parameters": {"data": "/d.json"}, "triggers": [typo]}, "finetune/default", ENV)
    assert len(problems) == 1 and "gives `dataset`, which finetune has no parameter for" in problems[0]
    # a disabled trigger starts nothing
    assert trigger_problems({"triggers": [{**trigger, "enabled": False}]}, "finetune/default", ENV) == []


def test_the_step_reads_the_prefect_file_of_the_deploy_command(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML)])
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    assert check_triggers("finetune/default") == {}
    monkeypatch.setenv("REFINERY_SFT_DATA", "")
    with pytest.raises(TriggerParameterError, match=r"refusing to deploy finetune/default \(from .*prefect.yaml\).*\n"
                                                    r"  - trigger 1 .* empty `data`"):
        check_triggers("finetune/default")
    monkeypatch.setattr(sys, "argv", ["prefect", "deploy", f"--prefect-file={tmp_path / 'nope.yaml'}"])
    with pytest.raises(TriggerParameterError, match="cannot read the prefect file"):
        check_triggers("finetune/default")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prefect", "deploy", "--all"])
    assert deploy._prefect_file_of_this_command() == Path("prefect.yaml")   # Prefect's own default
    with pytest.raises(TriggerParameterError, match="no deployment finetune/default"):
        check_triggers("finetune/default", prefect_file=str(ROOT / "docker" / "compose.yaml"))
