"""The mix stage: per-source token shares within 1% of the weights, token targets reached by
subsampling and repetition, FineWeb-2 rehydration by the clusters dedup recorded, byte-identical
reruns; the curate flow runs it after dedup and tokenize takes its output.

Real documents: DCLM web pages (shared data) as ``web`` with planted exact-duplicate clusters of
sizes 2, 3, 4, 6 and 100, and Python standard-library modules as ``code``; ingested and
deduplicated by the real stages once per module."""
from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from refinery_testlib import shared_file

ROOT = Path(__file__).resolve().parents[2]
REFINERY = str(Path(sys.executable).parent / "refinery")
# web document -> size of its planted duplicate cluster (documents the default filter chain keeps)
PLANTED = {8: 2, 9: 3, 10: 4, 11: 6, 12: 100}


def _write_inputs(folder: Path, shared_data: Path) -> tuple[Path, Path]:
    rows = [json.loads(line) for line in shared_file(shared_data, "quality/dclm-majority.jsonl").read_text().splitlines()]
    web = [{"id": f"w{i}", "text": r["text"], "url": f"https://web.example/{i}"} for i, r in enumerate(rows[:150])]
    for i, size in PLANTED.items():
        web += [{"id": f"w{i}-copy{j}", "text": rows[i]["text"], "url": f"https://copy.example/{i}/{j}"}
                for j in range(size - 1)]
    modules = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:60]
    code = [{"id": f"c{i}", "text": Path(p).read_text(errors="replace")} for i, p in enumerate(modules)]
    (folder / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in web))
    (folder / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in code))
    return folder / "web.jsonl", folder / "code.jsonl"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data) -> dict:
    """The ingested web + code documents and their dedup dataset."""
    from refinery.tasks.dedup.stage import run_dedup
    from refinery.tasks.ingest.stage import Ingest, IngestConfig, InputSpec
    from refinery.tasks.store import Store

    folder = tmp_path_factory.mktemp("mix")
    web, code = _write_inputs(folder, shared_data)
    store = Store(folder / "work")
    docs = Ingest.run(store, [], IngestConfig(inputs=[InputSpec(path=str(web), source="web"),
                                                      InputSpec(path=str(code), source="code")]))
    return {"folder": folder, "store": store, "web": web, "code": code, "dedup": run_dedup(store, docs)["dedup"]}


def _mix(corpus, store=None, **cfg):
    from refinery.tasks.mix.stage import MixConfig, run_mix

    return run_mix(store or corpus["store"], corpus["dedup"], corpus["dedup"], MixConfig(**cfg))["mix"]


def _tokens_by_source(ds, measure: str = "bytes") -> dict[str, int]:
    """Tokens per source counted again from the output's rows (not from the manifest)."""
    from refinery.tasks.mix.stage import count_tokens

    t = ds.read_table(columns=["source", "text"])
    n = count_tokens(t.column("text"), measure)
    out: Counter = Counter()
    for s, k in zip(t.column("source").to_pylist(), n.tolist()):
        out[s] += k
    return dict(out)


def _copies_by_id(ds) -> Counter:
    return Counter(ds.read_table(columns=["id"]).column("id").to_pylist())


def test_weights_give_token_shares_within_one_percent(corpus):
    ds = _mix(corpus, weights={"web": 0.7, "code": 0.3})
    tokens = _tokens_by_source(ds)
    total = sum(tokens.values())
    assert abs(tokens["web"] / total - 0.7) < 0.01 and abs(tokens["code"] / total - 0.3) < 0.01, tokens
    c = ds.counts
    assert c["tokens_out_by_source"] == tokens and c["tokens_out"] == total
    # default total: the largest mixture repeating nothing, so web (the scarce source) is kept whole
    # and code subsampled to 3/7 of it
    assert c["tokens_out_by_source"]["web"] == c["tokens_in_by_source"]["web"]
    assert c["tokens_in_by_source"]["code"] > tokens["code"] and c["dropped"]["subsampled"] > 0
    assert c["mixture_ppm"] == {"web": 700_000, "code": 300_000}
    assert max(_copies_by_id(ds).values()) == 1
    docs = corpus["dedup"].read_table()
    assert ds.read_table().schema == docs.schema   # same schema: a curate output like any other
    card = (Path(ds.path) / "README.md").read_text()
    for line in ("| mixture_ppm.web | 700,000 |", "| tokens_in_by_source.code |", "| tokens_out_by_source.web |",
                 "| docs_in_by_source.web |", "| docs_out_by_source.code |"):
        assert line in card, line
    mix = ds.manifest["mix"]
    assert mix["mode"] == "weights" and mix["weights"] == {"web": 0.7, "code": 0.3} and mix["measure"] == "bytes"
    assert {r["source"] for r in ds.manifest["stats"]["table"]} == {"web", "code"}


def test_token_targets_subsample_and_repeat(corpus):
    have = corpus["dedup"].read_table(columns=["id", "source"])
    web_in = _tokens_by_source(corpus["dedup"])["web"]
    want = {"web": int(2.5 * web_in), "code": 60_000}   # web repeated 2-3 times, code subsampled
    ds = _mix(corpus, tokens=want)
    tokens = _tokens_by_source(ds)
    for s in want:
        assert abs(tokens[s] - want[s]) <= 0.01 * want[s], (s, tokens[s], want[s])
    copies = _copies_by_id(ds)
    web_ids = [i for i, s in zip(have.column("id").to_pylist(), have.column("source").to_pylist()) if s == "web"]
    assert {copies[i] for i in web_ids} == {2, 3}   # every web document twice, half of them once more
    assert 0.3 < sum(copies[i] == 3 for i in web_ids) / len(web_ids) < 0.7
    # copy r of input part i goes to part-<i>-<r>: the repeats of a document are never adjacent
    names = sorted(f["path"] for f in ds.manifest["files"] if f["path"].startswith("part-"))
    assert {n.split(".")[0].rsplit("-", 1)[1] for n in names} == {"00000", "00001", "00002"}
    for name in names:
        ids = ds.read_table(columns=["id"], files=[ds.file(name)]).column("id").to_pylist()
        assert len(ids) == len(set(ids)), name


def test_rehydration_repeats_survivors_per_the_table(corpus):
    from refinery.tasks.dedup.stage import read_clusters
    from refinery.tasks.mix.stage import FINEWEB2_TABLE, table_copies

    clusters = read_clusters(corpus["dedup"])
    kept = clusters.filter(clusters.column("kept"))
    size_of = dict(zip(kept.column("id").to_pylist(), kept.column("cluster_size").to_pylist()))
    assert set(PLANTED.values()) <= set(size_of.values())
    table = sorted(FINEWEB2_TABLE.items())
    assert table_copies(np.array([1, 2, 3, 4, 5, 99, 100, 999, 1000, 5000]), [list(p) for p in table]).tolist() == \
        [1, 2, 3, 3, 5, 5, 8, 8, 1, 1]   # FineWeb-2's README: 3-4 -> 3, 5-99 -> 5, 100-999 -> 8, 1000+ -> 1

    ds = _mix(corpus, rehydrate="fineweb2")
    copies = _copies_by_id(ds)
    ids = corpus["dedup"].read_table(columns=["id"]).column("id").to_pylist()
    expect = {i: int(table_copies(np.array([size_of.get(i, 1)]), [list(p) for p in table])[0]) for i in ids}
    assert copies == Counter({i: n for i, n in expect.items() if n})
    planted = {size_of[i]: copies[i] for i in size_of if size_of[i] in PLANTED.values()}
    assert planted == {2: 2, 3: 3, 4: 3, 6: 5, 100: 8}
    assert ds.counts["docs_out"] == sum(expect.values())
    assert ds.counts["docs_by_rehydrate_copies"]["8"] == 1   # the 100-copy cluster's survivor

    custom = _mix(corpus, rehydrate="fineweb2", rehydrate_table={1: 1, 2: 4, 50: 0})
    copies = _copies_by_id(custom)
    for i, size in size_of.items():
        assert copies.get(i, 0) == (0 if size >= 50 else 4 if size >= 2 else 1), (i, size)
    assert custom.counts["dropped"]["rehydrate_table"] == 1


def test_rehydration_after_a_later_stage_reads_the_dedup_clusters(corpus, tmp_path):
    """Curate's order: dedup, decontaminate, mix; the clusters still come from dedup."""
    from refinery.tasks.decontam.stage import DecontamConfig, run_decontaminate
    from refinery.tasks.mix.stage import MixConfig, run_mix

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"q": "a benchmark question that no crawled page or module holds word for word"}) + "\n")
    later = run_decontaminate(corpus["store"], corpus["dedup"], DecontamConfig(sources=[str(bench)]))["decontaminate"]
    assert later.counts["docs_out"] == corpus["dedup"].counts["docs_out"]
    ds = run_mix(corpus["store"], later, corpus["dedup"], MixConfig(rehydrate="fineweb2"))["mix"]
    assert [i["stage"] for i in ds.manifest["inputs"]] == ["decontaminate", "mix_tally", "dedup"]
    assert _copies_by_id(ds) == _copies_by_id(_mix(corpus, rehydrate="fineweb2"))


def test_reruns_are_byte_identical_and_the_seed_picks_the_sample(corpus, tmp_path):
    from refinery.tasks.store import Store

    a = _mix(corpus, weights={"web": 0.5, "code": 0.5}, rehydrate="fineweb2", total_tokens=400_000)
    b = _mix(corpus, store=Store(tmp_path / "again"), weights={"web": 0.5, "code": 0.5}, rehydrate="fineweb2",
             total_tokens=400_000)
    assert a.fingerprint == b.fingerprint and a.path != b.path
    files = lambda ds: [(f["path"], f["sha256"]) for f in ds.manifest["files"]]  # noqa: E731
    assert files(a) == files(b) and a.counts == b.counts
    c = _mix(corpus, weights={"web": 0.5, "code": 0.5}, rehydrate="fineweb2", total_tokens=400_000, seed=1)
    assert _copies_by_id(c) != _copies_by_id(a)
    tokens = _tokens_by_source(c)
    assert all(abs(tokens[s] - 200_000) <= 2_000 for s in ("web", "code")), tokens


def test_parameters_parse_from_the_command_line_and_fail_clearly():
    from pydantic import ValidationError

    from refinery.flows.cli import parse_set
    from refinery.flows.curate import CurateParams

    assert not CurateParams(input="x").mix.enabled   # off by default: curate's fingerprints unchanged
    raw = parse_set(["input=x", "mix.weights={web: 0.7, code: 0.3}", "mix.rehydrate=fineweb2",
                     "mix.rehydrate_table={1: 1, 2: 2, 10: 4}"])
    p = CurateParams.model_validate(raw)
    assert p.mix.weights == {"web": 0.7, "code": 0.3} and p.mix.enabled
    assert p.mix.table() == [[1, 1], [2, 2], [10, 4]]
    assert CurateParams.model_validate(parse_set(["input=x", "mix.tokens.web=1000"])).mix.tokens == {"web": 1000}
    for bad, msg in [(["mix.weights={web: 1}", "mix.tokens={web: 5}"], "not both"),
                     (["mix.rehydrate_table={1: 2}"], "mix.rehydrate is none"),
                     (["mix.rehydrate=fineweb2", "mix.rehydrate_table={2: 2}"], "must include 1"),
                     (["mix.weights={web: -1, code: 2}"], ">= 0"),
                     (["mix.total_tokens=10"], "applies to mix.weights"),
                     (["mix.weights=[web]"], "valid dictionary")]:
        with pytest.raises(ValidationError, match=msg):
            CurateParams.model_validate(parse_set(["input=x", *bad]))


def test_bucket_selection_and_corrupt_rows():
    from refinery.tasks.mix.stage import MixConfig, doc_keys, select_buckets, tally_config

    toks = np.array([5, 0, 7, 100, 3, 2, 40], dtype=np.int64)
    assert select_buckets(toks, 12) == (3, [])           # 5 + 0 + 7 fits exactly
    assert select_buckets(toks, 16) == (3, [4])          # 12 + 3 (100 left out; 2 would overshoot)
    assert select_buckets(toks, 17) == (3, [4, 5])
    assert select_buckets(toks, 60) == (3, [4, 5, 6])    # 57: 100 - 3 lands further away
    assert select_buckets(toks, 10_000) == (7, [])
    t = pa.table({"id": ["a", "b", None, "d"], "source": ["web", None, "web", "web"],
                  "text": ["one two three", "x", "y", None]})
    keys = doc_keys(t, tally_config(MixConfig(measure="words")))
    assert keys.valid.tolist() == [True, False, False, False] and keys.tokens.tolist()[:2] == [3, 1]
    assert keys.rehydrate.tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="'source' column"):
        doc_keys(t.drop(["source"]), tally_config(MixConfig()))


def test_tokenize_takes_the_mix_output(corpus):
    from refinery.tasks.tokens.stage import Tokenize, TokenizeConfig
    from refinery.tasks.tokens.tokenizer import TokenizerConfig, tokenizer_stage

    ds = _mix(corpus, tokens={"web": 30_000, "code": 20_000})
    tok = tokenizer_stage.run(corpus["store"], [ds], TokenizerConfig(vocab_size=300, sentinels=0))
    tokens = Tokenize.run(corpus["store"], [ds, tok], TokenizeConfig())
    assert tokens.counts["docs_out"] == ds.counts["docs_out"] > 0


@pytest.mark.slow
def test_curate_flow_mixes_after_dedup(corpus, tmp_path):
    """The curate flow with two tagged sources, weights and rehydration, its parameters given as the
    CLI parses ``--set``: the mix is the last stage and curate's primary output, shares within 1%."""
    from refinery.flows.cli import parse_set
    from refinery.flows.curate import CurateParams, curate_flow

    raw = parse_set([f"workdir={tmp_path / 'work'}",
                     f"ingest.inputs=[{{path: {corpus['web']}, source: web}}, {{path: {corpus['code']}, source: code}}]",
                     "filters.by_source.code=[code]",   # code gets the code rules, not the web chain
                     "mix.weights={web: 0.7, code: 0.3}", "mix.rehydrate=fineweb2"])
    out = curate_flow.run_params(CurateParams.model_validate(raw))
    assert list(out["outputs"])[-2:] == ["mix_tally", "mix"] and out["primary"] == out["outputs"]["mix"]
    c = out["counts"]["mix"]
    total = c["tokens_out"]
    assert abs(c["tokens_out_by_source"]["web"] / total - 0.7) < 0.01
    assert abs(c["tokens_out_by_source"]["code"] / total - 0.3) < 0.01
    assert c["docs_in"] == out["counts"]["dedup"]["docs_out"]
    assert set(c["docs_by_rehydrate_copies"]) >= {"1", "2", "3", "5", "8"}   # the planted clusters' survivors
    assert c["docs_by_rehydrate_copies"]["8"] == 1
