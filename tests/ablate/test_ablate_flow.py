"""The ablate flow end to end on the demo crawl, where the data-side answer is known from its
ground truth: a variant without filters and dedup keeps the planted duplicates and spam that the
curated base drops; both are scored on the same clean held-out documents, which no variant trains
on (nor on their copies). A rerun trains nothing; one more variant trains only itself."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from refinery_testlib import read_exec_log

SEEDS = [0, 1]


def params(workdir: Path, variants: dict):
    from refinery.flows.ablate import AblateParams

    return AblateParams.model_validate({
        "workdir": str(workdir), "task_runner": "threads:2",
        "demo_crawl": {"pages": 120, "seed": 0},
        "base_name": "curated",
        "curate": {"source": "demo-crawl", "filters": {"url": {"extra_domains": ["royal-casino-bets.com"]}}},
        "variants": variants,
        "holdout": {"fraction": 0.1, "min_docs": 8},
        "tokenizer": {"vocab_size": 512},
        "pretrain": {"preset": "tiny", "max_steps": 12, "lr": 0.002, "seq_len": 64, "batch_size": 8,
                     "eval_every": 6, "eval_batches": 2, "log_every": 6},
        "seeds": SEEDS,
        "evaluate": {"prompts": [], "max_docs": 40, "max_length": 128},
    })


def urls(path: str) -> list[str]:
    from refinery.tasks.store import Dataset

    return [u for u in Dataset.open(path).read_table(columns=["url"]).column(0).to_pylist()]


def texts(path: str) -> set[str]:
    from refinery.tasks.store import Dataset

    return set(Dataset.open(path).read_table(columns=["text"]).column(0).to_pylist())


@pytest.mark.slow
def test_ablation_on_the_demo_crawl_and_its_cache(tmp_path, exec_log):
    from refinery.flows.cli import load_flow
    from refinery.tasks.ablate.stage import read_rows
    from refinery.tasks.ablate.table import BEYOND, UNKNOWN, WITHIN
    from refinery.tasks.demo.crawl import load_ground_truth
    from refinery.tasks.store import Dataset

    flow = load_flow("ablate")
    unfiltered = {"filters.rules": [], "dedup.exact": False, "dedup.near": False}
    out = flow.run_params(params(tmp_path, {"unfiltered": unfiltered}))
    truth = load_ground_truth(tmp_path / "demo-inputs" / "crawl-0-120")
    o = out["outputs"]

    # data side, against the ground truth: the base drops the planted spam and keeps at most one
    # page per exact-duplicate group; the unfiltered variant keeps more of both
    base_urls, raw_urls = urls(o["curated/documents"]), urls(o["unfiltered/documents"])
    spam = set(truth["spam"])
    assert len(spam & set(raw_urls)) > len(spam & set(base_urls))
    assert len(spam & set(raw_urls)) >= len(spam) // 2
    groups = [set(g) for g in truth["exact_duplicates"]]
    assert all(len(g & set(base_urls)) <= 1 for g in groups)
    assert sum(len(g & set(raw_urls)) for g in groups) > sum(len(g & set(base_urls)) for g in groups)
    # the held-out documents are clean (from the curated base) and no variant trains on them
    held = texts(o["heldout"])
    assert held and not held & texts(o["curated/documents"]) and not held & texts(o["unfiltered/documents"])
    assert set(urls(o["heldout"])) <= set(urls(Dataset.open(o["curated/documents"]).manifest["inputs"][0]["path"]))

    # the ablation dataset: one row per (variant, seed, metric), both sides
    ds = Dataset.open(out["primary"])
    rows = read_rows(ds)
    by = {(r["variant"], r["seed"], r["metric"]): r["value"] for r in rows}
    assert by[("unfiltered", None, "docs_trained")] > by[("curated", None, "docs_trained")]
    assert by[("curated", None, "dropped:exact_duplicate")] > 0 and by[("unfiltered", None, "dropped:exact_duplicate")] == 0
    assert by[("curated", None, "dropped:heldout_overlap")] >= len(held)
    for v in ("curated", "unfiltered"):
        assert by[(v, None, "tokens")] > 0
        for s in SEEDS:
            bpb = by[(v, s, "heldout bits_per_byte")]
            assert math.isfinite(bpb) and 0 < bpb < 8   # learned something: under 8 bits per byte
            assert by[(v, s, "val_loss_final")] < math.log(512)   # below the uniform guess over the vocab
            assert (v, s, "train_loss_final") in by
    # the seeds differ (else the spread would say nothing), and the flag follows the spread
    assert by[("curated", 0, "heldout bits_per_byte")] != by[("curated", 1, "heldout bits_per_byte")]
    summary = {(s["variant"], s["metric"]): s for s in read_rows(ds, "summary/summary.parquet")}
    u, b = summary[("unfiltered", "heldout bits_per_byte")], summary[("curated", "heldout bits_per_byte")]
    assert u["flag"] == (WITHIN if abs(u["delta"]) <= max(u["std"], b["std"]) else BEYOND) != UNKNOWN
    assert ds.manifest["comparison"] and Path(ds.local_path(), "plots", "ablation.png").stat().st_size > 10_000
    assert {r["metric"] for r in out["table"]} >= {"docs_trained", "tokens", "heldout bits_per_byte"}
    trained_first = [line for line in read_exec_log(exec_log) if line.startswith("pretrain ")]
    assert len({line.split()[1] for line in trained_first}) == 2 * len(SEEDS)

    # a rerun does nothing at all: every stage is found built
    n = len(read_exec_log(exec_log))
    again = flow.run_params(params(tmp_path, {"unfiltered": unfiltered}))
    assert read_exec_log(exec_log)[n:] == [] and again["primary"] == out["primary"]

    # one more variant: only its own stages (after filter) run and only its models train
    n = len(read_exec_log(exec_log))
    more = flow.run_params(params(tmp_path, {"unfiltered": unfiltered,
                                             "no_dedup": {"dedup.exact": False, "dedup.near": False}}))
    ran = read_exec_log(exec_log)[n:]
    stages = {line.split()[0] for line in ran}
    assert "ingest" not in stages and "filter" not in stages and "tokenizer" not in stages
    assert len({line.split()[1] for line in ran if line.startswith("pretrain ")}) == len(SEEDS)
    assert len({line.split()[1] for line in ran if line.startswith("evaluate ")}) == len(SEEDS)
    assert more["outputs"]["curated/model-seed0"] == out["outputs"]["curated/model-seed0"]
    rows3 = read_rows(Dataset.open(more["primary"]))
    assert {r["variant"] for r in rows3} == {"curated", "unfiltered", "no_dedup"}
