"""Decontamination: GSM8K questions planted in a crawl are found (verbatim and inside longer pages),
real crawls (the shared WARC files, the demo crawl) are not flagged, the index is built once, and
curate runs the stage when sources are given."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from refinery_testlib import read_exec_log, shared_file

ROOT = Path(__file__).resolve().parents[2]
REFINERY = str(Path(sys.executable).parent / "refinery")
GSM8K = "eval/gsm8k-test.jsonl"
C4 = "quality/c4-demo.jsonl"
WARCS = ["warcfile.warc.gz", "clueweb-quirk.warc.gz", "sample-0000.warc.gz", "sample-0001.warc.gz",
         "whirlwind.warc.gz", "jwarc-cc.warc.gz", "example.warc.gz"]


def test_normalised_ngrams_ignore_case_punctuation_and_spacing():
    from refinery.tasks.decontam.ngrams import NgramIndex, ngram_hashes, word_hashes, words

    a = "Janet’s ducks lay 16 eggs per day. She eats three for breakfast!"
    b = "JANET’S   ducks lay 16 eggs, per day -- she eats three\nfor breakfast"
    assert words(a) == words(b) == ["janet", "s", "ducks", "lay", "16", "eggs", "per", "day", "she", "eats",
                                    "three", "for", "breakfast"]
    ha, hb = (ngram_hashes(word_hashes(words(t)), 5) for t in (a, b))
    assert len(ha) == 9 and (ha == hb).all() and len(set(ha.tolist())) == 9
    assert len(ngram_hashes(word_hashes(words("too short")), 5)) == 0
    index = NgramIndex.build(5, [("x", [ha[:3]]), ("y", [ha[2:5]])])
    assert index.names == ["x", "y"] and len(index.hashes) == 5 and index.nbytes == 50
    assert index.lookup(ha).tolist() == [0, 0, 0, 1, 1, -1, -1, -1, -1]   # shared n-gram: the first benchmark


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture
def planted(tmp_path, shared_data) -> dict:
    """A crawl dump of real C4 pages: 20 GSM8K questions alone (verbatim), 20 inside a longer page
    (between real paragraphs), and 60 clean pages."""
    questions = [json.loads(line)["question"] for line in shared_file(shared_data, GSM8K).read_text().splitlines()]
    pages = [json.loads(line)["text"] for line in shared_file(shared_data, C4).read_text().splitlines()]
    rows = [{"text": q, "url": f"https://plant.example/verbatim/{i}"} for i, q in enumerate(questions[100:120])]
    for i, q in enumerate(questions[200:220]):
        rows.append({"text": f"{pages[i]}\n{q}\n{pages[i + 20]}", "url": f"https://plant.example/inside/{i}"})
    rows += [{"text": p, "url": f"https://clean.example/{i}"} for i, p in enumerate(pages[40:100])]
    return {"file": _jsonl(tmp_path / "crawl.jsonl", rows), "verbatim": questions[100:120],
            "inside": questions[200:220]}


def _ingest(store, path: str, source: str):
    from refinery.tasks.ingest.stage import Ingest, IngestConfig, InputSpec

    return Ingest.run(store, [], IngestConfig(inputs=[InputSpec(path=path, source=source)]))


def test_planted_gsm8k_questions_are_found_and_real_crawls_are_not(tmp_path, shared_data, planted, exec_log):
    import pyarrow.parquet as pq

    from refinery.tasks.decontam.stage import DecontamConfig, read_exclusions, run_decontaminate
    from refinery.tasks.store import Store

    store = Store(tmp_path / "work")
    gsm8k = str(shared_file(shared_data, GSM8K))
    cfg = DecontamConfig(sources=[gsm8k])
    docs = _ingest(store, str(planted["file"]), "planted")
    out = run_decontaminate(store, docs, cfg)
    ds, index = out["decontaminate"], out["decontam_index"]
    ex = read_exclusions(ds).to_pylist()
    urls = {e["url"] for e in ex}
    assert {f"https://plant.example/verbatim/{i}" for i in range(20)} <= urls      # every verbatim plant
    assert {f"https://plant.example/inside/{i}" for i in range(20)} <= urls        # and every embedded one
    assert not any(u.startswith("https://clean.example/") for u in urls)
    assert all(e["rule"] == "decontaminate" and e["reason"] == "gsm8k-test" and len(e["value"].split()) == 13
               for e in ex)
    assert ds.counts["by_benchmark"] == {"gsm8k-test": 40} and ds.counts["docs_out"] == docs.counts["docs_out"] - 40
    assert index.counts["texts"] == 2 * 1319 and index.manifest["stats"]["bytes_per_ngram"] == 10.0
    assert ds.manifest["stats"]["table"] == [{"benchmark": "gsm8k-test", "documents": 40,
                                             "pct_of_input": round(100 * 40 / docs.counts["docs_out"], 4)}]
    assert all(not Path(f["path"]).name.startswith("part-") for f in ds.manifest["files"] if "/" in f["path"])

    # drop_paragraph: the question's line goes, the page around it stays
    para = run_decontaminate(store, docs, cfg.model_copy(update={"policy": "drop_paragraph"}))["decontaminate"]
    kept = pq.read_table(para.files[0]).to_pylist() if len(para.files) == 1 else para.read_table().to_pylist()
    inside = [r["text"] for r in kept if r["url"].startswith("https://plant.example/inside/")]
    assert len(inside) == 20 and not any(q in t for q, t in zip(planted["inside"], inside))
    assert para.counts["modified"] == 20 and para.counts["dropped"] == 20

    # real crawls: the shared WARC files and the demo crawl have no GSM8K n-gram
    from refinery.tasks.demo.crawl import make_demo_crawl

    warc_dir = tmp_path / "warc"
    warc_dir.mkdir()
    for name in WARCS:
        os.symlink(shared_file(shared_data, f"warc/{name}"), warc_dir / name)
    make_demo_crawl(tmp_path / "demo", seed=3, n_pages=60, n_files=1)
    for path, source in ((f"{warc_dir}/*.warc.gz", "cc"), (f"{tmp_path / 'demo'}/*.warc.gz", "demo")):
        real = _ingest(store, path, source)
        assert real.counts["docs_out"] > 20
        clean = run_decontaminate(store, real, cfg)["decontaminate"]
        assert clean.counts["dropped"] == 0 and clean.counts["docs_out"] == real.counts["docs_out"], source
        assert read_exclusions(clean).num_rows == 0
    # the benchmark index was built once, then reused by every run
    assert sum(line.startswith("decontam_index ") for line in read_exec_log(exec_log)) == 1


def test_lm_eval_task_files_are_benchmarks_too(tmp_path):
    """A local lm-eval task (YAML): its prompts and choices are indexed; fields filter files."""
    from refinery.tasks.decontam.benchmarks import benchmark_texts, source_name

    task = ROOT / "configs" / "eval" / "mc_local.yaml"
    texts = benchmark_texts(str(task), [])
    assert source_name(str(task)) == "mc_local"
    assert "Question: How many days are there in a week?\nAnswer:" in texts and "seven" in texts
    f = _jsonl(tmp_path / "b.jsonl", [{"q": "a question here", "a": "an answer", "k": 3, "c": ["x y", "z"]}])
    assert benchmark_texts(str(f), []) == ["a question here", "an answer", "x y", "z"]
    assert benchmark_texts(str(f), ["q"]) == ["a question here"]
    with pytest.raises(ValueError, match="no such file"):
        benchmark_texts(str(tmp_path / "missing.jsonl"), [])


@pytest.mark.slow
def test_curate_runs_decontaminate_as_its_last_stage(tmp_path, shared_data, planted):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    gsm8k = shared_file(shared_data, GSM8K)
    args = [REFINERY, "run", "curate", "--workdir", str(tmp_path / "work"), "--set", f"input={planted['file']}",
            "--set", f"decontaminate.sources=[{gsm8k}]", "--json"]
    r = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(out["outputs"])[-1] == "decontaminate"
    assert out["primary"] == out["outputs"]["decontaminate"]
    c = out["counts"]["decontaminate"]
    assert c["by_benchmark"]["gsm8k-test"] >= 20 and c["dropped"] == c["by_benchmark"]["gsm8k-test"]
