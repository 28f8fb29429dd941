"""``--progress=always|never|auto`` reaches every bar the stages draw, curation's included (README:
"Quieter logs"). tqdm's own ``disable=None`` hides a bar whenever stderr is not a terminal, and an
explicit argument wins over ``TQDM_DISABLE``, so the curation bars used to stay hidden under
``--progress=always`` (a log file, a CI console) while the training bars showed."""
from __future__ import annotations

import pyarrow as pa
import pytest

from refinery.flows.console import set_progress

DOCS = pa.table({"id": ["a", "b"], "text": ["A sentence of plain English prose, with the usual words in it. " * 8] * 2,
                 "url": ["https://example.com/a", "https://example.com/b"], "lang": ["en", "en"]})


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    monkeypatch.setenv("REFINERY_PROGRESS", "auto")   # set_progress writes both; restored after the test
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def _filter_bar(capsys) -> str:
    from refinery.tasks.filters import FilterConfig
    from refinery.tasks.filters import filter_table

    capsys.readouterr()
    filter_table(DOCS, FilterConfig(), progress="filter part-7")
    return capsys.readouterr().err


def _ingest_bar(capsys, tmp_path) -> str:
    from refinery.tasks.demo.crawl import make_demo_crawl
    from refinery.tasks.ingest.stage import IngestConfig, InputSpec, run_ingest
    from refinery.tasks.store import Store

    make_demo_crawl(tmp_path / "crawl", seed=0, n_pages=30, n_files=1)
    capsys.readouterr()
    run_ingest(Store(tmp_path / "w"), IngestConfig(inputs=[InputSpec(path=str(tmp_path / "crawl" / "*.warc.gz"),
                                                                     source="demo")]))
    return capsys.readouterr().err


@pytest.mark.parametrize("mode, shown", [("always", True), ("never", False), ("auto", False)])
def test_progress_mode_reaches_the_curation_bars(capsys, mode, shown):
    """stderr is captured here (not a terminal): auto hides the bar, always shows it, never hides it."""
    assert set_progress(mode) is shown
    assert ("filter part-7" in _filter_bar(capsys)) is shown


def test_quiet_hides_the_curation_bars_whatever_the_mode(capsys):
    assert set_progress("always", quiet=True) is False
    assert "filter part-7" not in _filter_bar(capsys)


def test_always_reaches_a_sharded_stage_run_by_the_runtime(capsys, tmp_path):
    """The ingest stage's per-file bar (named after the file), drawn in the runtime's worker thread."""
    set_progress("always")
    assert "demo-00000.warc.gz" in _ingest_bar(capsys, tmp_path)
