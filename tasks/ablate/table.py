"""The numbers of an ablation: one row per (variant, seed, metric), their summary over seeds, the
comparison table and the picture. Plain functions over manifests and metric rows (no Prefect).

Rows (the ablation dataset's parts)::

    variant  str     the variant's name (the base first)
    seed     int     the pretrain seed; null for the data side (which has no seed)
    side     str     "data" (documents, tokens, drops) or "model" (losses, held-out, tasks)
    metric   str     e.g. docs_trained, tokens, dropped:gopher_quality, heldout bits_per_byte,
                     val_loss_final, train_loss_final, <task> <metric>
    value    float

Noise: a model metric's spread is the sample standard deviation over the variant's seeds. A
variant's difference from the base is flagged ``within seed spread`` when it is no larger than the
larger of the two spreads, and ``spread unknown`` when either side has a single seed.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Sequence

# the headline model metric of the bar chart, and the ones after it when it is missing
HEADLINE = ("heldout bits_per_byte", "val_loss_final")
# data-side figures in table order (drop reasons follow, then the model side)
DATA_METRICS = ("docs_ingested", "docs_curated", "docs_trained", "tokens")
MODEL_FIRST = ("heldout bits_per_byte", "heldout perplexity", "val_loss_final", "train_loss_final")
WITHIN, BEYOND, UNKNOWN = "within seed spread", "beyond seed spread", "spread unknown (1 seed)"


def drop_reasons(stage: str, counts: dict) -> dict[str, int]:
    """Documents a curate stage dropped, per reason: the filter's per rule, the others' ``dropped``
    mapping (ingest: http_status, ...; dedup: exact_duplicate, near_duplicate, ...)."""
    if stage == "filter":
        found = counts.get("dropped_by_rule", {})
    else:
        found = counts.get("dropped", {})
    if not isinstance(found, dict):
        return {}
    return {str(k): int(v) for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def data_rows(variant: str, curate: Sequence[tuple[str, dict]], trained: tuple[str, dict] | None,
              tokens: dict) -> list[dict]:
    """The data side of one variant. ``curate``: (stage, counts) of its curate stages in order;
    ``trained``: (stage, counts) of the held-out decontamination (None when it is off);
    ``tokens``: the tokenize stage's counts."""
    by_stage = dict(curate)
    out = []

    def row(metric: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append({"variant": variant, "seed": None, "side": "data", "metric": metric, "value": float(value)})

    curated = curate[-1][1].get("docs_out") if curate else None
    row("docs_ingested", by_stage.get("ingest", {}).get("docs_out"))
    row("docs_curated", curated)
    skipped = tokens.get("held_out", 0) or 0   # held-out documents the tokenize stage skipped by id
    if trained:
        row("docs_trained", trained[1].get("docs_out"))
    elif isinstance(curated, (int, float)):
        row("docs_trained", curated - skipped)
    row("tokens", tokens.get("tokens"))
    for stage, counts in curate:
        for reason, n in drop_reasons(stage, counts).items():
            row(f"dropped:{reason}", n)
    if trained:   # documents sharing an n-gram with the held-out documents (copies, near-copies)
        row("dropped:heldout_overlap", trained[1].get("dropped", 0))
    elif skipped:
        row("dropped:heldout", skipped)
    return out


def fill_drops(rows: list[dict]) -> list[dict]:
    """Every drop reason that any variant has, for every variant (0 where it dropped none), so the
    table compares like with like; reasons no variant used are left out."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    reasons = list(dict.fromkeys(r["metric"] for r in rows if r["metric"].startswith("dropped:")))
    used = {m for m in reasons if any(r["value"] for r in rows if r["metric"] == m)}
    have = {(r["variant"], r["metric"]) for r in rows}
    out = [r for r in rows if not r["metric"].startswith("dropped:") or r["metric"] in used]
    for v in variants:
        for m in reasons:
            if m in used and (v, m) not in have:
                out.append({"variant": v, "seed": None, "side": "data", "metric": m, "value": 0.0})
    return out


def model_rows(variant: str, seed: int, manifest: dict, history: list[dict], results: Iterable[dict]) -> list[dict]:
    """The model side of one trained model: final losses (from its manifest and metrics rows) and
    the evaluation's rows (held-out overall, not per source or language; every task metric)."""
    out = []

    def row(metric: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append({"variant": variant, "seed": seed, "side": "model", "metric": metric, "value": float(value)})

    train = [r["loss"] for r in history if isinstance(r.get("loss"), (int, float))]
    row("train_loss_final", train[-1] if train else None)
    row("val_loss_final", manifest.get("val_loss_end"))
    for r in results:
        task = str(r.get("task"))
        if task.startswith("heldout["):
            continue
        row(f"{task} {r.get('metric')}", r.get("value"))
    return out


def _order(rows: list[dict]) -> list[str]:
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    data = [m for m in DATA_METRICS if m in metrics] + sorted(m for m in metrics if m.startswith("dropped:"))
    model_metrics = [m for m in metrics if m not in data and not m.startswith("dropped:") and m not in DATA_METRICS]
    model = [m for m in MODEL_FIRST if m in model_metrics] + [m for m in model_metrics if m not in MODEL_FIRST]
    return data + model


def summarize(rows: list[dict], base: str) -> list[dict]:
    """One row per (variant, metric): mean and spread over seeds, the difference from the base and
    whether it exceeds the seed spread (see the module's docstring)."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    stats: dict[tuple[str, str], dict] = {}
    for (v, m) in dict.fromkeys((r["variant"], r["metric"]) for r in rows):
        vals = [r["value"] for r in rows if r["variant"] == v and r["metric"] == m]
        side = next(r["side"] for r in rows if r["variant"] == v and r["metric"] == m)
        stats[(v, m)] = {"variant": v, "metric": m, "side": side, "n": len(vals),
                         "mean": statistics.fmean(vals),
                         "std": statistics.stdev(vals) if len(vals) > 1 else None}
    out = []
    for m in _order(rows):
        b = stats.get((base, m))
        for v in variants:
            s = stats.get((v, m))
            if s is None:
                continue
            s = dict(s)
            s["delta"] = s["mean"] - b["mean"] if b is not None and v != base else None
            s["flag"] = noise_flag(s, b) if v != base and s["side"] == "model" else ""
            out.append(s)
    return out


def noise_flag(s: dict, base: dict | None) -> str:
    """Whether a variant's difference from the base is larger than the seed spread."""
    if base is None or s.get("delta") is None:
        return ""
    if s["std"] is None or base["std"] is None:
        return UNKNOWN
    return WITHIN if abs(s["delta"]) <= max(s["std"], base["std"]) else BEYOND


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    if float(x).is_integer() and abs(x) >= 1:
        return f"{int(x)}"
    return f"{x:.4g}"


def comparison_table(summary: list[dict], base: str) -> list[dict]:
    """One row per metric, one column per variant: ``mean ± spread`` and, for the others than the
    base, the difference (and ``~`` when it is within the seed spread, ``?`` when unknown)."""
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    table: dict[str, dict] = {}
    for s in summary:
        row = table.setdefault(s["metric"], {"metric": s["metric"], **{v: "" for v in variants}})
        cell = _fmt(s["mean"]) + (f" ± {s['std']:.2g}" if s["std"] is not None else "")
        if s["delta"] is not None:
            mark = {WITHIN: " ~", BEYOND: "", UNKNOWN: " ?"}.get(s["flag"], "")
            cell += f" ({'+' if s['delta'] >= 0 else ''}{_fmt(s['delta'])}{mark})"
        row[s["variant"]] = cell
    return list(table.values())


TABLE_LEGEND = ("mean ± sample std over seeds; (difference from the base); ~ = within the seed spread "
                "(not a real difference), ? = one seed, spread unknown; train/val losses are on each variant's "
                "own data (compare held-out rows across variants)")


def headline(summary: list[dict]) -> str | None:
    metrics = {s["metric"] for s in summary}
    return next((m for m in HEADLINE if m in metrics), None)


def plot(path: str, rows: list[dict], curves: dict[tuple[str, int], list[dict]], base: str) -> str:
    """Two panels: every (variant, seed) training loss curve on one plot (validation loss as dots;
    one colour per variant), and the headline metric per variant with its seed spread (bar: mean,
    error bar: sample std, dots: the seeds)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    color = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for (v, seed), hist in curves.items():
        train = [(r["step"], r["loss"]) for r in hist if isinstance(r.get("loss"), (int, float))]
        val = [(r["step"], r["val_loss"]) for r in hist if isinstance(r.get("val_loss"), (int, float))]
        first = seed == min(s for (w, s) in curves if w == v)
        if train:
            ax1.plot(*zip(*train), color=color[v], linewidth=1, alpha=0.8, label=v if first else None)
        if val:
            ax1.plot(*zip(*val), "o", color=color[v], markersize=3, alpha=0.9)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (lines: train, dots: validation)")
    ax1.set_title("training curves (every seed)")
    ax1.grid(alpha=0.3)
    if curves:
        ax1.legend(fontsize=8)
    summary = summarize(rows, base)
    metric = headline(summary)
    if metric:
        stats = {s["variant"]: s for s in summary if s["metric"] == metric}
        xs = list(range(len(variants)))
        means = [stats[v]["mean"] if v in stats else 0.0 for v in variants]
        errs = [(stats[v]["std"] or 0.0) if v in stats else 0.0 for v in variants]
        bars = ax2.bar(xs, means, yerr=errs, capsize=6, color=[color[v] for v in variants], alpha=0.7)
        ax2.bar_label(bars, fmt="%.4g", fontsize=8, padding=8)
        for i, v in enumerate(variants):
            pts = [r["value"] for r in rows if r["variant"] == v and r["metric"] == metric]
            ax2.plot([i] * len(pts), pts, "k.", markersize=5)
        lo = min((r["value"] for r in rows if r["metric"] == metric), default=0.0)
        hi = max((r["value"] for r in rows if r["metric"] == metric), default=1.0)
        pad = max(hi - lo, abs(hi) * 0.02, 1e-3)
        ax2.set_ylim(lo - 2 * pad, hi + 2 * pad)   # the differences are small: zoom on them
        ax2.set_xticks(xs, variants, rotation=15, ha="right")
        ax2.set_title(f"{metric} (bar: mean, error bar: std over seeds, dots: seeds)", fontsize=9)
        ax2.grid(alpha=0.3, axis="y")
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


__all__ = ["data_rows", "model_rows", "fill_drops", "summarize", "comparison_table", "plot", "headline",
           "drop_reasons", "noise_flag", "WITHIN", "BEYOND", "UNKNOWN", "TABLE_LEGEND"]
