"""Static checks of the deployment and container files (no Docker engine runs on our machines)."""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE_KEYWORDS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                       "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word, rest.strip()))
    return out


def test_dockerfiles_are_well_formed():
    for name in ("cpu.Dockerfile", "gpu.Dockerfile"):
        ins = dockerfile_instructions(ROOT / "docker" / name)
        assert ins[0][0] == "FROM", name
        assert {w for w, _ in ins} <= DOCKERFILE_KEYWORDS, name
        for word, rest in ins:
            if word == "COPY":
                *sources, _dest = rest.split()
                for src in sources:
                    assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
            if word == "CMD":
                assert isinstance(json.loads(rest), list), f"{name}: CMD should be an exec-form JSON array"
        runs = " ".join(rest for w, rest in ins if w == "RUN")
        assert "torch==2.13.0" in runs and "-c constraints.txt" in runs, name


def test_compose_services_volumes_and_builds():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "server", "cpu-worker", "gpu-worker"} <= set(services)
    assert "postgresql+asyncpg://" in services["server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in compose["volumes"], f"{name}: volume {vol}"
        if "build" in svc:
            ctx = (ROOT / "docker" / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"]["dockerfile"]).is_file()
    gpu = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    # the workers share one data volume
    assert services["cpu-worker"]["volumes"] == services["gpu-worker"]["volumes"]


def test_prefect_yaml_entrypoints_and_pools():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    pools = set()
    for dep in spec["deployments"]:
        file, func = dep["entrypoint"].split(":")
        module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, func), "params_cls"), dep["entrypoint"]
        pools.add(dep["work_pool"]["name"])
        for trig in dep.get("triggers", []):
            assert trig["expect"][0].startswith("refinery.") and trig["expect"][0].endswith(".completed")
            assert trig["parameters"]["input"] == "{{ event.payload.output }}"
    assert pools == {"cpu", "gpu"}


def test_gpu_job_templates():
    k8s = json.loads((ROOT / "deployments" / "k8s-gpu-job-template.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert "gpus" in k8s["variables"]["properties"]
    docker = yaml.safe_load((ROOT / "deployments" / "gpu-docker-job-variables.yaml").read_text())
    req = docker["container_create_kwargs"]["device_requests"][0]
    assert req["capabilities"] == [["gpu"]] and req["count"] == -1


def test_every_trigger_listens_to_an_event_its_flow_emits():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        for trig in dep.get("triggers", []):
            upstream = trig["match"]["prefect.resource.name"]
            assert trig["expect"] == [f"refinery.{upstream}.completed"]
            source = (ROOT / "flows" / f"{upstream}.py").read_text()
            assert f'emit_completed("{upstream}"' in source, f"flows/{upstream}.py never emits its completion event"
