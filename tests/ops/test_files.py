"""Static checks of the deployment and container files (no Docker engine runs on our machines)."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
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
    assert services["server"]["environment"]["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
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
        module, func = dep["entrypoint"].split(":")
        assert module.startswith("refinery.flows."), f"{dep['entrypoint']}: a module path, not a file in a checkout"
        assert hasattr(getattr(importlib.import_module(module), func), "params_cls"), dep["entrypoint"]
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


def test_deployments_load_without_the_checkout(tmp_path):
    """A worker runs a flow in a folder of its own (a process worker: a temporary one) and may not
    have REFINERY_PROJECT_DIR: the flows load from the installed package, with no pull step."""
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert spec["pull"] == [] and "REFINERY_PROJECT_DIR" not in (ROOT / "deployments" / "prefect.yaml").read_text()
    entrypoints = [d["entrypoint"] for d in spec["deployments"]]
    code = ("import sys\nfrom prefect.flows import load_flow_from_entrypoint\n"
            "for e in sys.argv[1:]:\n    print(load_flow_from_entrypoint(e, use_placeholder_flow=False).name)")
    env = {k: v for k, v in os.environ.items() if k not in ("REFINERY_PROJECT_DIR", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", code, *entrypoints], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [e.split(":")[1].removesuffix("_flow") for e in entrypoints]


def _packages_in_pyproject() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_pyproject_packages_are_every_package_folder():
    """Every folder of flows/ and tasks/ with an __init__.py is listed (as refinery.*), and nothing else."""
    found = set()
    for top in ("flows", "tasks"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            if "__pycache__" not in rel:
                found.add(".".join(("refinery", *rel)))
    assert sorted(_packages_in_pyproject()) == sorted(found)


def test_installed_distribution_has_no_top_level_tasks_or_flows():
    """`pip show -f refinery` equivalent on the installed distribution (site-packages, not a stale
    egg-info in the checkout): its only top-level name is refinery, and so is the command's."""
    import sysconfig
    from importlib import metadata

    (dist,) = metadata.distributions(name="refinery", path=[sysconfig.get_paths()["purelib"]])
    assert (dist.read_text("top_level.txt") or "").split() == ["refinery"]
    assert not [f for f in dist.files or [] if str(f).split("/")[0] in ("tasks", "flows")]
    assert dist.entry_points.select(group="console_scripts")["refinery"].value == "refinery.flows.cli:main"


def test_wheel_puts_every_module_under_refinery(tmp_path):
    """A wheel built from the sources holds flows/ and tasks/ as refinery/flows and refinery/tasks,
    every module of both, and no top-level tasks or flows."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for top in ("flows", "tasks"):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "wheel").glob("refinery-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert {n.split("/")[0] for n in names} == {"refinery", whl.name.split("-py")[0] + ".dist-info"}
    modules = {f"refinery/{p.relative_to(src).as_posix()}" for top in ("flows", "tasks")
               for p in (src / top).rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))[:10]
