"""Resume takes the newest *intact* checkpoint: a truncated newest one is moved aside with a
warning and training resumes, exactly, from the one before."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))   # the training tests' fixtures

from train_fixtures import (cfg_for, corpus_texts, corpus_tokens, losses, readers, run,  # noqa: E402,F401
                            train_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_model():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture
def three_checkpoints(tmp_path, tiny_model) -> Path:
    from refinery.tasks.train.checkpoint import save_checkpoint

    root = tmp_path / "ck"
    for step in (10, 20, 30):
        save_checkpoint(root, step, tiny_model, None, {"step": step, "payload": list(range(200))})
    return root


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer_state.pt", "config.json"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous(three_checkpoints, caplog, victim):
    from refinery.tasks.train.checkpoint import latest_checkpoint, list_checkpoints, load_state

    truncate(three_checkpoints / "step-00000030" / victim)
    with caplog.at_level(logging.WARNING, logger="refinery.train.checkpoint"):
        ck = latest_checkpoint(three_checkpoints)
    assert ck.name == "step-00000020" and load_state(ck)["step"] == 20
    assert victim in caplog.text and "falling back to step-00000020" in caplog.text
    damaged = list(three_checkpoints.glob(".damaged-step-00000030-*"))
    assert len(damaged) == 1 and damaged[0].name in caplog.text          # kept for inspection
    assert [s for s, _ in list_checkpoints(three_checkpoints)] == [10, 20]   # out of prune's way


def test_checkpoint_without_size_record_is_still_checked(three_checkpoints):
    """Checkpoints of older versions (no files.json): the state's zip directory and the
    safetensors header are checked."""
    from refinery.tasks.train.checkpoint import checkpoint_problems, latest_checkpoint

    for step in ("step-00000020", "step-00000030"):
        (three_checkpoints / step / "files.json").unlink()
    assert checkpoint_problems(three_checkpoints / "step-00000030") == []
    truncate(three_checkpoints / "step-00000030" / "model.safetensors", 0.9)
    truncate(three_checkpoints / "step-00000020" / "trainer_state.pt", 0.9)
    assert latest_checkpoint(three_checkpoints).name == "step-00000010"


def test_all_damaged_means_a_fresh_start(three_checkpoints):
    from refinery.tasks.train.checkpoint import latest_checkpoint

    for ck in three_checkpoints.glob("step-*"):
        truncate(ck / "trainer_state.pt")
    assert latest_checkpoint(three_checkpoints) is None


def test_checkpoint_records_sizes_and_leaves_no_temporary_folder(three_checkpoints):
    ck = three_checkpoints / "step-00000030"
    sizes = json.loads((ck / "files.json").read_text())["files"]
    assert {"model.safetensors", "trainer_state.pt", "config.json"} <= set(sizes)
    assert all((ck / n).stat().st_size == b for n, b in sizes.items())
    assert not [p for p in three_checkpoints.iterdir() if p.name.startswith(".")]


def test_training_resumes_exactly_from_the_previous_checkpoint(readers, tmp_path, caplog):
    """The loop itself: stop at step 5 (checkpoints at 4 and 5), truncate step 5's weights, rerun:
    it resumes from step 4 and every later loss equals an uninterrupted run's."""
    cfg = cfg_for(objective="clm", max_steps=8, eval_every=4, batch_size=4)
    full = run(cfg, readers, tmp_path / "full")
    first = run(cfg, readers, tmp_path / "resumed", stop_after=5)
    assert first["status"] == "stopped" and first["steps"] == 5
    ck = tmp_path / "resumed"
    assert (ck / "step-00000004").is_dir() and (ck / "step-00000005").is_dir()
    truncate(ck / "step-00000005" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="refinery.train.checkpoint"):
        second = run(cfg, readers, ck)
    assert "falling back to step-00000004" in caplog.text
    assert second["status"] == "done" and second["steps"] == 8
    a, b = losses(full), losses(second)
    for step in range(5, 9):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
