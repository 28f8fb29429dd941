"""A real Prefect server, work pools, deployments and workers on loopback, for the ops tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectStack:
    def __init__(self, home: Path, db_url: str | None = None, extra_env: dict | None = None):
        self.home = home
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update({
            "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PREFECT_UI_API_URL": self.api,
            "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true", "PYTHONPATH": str(ROOT),
            "REFINERY_PROJECT_DIR": str(ROOT), "PATH": f"{BIN}:{os.environ['PATH']}",
            **(extra_env or {}),
        })
        if db_url:
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = db_url
        self.procs: list[subprocess.Popen] = []
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def background(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        p = subprocess.Popen([str(BIN / "prefect"), *args], env=self.env, cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def start(self, timeout: float = 90) -> "PrefectStack":
        self.background("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port))
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("prefect server did not become healthy:\n" + (self.logs / "server.log").read_text()[-3000:])

    def cli(self, *args: str, timeout: float = 300, env: dict | None = None) -> str:
        r = subprocess.run([str(BIN / "prefect"), *args], env={**self.env, **(env or {})}, cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        return r.stdout

    def api_post(self, path: str, body: dict | list) -> list | dict | None:
        req = urllib.request.Request(f"{self.api}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            return json.loads(data) if data else None   # 204 No Content (POST /events)

    def api_get(self, path: str):
        with urllib.request.urlopen(f"{self.api}{path}", timeout=30) as r:
            return json.loads(r.read())

    def flow_runs(self, flow_name: str) -> list[dict]:
        return self.api_post("/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}, "limit": 50})

    def wait_flow_run(self, flow_name: str, timeout: float = 300, count: int = 1) -> list[dict]:
        deadline = time.time() + timeout
        runs: list[dict] = []
        while time.time() < deadline:
            runs = self.flow_runs(flow_name)
            final = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
            if len(final) >= count:
                return final
            time.sleep(1)
        raise TimeoutError(f"no finished {flow_name} run after {timeout}s: {[r['state_type'] for r in runs]}\n"
                           + "\n".join(p.name + ":\n" + p.read_text()[-3000:] for p in self.logs.glob("*.log")))

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):  # workers want SIGINT twice
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        p.wait(timeout=5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
