"""The ``ablation`` stage: the datasets of every variant of an ablation -> one comparison dataset.

Inputs are every dataset the ablation made, each described by one :class:`Entry` of the config
(same order): a variant's curate stages (``curate``), its training documents after the held-out
decontamination (``trained_docs``), its token shards (``tokens``), and per seed its model
(``model``) and that model's evaluation (``evaluate``). The stage only reads their manifests,
metrics and results, so it is cached like any other: the same datasets give the same table, and
a new variant or seed (new inputs) rebuilds only this small table, nothing upstream.

Output::

    part-00000.train.parquet   variant, seed, side, metric, value  (see refinery.tasks.ablate.table)
    summary/summary.parquet    variant, metric, side, n, mean, std, delta, flag
    plots/ablation.png         training curves of every variant and seed; headline metric with seed spread

Manifest extra: ``base``, ``variants`` (name -> dotted overrides), ``seeds``, ``headline``,
``comparison`` (the printed table) and ``legend``.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from refinery.tasks.config import StrictModel
from refinery.tasks.runtime import StageOutput, stage

ROLES = ("curate", "trained_docs", "tokens", "model", "evaluate")
ROW_COLUMNS = ("variant", "seed", "side", "metric", "value")
SUMMARY_COLUMNS = ("variant", "metric", "side", "n", "mean", "std", "delta", "flag")
PLOT = "plots/ablation.png"


class Entry(StrictModel):
    variant: str
    role: Literal["curate", "trained_docs", "tokens", "model", "evaluate"]
    seed: int | None = Field(None, description="The pretrain seed (model and evaluate entries).")


class AblationConfig(StrictModel):
    base: str = Field(description="The variant the others are compared with.")
    variants: dict[str, dict[str, Any]] = Field(description="Variant name -> its dotted overrides (base: {}).")
    seeds: list[int] = Field(min_length=1)
    entries: list[Entry] = Field(description="What each input is, in the inputs' order.")


def _history(ds) -> list[dict]:
    """A model dataset's metrics rows (metrics/metrics.jsonl), [] when it has none."""
    from refinery.tasks.train.metrics import METRICS_DIR

    path = ds.file(f"{METRICS_DIR}/metrics.jsonl")
    try:
        with ds.fs.open(path, "rt") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _results(ds) -> list[dict]:
    from refinery.tasks.eval.stage import read_results

    return read_results(ds)


def collect(cfg: AblationConfig, inputs: list) -> tuple[list[dict], dict[tuple[str, int], list[dict]]]:
    """(rows, training curves per (variant, seed)) from the inputs as the entries describe them."""
    from refinery.tasks.ablate.table import data_rows, fill_drops, model_rows

    if len(inputs) != len(cfg.entries):
        raise ValueError(f"ablation: {len(inputs)} inputs but {len(cfg.entries)} entries describing them")
    by: dict[tuple[str, str, int | None], list] = {}
    for e, ds in zip(cfg.entries, inputs):
        by.setdefault((e.variant, e.role, e.seed), []).append(ds)
    rows: list[dict] = []
    curves: dict[tuple[str, int], list[dict]] = {}
    for v in cfg.variants:
        curate = [(d.stage, d.counts) for d in by.get((v, "curate", None), [])]
        trained = by.get((v, "trained_docs", None), [])
        tokens = by.get((v, "tokens", None), [])
        if not curate or not tokens:
            raise ValueError(f"ablation: variant {v} has no curate or tokens input")
        rows += data_rows(v, curate, (trained[0].stage, trained[0].counts) if trained else None, tokens[0].counts)
        for seed in cfg.seeds:
            model = by.get((v, "model", seed), [])
            if not model:
                raise ValueError(f"ablation: variant {v} has no model for seed {seed}")
            hist = _history(model[0])
            curves[(v, seed)] = hist
            ev = by.get((v, "evaluate", seed), [])
            rows += model_rows(v, seed, model[0].manifest, hist, _results(ev[0]) if ev else [])
    return fill_drops(rows), curves


def _write(b, rel: str, rows: list[dict], columns: tuple[str, ...]) -> None:
    import pyarrow as pa

    types = {"seed": pa.int64(), "n": pa.int64(), "value": pa.float64(), "mean": pa.float64(),
             "std": pa.float64(), "delta": pa.float64()}
    b.write_table(rel, pa.table({c: pa.array([r.get(c) for r in rows], types.get(c, pa.string()))
                                 for c in columns}))


@stage("ablation", version="2")
def ablation(b, inputs, cfg: AblationConfig) -> StageOutput:
    """inputs = every dataset of the ablation, described by ``cfg.entries`` -> rows, summary, plot."""
    from pathlib import Path

    from refinery.tasks.ablate.table import TABLE_LEGEND, comparison_table, headline, plot, summarize
    from refinery.tasks.card import part_name

    rows, curves = collect(cfg, inputs)
    summary = summarize(rows, cfg.base)
    _write(b, part_name(0), rows, ROW_COLUMNS)
    _write(b, "summary/summary.parquet", summary, SUMMARY_COLUMNS)
    png = Path(b.tmpdir()) / "ablation.png"
    plot(str(png), rows, curves, cfg.base)
    b.put_file(png, PLOT)
    flags = [s["flag"] for s in summary if s["flag"]]
    return StageOutput(
        counts={"variants": len(cfg.variants), "seeds": len(cfg.seeds), "rows": len(rows),
                "models": len(curves), "within_seed_spread": sum(f.startswith("within") for f in flags),
                "beyond_seed_spread": sum(f.startswith("beyond") for f in flags)},
        extra={"base": cfg.base, "variants": cfg.variants, "seeds": cfg.seeds, "headline": headline(summary),
               "comparison": comparison_table(summary, cfg.base), "legend": TABLE_LEGEND, "plot": PLOT},
    )


def read_rows(ds, rel: str | None = None) -> list[dict]:
    """The rows of an ablation dataset (its parts), or of one of its side tables (``rel``)."""
    if rel is None:
        return ds.read_table().to_pylist()
    import pyarrow.parquet as pq

    with ds.fs.open(ds.file(rel), "rb") as f:
        return pq.read_table(f).to_pylist()


__all__ = ["ablation", "AblationConfig", "Entry", "collect", "read_rows", "ROLES", "PLOT"]
