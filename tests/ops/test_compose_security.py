"""Static checks that the self-hosted server is locked down (no Docker engine runs here): the
UI/API is published on 127.0.0.1 by default and needs an auth string from docker/.env, the
PostgreSQL password is a docker secret, and the images run as an unprivileged user."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.ops.test_files import dockerfile_instructions

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
_VAR = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` with ``env`` (an unset or empty
    required variable raises, as compose refuses to start)."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        got = env.get(name, "")
        if op == "?" and not got:
            raise LookupError(f"{name}: {arg}")
        return got or (arg if op == "-" else "")
    return _VAR.sub(one, value)


def env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def test_ui_and_api_bind_to_localhost_by_default():
    services = compose()["services"]
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"server"}, "only the server publishes a port; PostgreSQL stays internal"
    for spec in published["server"]:
        for env in ({}, env_example()):            # compose defaults, and a docker/.env copied from the example
            host_ip, host_port, container_port = interpolate(str(spec), env).split(":")
            assert host_ip == "127.0.0.1" and container_port == "4200", spec
    assert "--host" in " ".join(services["server"]["command"])   # 0.0.0.0 inside; only the mapping is public


def test_api_needs_the_auth_string_from_the_env_file():
    c = compose()
    server_env = c["services"]["server"]["environment"]
    required = server_env["PREFECT_SERVER_API_AUTH_STRING"]
    assert _VAR.fullmatch(required) and _VAR.fullmatch(required).group(2) == "?", "required, no default"
    with pytest.raises(LookupError, match="docker/.env"):
        interpolate(required, env_example())      # the example ships it empty: compose will not start
    assert interpolate(required, {"PREFECT_AUTH_STRING": "u:p"}) == "u:p"
    for name in ("cpu-worker", "gpu-worker"):
        env = c["services"][name]["environment"]
        assert env["PREFECT_API_AUTH_STRING"] == required, name       # clients send the same string
        assert env["PREFECT_API_URL"].startswith("http://server:4200/")
    assert "PREFECT_AUTH_STRING" in env_example()
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_postgres_password_is_a_docker_secret():
    c = compose()
    text = (DOCKER / "compose.yaml").read_text()
    pg = c["services"]["postgres"]
    assert "POSTGRES_PASSWORD" not in pg["environment"]
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "postgres_password" in pg["secrets"] and "postgres_password" in c["services"]["server"]["secrets"]
    secret_file = c["secrets"]["postgres_password"]["file"]
    assert (DOCKER / secret_file).parent == DOCKER / "secrets"
    ignored = (DOCKER / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignored                          # the password file is never committed
    # Prefect gets the password from the secret at start, as its own setting (no URL with it)
    server = c["services"]["server"]
    assert "PREFECT_SERVER_DATABASE_PASSWORD=\"$(cat /run/secrets/postgres_password)\"" in \
        " ".join(server["command"]).replace("$$", "$")
    assert server["environment"]["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "no credentials inside a URL"
    for name, svc in c["services"].items():       # no password value in any environment
        for key in svc.get("environment", {}):
            assert "PASSWORD" not in key or key.endswith("_FILE"), f"{name}: {key}"


@pytest.mark.parametrize("name", ["cpu.Dockerfile", "gpu.Dockerfile"])
def test_images_run_as_an_unprivileged_user(name):
    ins = dockerfile_instructions(DOCKER / name)
    users = [i for i, (w, _) in enumerate(ins) if w == "USER"]
    assert users, f"{name}: no USER"
    last = ins[users[-1]][1]
    assert last not in ("root", "0") and not last.startswith(("root:", "0:")), last
    runs_after = [rest for w, rest in ins[users[-1]:] if w == "RUN"]
    assert not runs_after, "installs happen before dropping privileges"
    creates = " ".join(rest for w, rest in ins if w == "RUN")
    assert "useradd" in creates and last in creates
    assert "chown" in creates and "/data" in creates   # the data volume is writable by that user
    assert [w for w, _ in ins][-1] == "CMD" and users[-1] < len(ins) - 1


def test_compose_services_keep_the_image_user():
    for name, svc in compose()["services"].items():
        assert svc.get("user") in (None,) or str(svc["user"]) not in ("root", "0"), name
        assert not svc.get("privileged"), name


def test_every_container_is_locked_down():
    """No capabilities beyond what a service's entrypoint needs, no privilege gain (setuid binaries),
    a read-only root filesystem with a tmpfs /tmp, and the writable places (HOME, Prefect's home)
    there or on the data volume."""
    services = compose()["services"]
    for name, svc in services.items():
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"], name
    assert set(services["postgres"].get("cap_add", [])) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"}
    assert not any(svc.get("cap_add") for name, svc in services.items() if name != "postgres")
    for name in ("server", "cpu-worker", "gpu-worker"):
        env = services[name]["environment"]
        assert env["HOME"].startswith("/tmp/") and env["PREFECT_HOME"].startswith(env["HOME"]), name


def test_base_images_are_pinned_by_digest():
    digest = re.compile(r"@sha256:[0-9a-f]{64}$")
    for name in ("cpu.Dockerfile", "gpu.Dockerfile"):
        froms = [rest.split()[0] for w, rest in dockerfile_instructions(DOCKER / name) if w == "FROM"]
        assert froms and all(digest.search(f) for f in froms), (name, froms)
    for name, svc in compose()["services"].items():
        if "build" not in svc and not svc["image"].startswith("refinery-"):   # pulled, not built here
            assert digest.search(svc["image"]), name


def test_kubernetes_jobs_do_not_carry_the_auth_string():
    """Prefect writes its worker's settings into every flow run's Job (readable by whoever can read
    Jobs); the template drops the auth string there and the pod reads it from a Secret."""
    import json
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings
    from prefect.workers.base import BaseJobConfiguration

    k8s = json.loads((ROOT / "deployments" / "k8s-gpu-job-template.json").read_text())
    assert k8s["job_configuration"]["env"] == "{{ env }}"   # the Job's env is the variable's value
    default_env = k8s["variables"]["properties"]["env"]["default"]
    with temporary_settings(updates={PREFECT_API_AUTH_STRING: "refinery:hush"}):
        assert "PREFECT_API_AUTH_STRING" in BaseJobConfiguration._base_environment()   # the worker has it
        cfg = BaseJobConfiguration(env=default_env, command=None)
        cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="run", flow_id=uuid.uuid4()))
    assert "PREFECT_API_AUTH_STRING" not in cfg.env and "hush" not in json.dumps(cfg.env)
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "{{ auth_secret }}"}}]
