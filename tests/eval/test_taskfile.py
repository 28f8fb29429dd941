"""Local task files under lm-eval's own command line, from another working directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from refinery.tasks.eval.harness import resolve_tasks
from refinery.tasks.eval.taskfile import main, write_task_file

ROOT = Path(__file__).resolve().parents[2]
EVAL_CONFIGS = ROOT / "configs" / "eval"
LM_EVAL = str(Path(sys.executable).parent / "lm_eval")


def test_shipped_task_files_keep_relative_data_paths_and_no_code():
    for path in sorted(EVAL_CONFIGS.glob("*.yaml")):
        text = path.read_text()
        assert "!function" not in text and "include:" not in text, path
        files = yaml.safe_load(text)["dataset_kwargs"]["data_files"]
        assert all(not os.path.isabs(f) for f in files.values()), path   # the folder can move


def test_the_copy_names_the_data_by_absolute_path_and_loads_the_same(tmp_path):
    out = write_task_file(EVAL_CONFIGS / "mc_local.yaml", tmp_path / "tasks")
    assert out == tmp_path / "tasks" / "mc_local.yaml"
    cfg = yaml.safe_load(out.read_text())
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str((EVAL_CONFIGS / "mc_local.jsonl").resolve())}
    (orig,) = resolve_tasks([str(EVAL_CONFIGS / "mc_local.yaml")])
    (copy,) = resolve_tasks([str(out)])            # refinery's loader reads the copy too: same task
    assert copy.config == orig.config and copy.data_sha256 == orig.data_sha256
    # data_files overrides apply; a task without its data, or with code, is refused as by evaluate
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    gsm = write_task_file(EVAL_CONFIGS / "gsm8k_local.yaml", tmp_path / "tasks", {"gsm8k_local": str(data)})
    assert yaml.safe_load(gsm.read_text())["dataset_kwargs"]["data_files"] == {"test": str(data.resolve())}
    with pytest.raises(ValueError, match="data_files.gsm8k_local=PATH"):
        write_task_file(EVAL_CONFIGS / "gsm8k_local.yaml", tmp_path / "other")
    bad = tmp_path / "bad.yaml"
    bad.write_text((EVAL_CONFIGS / "mc_local.yaml").read_text().replace("{{question}}", "{{ x.__class__ }}"))
    with pytest.raises(ValueError, match="never code"):
        write_task_file(bad, tmp_path / "other")
    with pytest.raises(ValueError, match="replace the original"):
        write_task_file(out, tmp_path / "tasks")


def test_the_module_cli(tmp_path, capsys):
    assert main([str(EVAL_CONFIGS / "mc_local.yaml"), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "mc_local.yaml")
    assert main([str(EVAL_CONFIGS / "gsm8k_local.yaml"), "--out", str(tmp_path)]) == 2
    assert "data_files.gsm8k_local=PATH" in capsys.readouterr().err


def test_lm_eval_cli_runs_the_task_from_another_folder(tmp_path, tiny_causal_lm_dir):
    out = write_task_file(EVAL_CONFIGS / "mc_local.yaml", tmp_path / "tasks")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    proc = subprocess.run(
        [LM_EVAL, "--model", "hf", "--model_args", f"pretrained={tiny_causal_lm_dir}", "--tasks", str(out),
         "--limit", "2", "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "results")],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "results").rglob("results_*.json")
    res = json.loads(result.read_text())
    assert res["n-samples"]["mc_local"]["effective"] == 2
    assert {"acc,none", "acc_norm,none"} <= set(res["results"]["mc_local"])
