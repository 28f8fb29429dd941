"""The held-out split: deterministic by document id, bounded, published as its own documents dataset,
skipped by tokenize, named in the token manifest and found by evaluate through the lineage."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest


def _docs(root, n: int, parts: int = 3, name: str = "docs", with_ids: bool = True):
    from refinery.tasks.store import Store

    texts = [f"Document number {i} talks about {'rivers' if i % 2 else 'mountains'} and {i * 7} stones." for i in range(n)]
    texts[5] = ""   # never held out: there is nothing to score
    b = Store(root).builder(name, hashlib.sha1(f"{n}{parts}{with_ids}".encode()).hexdigest()[:16])
    for p in range(parts):
        lo, hi = p * n // parts, (p + 1) * n // parts
        cols = {"text": texts[lo:hi], "source": ["test"] * (hi - lo)}
        if with_ids:
            cols = {"id": [f"doc-{i}" for i in range(lo, hi)], **cols}
        b.write_table(f"part-{p:05d}.parquet", pa.table(cols))
    return b.publish(version="1", config={}, inputs=[], counts={"docs_out": n})


def _ids(ds) -> list[str]:
    return [v for t in ds.iter_tables(columns=["id"]) for v in t.column(0).to_pylist()]


def test_the_choice_depends_on_ids_only_and_respects_the_bounds():
    from refinery.tasks.tokens.holdout import HoldoutConfig, choose, scores

    ids = [f"doc-{i}" for i in range(10_000)]
    s = scores(ids, "salt")
    assert (s == scores(list(reversed(ids)), "salt")[::-1]).all() and ((0 <= s) & (s < 1)).all()
    cfg = HoldoutConfig(fraction=0.01, min_docs=5, max_docs=1000)
    picked = set(choose(s, cfg).tolist())
    assert 70 < len(picked) < 130 and all(s[i] < 0.01 for i in picked)                  # ~1% by hash
    assert len(choose(s, cfg.model_copy(update={"max_docs": 20}))) == 20                  # capped
    assert len(choose(s[:100], cfg)) == 5                                                 # topped up
    assert len(choose(s[:6], cfg)) == 3                                                   # never over half
    assert len(choose(s, cfg.model_copy(update={"fraction": 0.0}))) == 0                  # disabled
    more = scores(ids + [f"new-{i}" for i in range(500)], "salt")                         # stable when docs are added
    assert picked <= set(choose(more, cfg.model_copy(update={"max_docs": 10_000})).tolist())


@pytest.mark.parametrize("with_ids", [True, False])
def test_tokenize_skips_the_held_out_documents_and_names_them(tmp_path, tiny_tokenizer_dir, with_ids):
    from refinery.tasks.eval.lineage import heldout_of
    from refinery.tasks.tokens.holdout import HoldoutConfig, holdout
    from refinery.tasks.tokens.shards import read_docs_index
    from refinery.tasks.tokens.stage import Tokenize, TokenizeConfig
    from refinery.tasks.tokens.tokenizer import TokenizerConfig, tokenizer_stage

    root = tmp_path / "work"
    docs = _docs(root, 300, with_ids=with_ids)
    held = holdout.run(root, [docs], HoldoutConfig(fraction=0.05, min_docs=4, max_docs=100))
    assert holdout.run(root, [docs], HoldoutConfig(fraction=0.05, min_docs=4, max_docs=100)).path == held.path
    held_ids = _ids(held)
    assert 4 <= len(held_ids) == held.counts["docs_out"] <= 30 and len(set(held_ids)) == len(held_ids)
    assert all(Path(f).name.startswith("part-") for f in held.files) and held.read_table().num_rows == len(held_ids)
    if with_ids:
        assert set(held_ids) <= set(_ids(docs)) and "doc-5" not in held_ids
    tok = tokenizer_stage.run(root, [], TokenizerConfig(path=str(tiny_tokenizer_dir)))
    cfg = TokenizeConfig(batch_docs=32)
    full = Tokenize.run(root, [docs, tok], cfg)
    split = Tokenize.run(root, [docs, tok, held], cfg)
    assert split.counts["held_out"] == len(held_ids)
    assert split.counts["docs_out"] == full.counts["docs_out"] - len(held_ids)
    trained = {i for f in split.manifest["files"] if f.get("index")
               for i in read_docs_index(os.path.join(split.path, f["index"])).column("id").to_pylist()}
    assert trained and not trained & set(held_ids)
    assert split.manifest["holdout"] == {"path": held.path, "fingerprint": held.fingerprint, "docs": len(held_ids)}
    assert heldout_of(split.path) == held.path
    assert "holdout" not in full.manifest
    # the tokenizer is not trained on them either (one empty text is skipped anyway)
    trained_tok = tokenizer_stage.run(root, [docs, held], TokenizerConfig(vocab_size=300, sentinels=0))
    assert trained_tok.counts["train_docs"] == 300 - 1 - len(held_ids)


def test_tokenize_flow_publishes_the_held_out_split(tmp_path, tiny_tokenizer_dir, capsys):
    import json

    from refinery.flows.cli import main

    docs = _docs(tmp_path / "docs", 120)
    assert main(["run", "tokenize", "--workdir", str(tmp_path / "work"), "--set", f"input={docs.path}",
                 "--set", f"tokenizer.path={tiny_tokenizer_dir}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(out["outputs"]) == ["holdout", "tokenizer", "tokenize"] and out["primary"] == out["outputs"]["tokenize"]
    assert out["counts"]["holdout"]["docs_out"] == 8 == out["counts"]["tokenize"]["held_out"]   # 0.5% of 120 -> min_docs
    assert np.isclose(out["counts"]["tokenize"]["docs_out"], 120 - 1 - 8)                       # one empty text
