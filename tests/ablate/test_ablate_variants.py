"""Ablation parameters and numbers without a run: dotted overrides, validation before anything
runs (with did-you-mean), the seed-spread flag, the comparison table."""
from __future__ import annotations

import pytest


def test_dotted_and_nested_overrides_expand_alike_and_merge_over_the_base():
    from refinery.tasks.ablate.variants import expand, flatten, merge, variant_configs

    assert expand({"dedup.exact": False, "filters": {"gopher_quality.min_stop_words": 3}}) == \
        {"dedup": {"exact": False}, "filters": {"gopher_quality": {"min_stop_words": 3}}}
    assert expand({"dedup.exact": False, "dedup": {"near": False}}) == {"dedup": {"exact": False, "near": False}}
    with pytest.raises(ValueError, match="set twice"):
        expand({"dedup.exact": False, "dedup": {"exact": True}})
    base = {"source": "web", "filters": {"url": {"extra_domains": ["a.com"]}, "rules": ["url", "c4"]}}
    out = variant_configs(base, {"v": {"filters.rules": []}}, "base")
    assert out["base"] is base and list(out) == ["base", "v"]
    assert out["v"] == {"source": "web", "filters": {"url": {"extra_domains": ["a.com"]}, "rules": []}}
    assert merge(base, {}) == base and flatten(expand({"a.b.c": 1, "d": 2})) == {"a.b.c": 1, "d": 2}
    with pytest.raises(ValueError, match="same for every variant"):
        variant_configs(base, {"v": {"input": "x"}}, "base", forbidden={"input"})
    with pytest.raises(ValueError, match="base's name"):
        variant_configs(base, {"base": {}}, "base")


def test_every_bad_variant_fails_validation_naming_variant_key_and_suggestion():
    from pydantic import ValidationError

    from refinery.flows.ablate import AblateParams

    with pytest.raises(ValidationError) as e:
        AblateParams(input="crawl.warc.gz", variants={
            "no_dedup": {"dedup.enabled": False},
            "strict": {"filters.gopher_quality.min_stop_word": 3, "dedup.threshold": 2}})
    msg = str(e.value)
    assert "variants.no_dedup: unknown parameter 'dedup.enabled'" in msg
    assert "'filters.gopher_quality.min_stop_words'" in msg   # did you mean
    assert "variants.strict: dedup.threshold" in msg
    ok = AblateParams(input="crawl.warc.gz", variants="{no_dedup: {dedup.exact: false, dedup.near: false}}",
                      seeds=[0, 1])
    assert ok.variants == {"no_dedup": {"dedup.exact": False, "dedup.near": False}} and ok.seed_list() == [0, 1]
    with pytest.raises(ValidationError, match="distinct seeds"):
        AblateParams(input="x", seeds=[1, 1])
    with pytest.raises(ValidationError, match="ablate needs an input"):
        AblateParams()


def test_summary_flags_a_difference_within_the_seed_spread():
    from refinery.tasks.ablate.table import BEYOND, UNKNOWN, WITHIN, comparison_table, summarize

    def rows(variant, metric, values):
        return [{"variant": variant, "seed": s, "side": "model", "metric": metric, "value": v}
                for s, v in enumerate(values)]

    data = rows("base", "heldout bits_per_byte", [2.0, 2.2]) + rows("close", "heldout bits_per_byte", [2.05, 2.25]) \
        + rows("far", "heldout bits_per_byte", [3.0, 3.1]) \
        + [{"variant": v, "seed": None, "side": "data", "metric": "docs_trained", "value": n}
           for v, n in (("base", 10), ("close", 12), ("far", 20))]
    s = {(r["variant"], r["metric"]): r for r in summarize(data, "base")}
    assert s[("close", "heldout bits_per_byte")]["flag"] == WITHIN
    assert s[("far", "heldout bits_per_byte")]["flag"] == BEYOND
    assert s[("far", "heldout bits_per_byte")]["delta"] == pytest.approx(0.95)
    assert s[("far", "docs_trained")]["flag"] == "" and s[("far", "docs_trained")]["delta"] == 10
    assert s[("base", "heldout bits_per_byte")]["std"] == pytest.approx(0.1414, abs=1e-3)
    one = summarize(rows("base", "m", [1.0]) + rows("v", "m", [1.5]), "base")
    assert one[1]["flag"] == UNKNOWN
    table = {r["metric"]: r for r in comparison_table(summarize(data, "base"), "base")}
    assert list(table) == ["docs_trained", "heldout bits_per_byte"]   # data side first
    assert table["heldout bits_per_byte"]["close"].endswith("~)") and "~" not in table["heldout bits_per_byte"]["far"]


def test_heldout_texts_become_a_stable_decontamination_source(tmp_path):
    import pyarrow as pa

    from refinery.tasks.ablate.heldout import heldout_jsonl
    from refinery.tasks.runtime import StageOutput, stage

    @stage("docs_for_ablate_test")
    def docs(b, inputs, cfg):
        b.write_table("part-00000.train.parquet", pa.table({"id": ["a", "b", "c"], "text": ["one two", "", "three"]}))
        return StageOutput(counts={"docs_out": 3})

    ds = docs.run(str(tmp_path / "w"), [], {})
    path = heldout_jsonl(ds, tmp_path / "inputs")
    assert path.name == f"heldout-{ds.fingerprint[:16]}.jsonl"
    assert path.read_text() == '{"text": "one two"}\n{"text": "three"}\n'   # empty texts left out
    mtime = path.stat().st_mtime_ns
    assert heldout_jsonl(ds, tmp_path / "inputs") == path and path.stat().st_mtime_ns == mtime   # not rewritten


def test_data_rows_count_what_each_step_kept_out():
    from refinery.tasks.ablate.table import data_rows

    curate = [("ingest", {"docs_out": 10, "dropped": {"http_status": 1}}),
              ("filter", {"docs_out": 9, "dropped": 1, "dropped_by_rule": {"url": 1}}),
              ("dedup", {"docs_out": 8, "dropped": {"exact_duplicate": 1, "near_duplicate": 0}})]
    got = {r["metric"]: r["value"] for r in data_rows("v", curate, ("decontaminate", {"docs_out": 6, "dropped": 2}),
                                                      {"tokens": 100})}
    assert got == {"docs_ingested": 10, "docs_curated": 8, "docs_trained": 6, "tokens": 100, "dropped:http_status": 1,
                   "dropped:url": 1, "dropped:exact_duplicate": 1, "dropped:near_duplicate": 0,
                   "dropped:heldout_overlap": 2}
    # without the n-gram step the tokenize stage skips the held-out documents by id
    got = {r["metric"]: r["value"] for r in data_rows("v", curate, None, {"tokens": 90, "held_out": 3})}
    assert got["docs_trained"] == 5 and got["dropped:heldout"] == 3 and "dropped:heldout_overlap" not in got
