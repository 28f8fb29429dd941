"""The curate flow on a real local Dask cluster (several worker processes) gives byte-identical
datasets to the local thread-pool run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)


def file_hashes(outputs: dict) -> dict:
    out = {}
    for stage, path in outputs.items():
        m = json.loads((Path(path) / "manifest.json").read_text())
        out[stage] = [(f["path"], f["sha256"]) for f in m["files"]]
    return out


def test_dask_cluster_matches_local_run(tmp_path):
    from distributed import LocalCluster

    from refinery.flows.curate import CurateParams, curate_flow
    from refinery.tasks.demo.crawl import make_demo_crawl

    files = make_demo_crawl(tmp_path / "crawl", seed=3, n_pages=120)
    glob = str(Path(files[0]).parent / "*.warc.gz")
    local = curate_flow.run_params(CurateParams(input=glob, workdir=str(tmp_path / "local")))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dist = curate_flow.run_params(CurateParams(input=glob, workdir=str(tmp_path / "dask"),
                                                   task_runner=cluster.scheduler_address))
    assert [Path(p).name for p in dist["outputs"].values()] == [Path(p).name for p in local["outputs"].values()]
    assert file_hashes(dist["outputs"]) == file_hashes(local["outputs"])
    assert dist["counts"] == local["counts"]
