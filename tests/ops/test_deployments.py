"""A real Prefect server on loopback: deploy from deployments/prefect.yaml, run curate through a
process worker with `prefect deployment run`, check its dataset and artifacts, and check that its
completion event starts the tokenize deployment on curate's output."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ops.prefect_server import PrefectStack

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = PrefectStack(tmp_path_factory.mktemp("prefect-home"), db_url=os.environ.get("REFINERY_TEST_PG_URL"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def deployed(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("shared-work")
    env = {"REFINERY_WORKDIR": str(work), "REFINERY_CRAWL_INPUT": "", "REFINERY_SFT_DATA": ""}
    stack.env.update(env)
    stack.cli("work-pool", "create", "cpu", "--type", "process")
    stack.cli("work-pool", "create", "gpu", "--type", "process")
    stack.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    stack.background("worker-cpu", "worker", "start", "--pool", "cpu", "--type", "process")
    return work


def test_parameter_schema_has_descriptions_and_defaults(stack, deployed):
    deps = stack.api_post("/deployments/filter", {"limit": 50})
    by_flow = {}
    for d in deps:
        flow = stack.api_get(f"/flows/{d['flow_id']}")
        by_flow[(flow["name"], d["name"])] = d
    assert {("curate", "snapshot"), ("tokenize", "default"), ("pretrain", "default"),
            ("finetune", "default"), ("align", "default"), ("pipeline", "default")} <= set(by_flow)
    props = by_flow[("curate", "snapshot")]["parameter_openapi_schema"]["properties"]
    assert "glob" in props["input"]["description"]
    assert props["task_runner"]["default"] == "threads"
    assert by_flow[("curate", "snapshot")]["schedules"][0]["schedule"]["cron"] == "0 6 * * *"
    assert by_flow[("tokenize", "default")]["work_pool_name"] == "cpu"
    assert by_flow[("pretrain", "default")]["work_pool_name"] == "gpu"


def test_deployment_run_curate_then_event_starts_tokenize(stack, deployed, tmp_path):
    from tasks.demo.crawl import make_demo_crawl

    crawl = make_demo_crawl(tmp_path / "crawl", seed=1, n_pages=60)
    pattern = str(Path(crawl[0]).parent / "*.warc.gz")
    stack.cli("deployment", "run", "curate/snapshot", "--param", f"input={pattern}",
              "--param", f"workdir={deployed}", "--param", "source=test-snapshot")
    (run,) = stack.wait_flow_run("curate", timeout=400)
    assert run["state_type"] == "COMPLETED", run["state"]
    manifests = sorted(Path(deployed).glob("dedup/*/manifest.json"))
    assert manifests, list(Path(deployed).rglob("manifest.json"))
    dedup = json.loads(manifests[0].read_text())
    assert dedup["counts"]["docs_out"] > 0

    artifacts = stack.api_post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    keys = {a["key"] for a in artifacts}
    assert "curate-stages" in keys

    (tok,) = stack.wait_flow_run("tokenize", timeout=400)
    assert tok["parameters"]["input"] == str(manifests[0].parent)
    assert tok["state_type"] == "COMPLETED", tok["state"]
    assert list(Path(deployed).glob("tokenize/*/manifest.json"))
