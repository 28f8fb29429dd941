"""Shared storage over S3 (moto's server on loopback): dataset roots and Prefect results on an
s3:// URL; a second worker process with an empty local disk reuses every cached stage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refinery_testlib import moto_s3, read_exec_log

ROOT = Path(__file__).resolve().parents[2]
REFINERY = str(Path(sys.executable).parent / "refinery")


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        yield endpoint


def test_second_worker_with_empty_disk_reuses_cached_stages(tmp_path, s3_endpoint, shared_data, exec_log):
    import boto3

    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_endpoint}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket="refinery")
    rows = (shared_data / "quality" / "c4-demo.jsonl").read_text().splitlines()[:80]
    s3.put_object(Bucket="refinery", Key="inputs/c4.jsonl", Body="\n".join(rows).encode())

    def worker(name: str) -> dict:
        home = tmp_path / name  # each worker has its own empty disk: HOME, Prefect database, cwd
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "AWS_"))}
        env.update(aws, HOME=str(home), PREFECT_HOME=str(home / ".prefect"), REFINERY_EXEC_LOG=str(exec_log),
                   REFINERY_CACHE=str(home / "cache"))
        r = subprocess.run([REFINERY, "run", "curate", "--set", "input=s3://refinery/inputs/c4.jsonl",
                            "--set", "source=c4", "--workdir", "s3://refinery/work", "--json"],
                           env=env, cwd=home, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = worker("worker-a")
    n = len(read_exec_log(exec_log))
    assert n > 0 and all(p.startswith("s3://refinery/work/") for p in first["outputs"].values())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="refinery", Prefix="work/")["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys)
    assert any(k.startswith("work/.prefect-results/") for k in keys)  # Prefect results on S3 too

    second = worker("worker-b")
    assert second["outputs"] == first["outputs"]
    assert len(read_exec_log(exec_log)) == n  # no stage work on the second worker
