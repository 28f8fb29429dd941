"""Training metrics: MFU from a per-device peak-FLOPs table, JSONL rows, TensorBoard, a loss-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Dense (no sparsity) peak tensor-core FLOP/s per device at bf16 (fp16 where the chip has no bf16),
# from the vendors' datasheets. Matched by substring of torch.cuda.get_device_name(), first match wins,
# so the more specific names come first.
PEAK_FLOPS_BF16: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),           # SXM5
    ("H800", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),           # fp16
    ("T4", 65e12),              # fp16
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def peak_flops(device_name: str | None) -> float | None:
    """Peak bf16 FLOP/s of a device by name, or None when unknown (then MFU is not reported)."""
    if not device_name:
        return None
    for key, flops in PEAK_FLOPS_BF16:
        if key.lower() in device_name.lower():
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float | None, n_devices: int = 1) -> float | None:
    if not peak:
        return None
    return flops_per_token * tokens_per_sec / (peak * n_devices)


class MetricsLog:
    """Rows to ``metrics.jsonl`` and scalars to TensorBoard (``tensorboard/``) under ``log_dir``.

    ``history`` is kept in memory (and saved in checkpoints) so a resumed run's curve is complete.
    """

    def __init__(self, log_dir: str | Path | None, history: list[dict] | None = None, tensorboard: bool = True):
        self.history: list[dict] = history if history is not None else []  # shared, not copied
        self.dir = Path(log_dir) if log_dir else None
        self._tb = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(str(self.dir / "tensorboard"))
                except ImportError:  # tensorboard not installed: rows and PNG still work
                    self._tb = None

    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.dir is not None:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            step = row["step"]
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(("val/" if k.startswith("val") else "train/") + k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def rewrite(self) -> None:
        """Rewrite metrics.jsonl from the history (after a resume, rows past the checkpoint are dropped)."""
        if self.dir is not None:
            with open(self.dir / "metrics.jsonl", "w") as f:
                for row in self.history:
                    f.write(json.dumps(row, sort_keys=True) + "\n")


def loss_curve_png(history: list[dict], path: str | Path, baseline: float | None = None, title: str = "") -> Path:
    """Training and validation loss by step (matplotlib, Agg backend), with the unigram baseline."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5, markersize=3)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"unigram entropy {baseline:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def summary_rows(history: list[dict], every: int = 1) -> list[dict]:
    """Compact table rows (one per logged step, eval rows merged into their step) for a Prefect artifact."""
    by_step: dict[int, dict] = {}
    for r in history:
        by_step.setdefault(r["step"], {"step": r["step"]}).update({k: v for k, v in r.items() if v is not None})
    rows = [by_step[s] for s in sorted(by_step)]
    return [r for i, r in enumerate(rows) if i % every == 0 or "val_loss" in r or i == len(rows) - 1]


__all__ = ["PEAK_FLOPS_BF16", "peak_flops", "mfu", "MetricsLog", "loss_curve_png", "summary_rows"]
