"""Size presets, MFU from the per-device table, and the metric outputs (rows, PNG, TensorBoard)."""
from __future__ import annotations

import json

import pytest
import torch

from refinery.tasks.train.metrics import MetricsLog, loss_curve_png, mfu, peak_flops, summary_rows
from refinery.tasks.train.models import PRESETS, build_model, count_params, flops_per_token, model_config

SPECIAL = {"eos": 0, "pad": 1, "bos": 0, "mask": 2}


@pytest.mark.parametrize("preset,total_m", [("25M", (45, 60)), ("124M", (115, 135)), ("350M", (330, 380)),
                                            ("1B", (1100, 1300))])
def test_clm_presets_have_their_size(preset, total_m):
    vocab = 128256 if preset == "1B" else 50304
    with torch.device("meta"):   # shapes only: no memory, no time
        model = build_model("clm", preset, vocab, 1024, SPECIAL)
    assert model.config.model_type == "llama"
    lo, hi = total_m
    assert lo * 1e6 <= count_params(model) <= hi * 1e6, count_params(model)


@pytest.mark.parametrize("objective,model_type", [("clm", "llama"), ("mlm", "modernbert"), ("span", "t5")])
def test_every_objective_builds_from_config_with_sdpa(objective, model_type):
    overrides = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    cfg = model_config(objective, "tiny", 512, 64, SPECIAL, overrides)
    assert cfg.model_type == model_type
    with torch.device("meta"):
        model = build_model(objective, "tiny", 512, 64, SPECIAL, overrides)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="preset"):
        model_config(objective, "7B", 512, 64, SPECIAL)
    assert set(PRESETS) == {"tiny", "25M", "124M", "350M", "1B"}


@pytest.mark.parametrize("objective", ["clm", "mlm", "span"])
def test_flops_per_token_matches_counted_matmul_flops(objective):
    """The MFU numerator equals the matmul FLOPs PyTorch counts in a real forward + backward (eager
    attention, so the attention matmuls are counted too), the tied output projection included."""
    from torch.utils.flop_counter import FlopCounterMode

    from refinery.tasks.train.objectives import CausalLM, MaskedLM, SpanCorruption, example_lengths, step_generator

    vocab, seq_len, batch = 512, 96, 2
    overrides = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 160}
    torch.manual_seed(0)
    model = build_model(objective, "tiny", vocab, seq_len, SPECIAL, overrides, attn_implementation="eager")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    obj = {"clm": CausalLM(), "mlm": MaskedLM(2, vocab, [0, 1, 2]),
           "span": SpanCorruption(list(range(vocab - 40, vocab)), 0, 1)}[objective]
    data = obj.prepare(torch.randint(3, vocab - 40, (batch, seq_len + 1)), step_generator(0, 0, 0))
    with FlopCounterMode(display=False) as counter:
        obj.loss(model, data).backward()
    enc, dec = example_lengths(obj, seq_len)
    assert (enc, dec) == (data["input_ids"].size(1), data["labels"].size(1) if objective == "span" else 0)
    tokens = obj.tokens(data)
    assert tokens == batch * (enc + dec)
    counted = counter.get_total_flops() / tokens
    # what is left is the first layer's input gradient (never needed) and norm weights (not matmuls)
    assert flops_per_token(model, enc, dec) == pytest.approx(counted, rel=0.01)
    # leaving out the tied output projection would miss it by more than that tolerance
    no_head = flops_per_token(model, enc, dec) - 6 * vocab * 64 * (dec or enc) / (enc + dec)
    assert no_head < counted / 1.01


def test_peak_flops_table_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A10G") == 70e12 and peak_flops("NVIDIA A10") == 125e12
    assert peak_flops("NVIDIA L4") == 121e12 and peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("Some CPU") is None and peak_flops(None) is None
    assert mfu(6e9, 100_000, 989e12, n_devices=2) == pytest.approx(6e14 / (2 * 989e12))
    assert mfu(6e9, 100_000, None) is None


def test_metrics_rows_png_tensorboard(tmp_path):
    hist: list[dict] = []
    m = MetricsLog(tmp_path, hist)
    m.log({"step": 0, "val_loss": 6.0, "val_ppl": 403.4})
    for s in range(1, 6):
        m.log({"step": s, "loss": 6.0 - s * 0.2, "lr": 1e-3, "tokens_per_sec": 1000.0, "mfu": None})
    m.log({"step": 5, "val_loss": 5.1, "val_ppl": 164.0})
    m.close()
    assert hist[-1]["val_loss"] == 5.1, "the history list is shared with the caller"
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and rows[3]["loss"] == pytest.approx(5.4)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    png = loss_curve_png(hist, tmp_path / "loss.png", baseline=5.5, title="t")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    merged = summary_rows(hist)
    assert merged[-1] == {"step": 5, "loss": pytest.approx(5.0), "lr": 1e-3, "tokens_per_sec": 1000.0,
                          "val_loss": 5.1, "val_ppl": 164.0}


def test_common_row_schema_tensorboard_tags_plots_and_trackers(tmp_path, monkeypatch):
    """The one metrics path: train/val rows with step, split, seconds, tokens; TensorBoard tags
    ``<split>/<name>``; loss.png and curves.png; a report_to tracker gets the same scalars."""
    import importlib.machinery
    import sys
    import types

    from pydantic import ValidationError
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from refinery.tasks.train.config import TrainConfig
    from refinery.tasks.train.metrics import read_metrics, without_timing

    # report_to: an unknown tracker and a missing package fail when the config is read
    assert TrainConfig().report_to == []
    with pytest.raises(ValidationError):
        TrainConfig(report_to=["neptune"])
    logged = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: types.SimpleNamespace(log=lambda v, step: logged.append((step, v)), finish=lambda: None)
    if "wandb" not in sys.modules:
        with pytest.raises(ValidationError, match="wandb is not installed"):
            TrainConfig(report_to=["wandb"])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert TrainConfig(report_to=["wandb"]).report_to == ["wandb"]

    seen = []
    m = MetricsLog(tmp_path / "m", total_steps=3, desc="t", report_to=["wandb"], on_row=seen.append)
    m.val(0, tokens=0, loss=6.0)
    for s in range(1, 4):
        m.train(s, tokens=100 * s, loss=6.0 - s, accuracy=0.5 + s / 10, sample="text")
    m.val(3, tokens=300, val_loss=3.5, accuracy=0.8)
    pngs = m.plot("t", panels=("loss", "accuracy", "missing"))
    m.close()
    rows = read_metrics(tmp_path / "m")
    assert rows == seen and [r["split"] for r in rows] == ["val", "train", "train", "train", "val"]
    assert rows[0]["val_loss"] == 6.0 and rows[-1]["val_accuracy"] == 0.8 and rows[2]["tokens"] == 200
    assert all(set(r) >= {"step", "split", "seconds", "tokens"} for r in rows)
    assert without_timing(rows)[1] == {"step": 1, "split": "train", "tokens": 100, "loss": 5.0, "accuracy": 0.6,
                                       "sample": "text"}
    assert [p.name for p in pngs] == ["loss.png", "curves.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    acc = EventAccumulator(str(tmp_path / "m" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy"} <= tags and "train/sample" not in tags
    assert [e.value for e in acc.Scalars("train/loss")] == [5.0, 4.0, 3.0]
    assert logged[1] == (1, {"train/loss": 5.0, "train/accuracy": 0.6})
    # fresh=True: a rerun that does not resume starts from empty files
    MetricsLog(tmp_path / "m", fresh=True, tensorboard=False).close()
    assert not (tmp_path / "m" / "metrics.jsonl").exists() and not (tmp_path / "m" / "tensorboard").exists()


def test_config_accepts_model_overrides_as_json_and_checks_them():
    from pydantic import ValidationError

    from refinery.tasks.train.config import TrainConfig

    assert TrainConfig(model='{"hidden_size": 64}').model == {"hidden_size": 64}
    assert TrainConfig(preset="124m").resolved_checkpoint_every() == 50
    with pytest.raises(ValidationError, match="JSON"):
        TrainConfig(model="{hidden_size: 64")
    with pytest.raises(ValidationError):
        TrainConfig(objective="diffusion")


def test_rendezvous_args_single_and_multi_node(monkeypatch):
    import pytest

    from refinery.tasks.train.distributed import rendezvous_args

    monkeypatch.delenv("REFINERY_NNODES", raising=False)
    assert rendezvous_args("fp") == ["--standalone"]
    monkeypatch.setenv("REFINERY_NNODES", "2")
    with pytest.raises(ValueError, match="RDZV_ENDPOINT"):
        rendezvous_args("fp")
    monkeypatch.setenv("REFINERY_RDZV_ENDPOINT", "node0:29500")
    monkeypatch.setenv("REFINERY_NODE_RANK", "1")
    assert rendezvous_args("fp") == ["--nnodes=2", "--node_rank=1", "--rdzv_backend=c10d",
                                     "--rdzv_endpoint=node0:29500", "--rdzv_id=fp"]
