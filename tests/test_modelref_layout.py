"""Where a training dataset keeps its model (ARCHITECTURE.md section 6, README "Where the model is"):
the manifest key ``model`` names the complete model, ``adapter`` a PEFT adapter; older datasets
resolve through ``merged`` and the conventional folders; an adapter-only dataset is refused by name.
The demo's real datasets are checked in tests/flows/test_readme_commands.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from refinery.flows.console import describe
from refinery.tasks.modelref import resolve_model
from refinery.tasks.store import Store

CONFIG = b'{"model_type": "llama"}'


def publish(root: Path, files: list[str], stage: str = "finetune", **extra) -> Path:
    b = Store(root).builder(stage, "fp1")
    for f in files:
        b.write_bytes(f, CONFIG if f.endswith("config.json") else b"{}")
    return Path(b.publish(version="1", config={}, inputs=[], extra=extra).path)


def test_the_model_key_names_the_model_whatever_else_the_dataset_holds(tmp_path):
    ds = publish(tmp_path / "a", ["merged/config.json", "final/config.json", "config.json"],
                 model="final", merged="merged")
    assert resolve_model(ds) == str(ds / "final")
    top = publish(tmp_path / "b", ["config.json", "merged/config.json"], stage="pretrain", model=".")
    assert resolve_model(top) == str(top)


def test_datasets_written_before_the_key_still_resolve(tmp_path):
    assert resolve_model(d := publish(tmp_path / "a", ["merged/config.json"], merged="merged")) == str(d / "merged")
    assert resolve_model(d := publish(tmp_path / "b", ["model/config.json"], stage="dpo")) == str(d / "model")
    assert resolve_model(d := publish(tmp_path / "c", ["config.json"], stage="pretrain")) == str(d)


def test_an_adapter_only_dataset_is_refused_by_name(tmp_path):
    ds = publish(tmp_path / "a", ["adapter/adapter_config.json"], adapter="adapter", method="prompt_tuning",
                 base_model="/models/base")
    with pytest.raises(ValueError) as e:
        resolve_model(ds)
    msg = str(e.value)
    assert "holds only a PEFT adapter (adapter/)" in msg and "'prompt_tuning'" in msg and "/models/base" in msg
    assert describe(e.value) is not None   # the command prints a short block, not a traceback


def test_a_dataset_without_a_model_says_so(tmp_path):
    ds = publish(tmp_path / "a", ["part-00000.train.parquet"], stage="dedup")
    with pytest.raises(ValueError, match="stage 'dedup'.*holds no model.*names no model folder") as e:
        resolve_model(ds)
    assert describe(e.value) is not None


@pytest.mark.parametrize("flow, param", [("finetune", "input"), ("align", "input"), ("evaluate", "input"),
                                         ("evaluate", "baseline"), ("evaluate", "judge"), ("pretrain", "init_from")])
def test_the_cli_checks_that_a_dataset_given_as_a_model_holds_one(tmp_path, flow, param):
    """Before anything starts (and with --print-config): a documents dataset or an adapter-only one
    is named as no model; a training dataset, old layout or new, passes."""
    from refinery.flows.paths import PathProblem, preflight

    docs = publish(tmp_path / "a", ["part-00000.train.parquet"], stage="dedup")
    adapter = publish(tmp_path / "b", ["adapter/adapter_config.json"], adapter="adapter", method="prefix_tuning")
    with pytest.raises(PathProblem, match=f"^{param}: .*is a dedup dataset, not a model"):
        preflight(flow, {param: str(docs)})
    with pytest.raises(PathProblem, match=f"^{param}: .*holds only a PEFT adapter"):
        preflight(flow, {param: str(adapter)})
    for ok in (publish(tmp_path / "c", ["merged/config.json"], merged="merged"),
               publish(tmp_path / "d", ["config.json"], stage="pretrain"),
               publish(tmp_path / "e", ["config.json"], stage="pretrain", model=".")):
        preflight(flow, {param: str(ok)})


def test_a_tokenizer_dataset_still_passes_as_a_tokenizer(tmp_path):
    from refinery.flows.paths import preflight

    tok = publish(tmp_path / "t", ["tokenizer.json"], stage="tokenizer")
    preflight("tokenize", {"tokenizer": {"path": str(tok)}})
    preflight("finetune", {"tokenizer": str(tok)})


def test_a_judge_endpoint_is_not_a_path_and_a_missing_judge_folder_fails_early(tmp_path):
    from refinery.flows.paths import PathProblem, preflight

    preflight("evaluate", {"judge": "http://127.0.0.1:8000/v1", "baseline": "org/model"})
    with pytest.raises(PathProblem, match="^judge: no such model folder"):
        preflight("evaluate", {"judge": str(tmp_path / "nope")})
