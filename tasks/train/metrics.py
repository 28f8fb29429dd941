"""Training metrics, written the same way by every trainer (pretrain, finetune, reward, DPO, PPO).

One :class:`MetricsLog` per run writes each per-step row to

* ``metrics.jsonl``: one JSON object per line, the schema below;
* ``tensorboard/``: TensorBoard event files (tag ``<split>/<name>``, e.g. ``train/loss``, ``val/loss``);
* the trackers named in ``report_to`` (``wandb``, ``mlflow``; imported only when asked for);
* a console progress bar and, inside a Prefect flow run, a progress artifact;

and at the end :meth:`MetricsLog.plot` draws ``loss.png`` (and ``curves.png`` when asked for panels).
The folder is ``<run folder>/metrics/`` while training (``<workdir>/checkpoints/<fingerprint>/metrics``)
and ``metrics/`` inside the published dataset (also inside each exported model folder).

Row schema (``metrics.jsonl``)::

    step     int     optimizer step (0: before training; validation rows share their step's number)
    split    str     "train" or "val"
    seconds  float   wall-clock seconds since the run started (a resumed run continues the clock)
    tokens   int     training tokens consumed so far, or null where a trainer does not count them
    <name>   number  every other key is a metric; names are unique across splits (validation ones
                     start with ``val_``), so the rows of one step merge into one wide row. null
                     where not measured; a few string notes (PPO's ``sample`` reply) are allowed.

Also here: MFU from a per-device peak-FLOPs table, the ``report_to`` option type, and the Prefect
artifacts a flow publishes from a finished dataset's ``metrics/`` folder. Light at import (pydantic,
json); torch, matplotlib, trackers and Prefect load inside the functions that need them.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

from pydantic import AfterValidator
from refinery.tasks.progress import show_progress

ROW_KEYS = ("step", "split", "seconds", "tokens")      # the fixed columns of every row
# wall-clock figures: differ between identical runs (RL: the rollout's throughput and share of the step)
TIMING_KEYS = ("seconds", "tokens_per_sec", "mfu", "rollout_tokens_per_s", "gen_share")
METRICS_DIR = "metrics"                                # the folder name, in run folders and datasets

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


# ----------------------------------------------------------------------------- report_to
Tracker = Literal["wandb", "mlflow"]


def _installed(trackers: list[str]) -> list[str]:
    """Fail when the config is read, not after an hour of training, if a tracker is not installed."""
    for name in trackers:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"report_to: {name} is not installed in this environment "
                             f"(pip install {name}, or remove it from report_to)")
    return list(dict.fromkeys(trackers))


ReportTo = Annotated[list[Tracker], AfterValidator(_installed)]
REPORT_TO_HELP = ("Extra experiment trackers for the per-step metrics: wandb, mlflow (their packages must be "
                  "installed). metrics.jsonl, TensorBoard files and the loss PNG are always written.")


class _Wandb:
    def __init__(self, name: str, config: dict, log_dir: Path):
        import wandb

        self.run = wandb.init(name=name, config=config, dir=str(log_dir), reinit=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, name: str, config: dict, log_dir: Path):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=name)
        flat = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in config.items()}
        if flat:
            mlflow.log_params(flat)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_TRACKERS: dict[str, Callable[[str, dict, Path], Any]] = {"wandb": _Wandb, "mlflow": _Mlflow}


# ----------------------------------------------------------------------------- progress
class _PrefectProgress:
    """A Prefect progress artifact (percent of steps done), only inside a flow or task run.

    Updated at most every ``min_seconds`` and on whole-percent changes: each update is an API call.
    A failing update never fails the training run."""

    def __init__(self, key: str, total: int, description: str, min_seconds: float = 2.0):
        from refinery.tasks.report import _in_run, _key

        self.total, self.min_seconds = max(1, total), min_seconds
        self.id: Any = None   # the artifact's UUID (None: no artifact, outside a Prefect run)
        self.last_pct, self.last_t = -1.0, 0.0
        if not _in_run():
            return
        try:
            from prefect.artifacts import create_progress_artifact

            key = re.sub(r"-+", "-", _key(key))   # "finetune[lora]-progress" -> "finetune-lora-progress"
            self.id = create_progress_artifact(0.0, key=key, description=description)
            self.last_pct, self.last_t = 0.0, time.monotonic()
        except Exception as e:  # the UI's progress is a nicety
            print(f"metrics: no Prefect progress artifact ({e})", file=sys.stderr)

    def update(self, step: int, force: bool = False) -> None:
        if self.id is None:
            return
        pct = round(min(100.0, 100.0 * step / self.total), 1)
        now = time.monotonic()
        if not force and (int(pct) <= int(self.last_pct) or now - self.last_t < self.min_seconds):
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, pct)
            self.last_pct, self.last_t = pct, now
        except Exception as e:
            print(f"metrics: progress artifact update failed ({e})", file=sys.stderr)
            self.id = None


# ----------------------------------------------------------------------------- the log
class MetricsLog:
    """One run's per-step metrics (schema in the module docstring) to ``log_dir``.

    ``log_dir=None`` keeps the rows in memory only (a DDP rank other than 0). ``history`` is the
    list the rows are appended to (shared, not copied: a resumed pretraining run passes the rows
    saved in its checkpoint, so its curve is complete). ``fresh=True`` deletes an earlier run's
    files in ``log_dir`` (trainers that do not resume). ``total_steps`` and ``desc`` drive the
    console bar (``bar=True``, with the ``show`` metrics as postfix) and the Prefect progress
    artifact; ``on_row`` is called with every row; ``started`` (a ``time.perf_counter()`` value)
    is when the run's clock started.
    """

    def __init__(self, log_dir: str | Path | None, history: list[dict] | None = None, *,
                 total_steps: int | None = None, desc: str = "train", bar: bool = False,
                 show: Sequence[str] = ("loss",), report_to: Sequence[str] = (), run_config: dict | None = None,
                 on_row: Callable[[dict], None] | None = None, fresh: bool = False, tensorboard: bool = True,
                 started: float | None = None):
        self.history: list[dict] = history if history is not None else []  # shared, not copied
        self.dir = Path(log_dir) if log_dir else None
        self.desc, self.show, self.on_row = desc, tuple(show), on_row
        # the clock starts at ``started`` (a time.perf_counter() value, default now); a resumed run
        # continues its clock and its step count
        resumed = max((r.get("seconds") or 0.0 for r in self.history), default=0.0)
        self._t0 = (started if started is not None else time.perf_counter()) - resumed
        start = max((r["step"] for r in self.history), default=0)
        self._tb: Any = None
        self._trackers: list[Any] = []
        self._bar: Any = None
        self._progress: _PrefectProgress | None = None
        if self.dir is not None:
            self._open_files(fresh, tensorboard, start)
            self._trackers = [_TRACKERS[t](desc, run_config or {}, self.dir) for t in report_to]
        if total_steps:
            if bar and show_progress():
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total_steps, initial=start, desc=desc, unit="step", leave=False)
            if self.dir is not None:
                self._progress = _PrefectProgress(f"{desc}-progress", total_steps, f"{desc}: share of steps done")

    def _open_files(self, fresh: bool, tensorboard: bool, start: int) -> None:
        assert self.dir is not None
        if fresh:
            (self.dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.dir / "tensorboard", ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: rows and PNG still work
                return
            # purge_step: TensorBoard hides what a crashed run logged after the checkpoint resumed from
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start + 1 if start else None,
                                     flush_secs=10)

    # -- rows
    def elapsed(self) -> float:
        return round(time.perf_counter() - self._t0, 6)

    def train(self, step: int, tokens: int | None = None, **values: Any) -> dict:
        """Log a training row (``seconds`` filled in); returns it."""
        row = {"step": step, "split": "train", "seconds": self.elapsed(), "tokens": tokens, **values}
        self.log(row)
        return row

    def val(self, step: int, tokens: int | None = None, **values: Any) -> dict:
        """Log a validation row; metric names get the ``val_`` prefix when they lack it."""
        vals = {(k if k.startswith("val_") else f"val_{k}"): v for k, v in values.items()}
        row = {"step": step, "split": "val", "seconds": self.elapsed(), "tokens": tokens, **vals}
        self.log(row)
        return row

    def log(self, row: dict[str, Any]) -> None:
        """Log a complete row (``step`` and ``split`` at least)."""
        self.history.append(row)
        if self.dir is not None:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        scalars = _scalars(row)
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, row["step"])
        for t in self._trackers:
            t.log(row["step"], scalars)
        if self.on_row is not None:
            self.on_row(row)
        if row.get("split") == "train":
            if self._bar is not None:
                self._bar.update(1)
                post = {k: row[k] for k in self.show if isinstance(row.get(k), (int, float))}
                if post:
                    self._bar.set_postfix({k: f"{v:.4g}" for k, v in post.items()})
            if self._progress is not None:
                self._progress.update(row["step"])

    def rewrite(self) -> None:
        """Rewrite metrics.jsonl from the history (after a resume, rows past the checkpoint are dropped)."""
        if self.dir is not None:
            with open(self.dir / "metrics.jsonl", "w") as f:
                for row in self.history:
                    f.write(json.dumps(row, sort_keys=True) + "\n")

    # -- the end
    def plot(self, title: str = "", baseline: float | None = None, panels: Sequence[str] = ()) -> list[Path]:
        """``loss.png`` (training and validation loss by step), and ``curves.png`` with one panel per
        metric of ``panels`` (those present). Returns the files written (none without a folder)."""
        if self.dir is None:
            return []
        out = [loss_curve_png(self.history, self.dir / "loss.png", baseline, title)]
        keys = [k for k in panels if any(isinstance(r.get(k), (int, float)) for r in self.history)]
        if keys:
            out.append(curves_png(self.history, self.dir / "curves.png", keys, title))
        return out

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._progress is not None:
            last = max((r["step"] for r in self.history if r.get("split") == "train"), default=0)
            self._progress.update(last, force=True)
            self._progress = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        for t in self._trackers:
            t.close()
        self._trackers = []


def _scalars(row: dict) -> dict[str, float]:
    """A row's numeric metrics as ``<split>/<name>`` tags (``val_loss`` -> ``val/loss``)."""
    split = row.get("split", "train")
    out = {}
    for k, v in row.items():
        if k in ROW_KEYS or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        name = k[4:] if split == "val" and k.startswith("val_") else k
        out[f"{split}/{name}"] = float(v)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file (or of a folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def without_timing(rows: Sequence[dict]) -> list[dict]:
    """Rows less their wall-clock figures: equal for two runs with the same seed and inputs."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


# ----------------------------------------------------------------------------- pictures
def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def loss_curve_png(history: list[dict], path: str | Path, baseline: float | None = None, title: str = "") -> Path:
    """Training and validation loss by step (matplotlib, Agg backend), with the unigram baseline."""
    plt = _pyplot()
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
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if train or val or baseline is not None:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def curves_png(history: list[dict], path: str | Path, keys: Sequence[str], title: str = "") -> Path:
    """One panel per metric name in ``keys`` (its training values, and ``val_<name>`` where logged)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), dpi=100, squeeze=False)
    for ax, k in zip(axes[0], keys):
        for name, style, label in ((k, "-", "train"), (f"val_{k}", "o-", "validation")):
            pts = [(r["step"], r[name]) for r in history if isinstance(r.get(name), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, label=label, linewidth=1, markersize=3)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def summary_rows(history: list[dict], every: int = 1) -> list[dict]:
    """Compact table rows (one per logged step, validation rows merged into their step) for a Prefect artifact."""
    by_step: dict[int, dict] = {}
    for r in history:
        by_step.setdefault(r["step"], {"step": r["step"]}).update(
            {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    rows = [by_step[s] for s in sorted(by_step)]
    return [r for i, r in enumerate(rows) if i % every == 0 or "val_loss" in r or i == len(rows) - 1]


# ----------------------------------------------------------------------------- datasets and flows
def publish_metrics(b, log_dir: str | Path, model_folders: Sequence[str] = ()) -> None:
    """Copy a run's metrics folder into the dataset being built: all of it to ``metrics/`` at its
    top, and its files (metrics.jsonl and the PNGs; TensorBoard's events stay single, so
    ``tensorboard --logdir`` lists each run once) to ``<folder>/metrics/`` of each exported model
    folder, so a copied model keeps its history and curves."""
    b.put_dir(log_dir, METRICS_DIR)
    for folder in dict.fromkeys(f for f in model_folders if f not in ("", ".")):
        for f in sorted(Path(log_dir).iterdir()):
            if f.is_file():
                b.put_file(f, f"{folder}/{METRICS_DIR}/{f.name}")


def report_metrics(ds, key: str, description: str = "", limit: int = 50) -> list[dict]:
    """Prefect artifacts of a finished dataset's ``metrics/``: a table of (about ``limit``) rows and
    the PNGs. Returns the table rows (empty when the dataset has no metrics)."""
    from refinery.tasks.report import image_artifact, table_artifact

    try:
        with ds.fs.open(ds.file(f"{METRICS_DIR}/metrics.jsonl"), "r") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    merged = summary_rows(rows, every=max(1, len(rows) // limit))
    table_artifact(f"{key}-metrics", merged, description=description or f"{key}: per-step metrics")
    for png in ("loss", "curves"):
        rel = f"{METRICS_DIR}/{png}.png"
        if ds.fs.exists(ds.file(rel)):
            image_artifact(f"{key}-{png}", f"{ds.local_path()}/{rel}", description=f"{key}: {png} by step")
    return merged


__all__ = ["ROW_KEYS", "TIMING_KEYS", "METRICS_DIR", "PEAK_FLOPS_BF16", "peak_flops", "mfu", "ReportTo",
           "REPORT_TO_HELP", "MetricsLog", "read_metrics", "without_timing", "loss_curve_png", "curves_png",
           "summary_rows", "publish_metrics", "report_metrics"]
