"""A deploy-time check of the deployments' event triggers (a build step of ``deployments/prefect.yaml``).

A trigger starts its deployment with the parameters it names (templated from the event, such as
``{{ event.payload.output }}``, or from the environment at deploy time, such as
``{{ $REFINERY_SFT_DATA }}``) over the deployment's own ``parameters``. Prefect checks none of them
when it deploys: a trigger that cannot supply a required parameter, names one the flow does not
have, or reads an environment variable that is not set (Prefect then keeps the placeholder text as
the value) makes a run that fails only when an event starts it, possibly days later on a GPU.
:func:`check_triggers` refuses such a deployment while ``prefect deploy`` runs, before it is created::

    deployments:
      - name: default
        entrypoint: refinery.flows.finetune:finetune_flow
        build:
          - refinery.flows.deploy.check_triggers:
              deployment: finetune/default
        triggers: ...

A build step sees its own arguments only, after Prefect has templated them (an ``{{ event.* }}``
placeholder would vanish), so the check reads the deployment from the prefect file itself: the one
``prefect deploy --prefect-file`` names (else ``prefect.yaml`` in the working folder, Prefect's
default), or ``prefect_file`` when the step gives it.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

# Prefect's deploy-time placeholders: `{{ $ENV_VAR }}` and `{{ name.path }}` (step outputs, variables,
# blocks); a trigger's `{{ event.* }}` ones are filled in by the server when the event arrives.
_PLACEHOLDER = re.compile(r"\{\{\s*([\w\.\-\[\]$]+)\s*\}\}")


class TriggerParameterError(ValueError):
    """A deployment whose trigger would start runs that cannot work."""


def check_triggers(deployment: str, prefect_file: str | None = None) -> dict:
    """Build step: refuse ``deployment`` (``FLOW/NAME``) unless every one of its event triggers
    gives every required parameter of the flow (itself or through the deployment's ``parameters``),
    names only parameters the flow has, and reads only environment variables that are set.
    Returns an empty dict (no step outputs)."""
    path = Path(prefect_file) if prefect_file else _prefect_file_of_this_command()
    problems = trigger_problems(load_deployment(path, deployment), deployment, os.environ)
    if problems:
        raise TriggerParameterError(
            f"refusing to deploy {deployment} (from {path}): its trigger would start runs that fail\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nSet what it reads before `prefect deploy`, or leave this deployment out: deploy the others by name "
            "(`prefect deploy -n curate_flow/snapshot -n tokenize_flow/default ...`: Prefect names them here by "
            "their entrypoint's function).")
    return {}


def _prefect_file_of_this_command() -> Path:
    """The prefect file of the running ``prefect deploy`` (its ``--prefect-file``), else Prefect's
    default ``prefect.yaml`` in the working folder."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == "--prefect-file" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--prefect-file="):
            return Path(arg.split("=", 1)[1])
    return Path("prefect.yaml")


def load_deployment(path: Path, deployment: str) -> dict:
    """The definition of ``deployment`` (``FLOW/NAME``) in the prefect file at ``path``, as written
    (YAML anchors resolved, placeholders untouched)."""
    import yaml

    from refinery.flows.common import FLOWS

    flow, _, name = deployment.partition("/")
    if flow not in FLOWS or not name:
        raise TriggerParameterError(f"{deployment!r}: name a deployment as FLOW/NAME, FLOW one of {', '.join(FLOWS)}")
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as e:
        raise TriggerParameterError(
            f"cannot read the prefect file {path} to check {deployment}'s triggers ({e}); give the "
            "step `prefect_file: PATH`") from e
    for d in (spec or {}).get("deployments") or []:
        if d.get("name") == name and d.get("entrypoint") == FLOWS[flow]:
            return d
    raise TriggerParameterError(f"{path} has no deployment {deployment} (entrypoint {FLOWS[flow]})")


def trigger_problems(definition: dict, deployment: str, environ: Any) -> list[str]:
    """What is wrong with the event triggers of one deployment definition, one line each (none: fine)."""
    from refinery.flows.cli import load_flow

    flow_name = deployment.partition("/")[0]
    fields = load_flow(flow_name).params_cls.model_fields
    required = [n for n, f in fields.items() if f.is_required()]
    problems: list[str] = []
    own, unset = _resolve(definition.get("parameters") or {}, environ)
    problems += [f"its parameter `{k}` reads ${v}, which is not set in this environment" for k, v in unset]
    for i, trigger in enumerate(definition.get("triggers") or []):
        if not trigger.get("enabled", True):
            continue
        what = f"trigger {i + 1} (on {', '.join(sorted(trigger.get('expect') or ['any event']))})"
        given, unset = _resolve(trigger.get("parameters") or {}, environ)
        problems += [f"{what} gives `{k}` from ${v}, which is not set in this environment" for k, v in unset]
        problems += [f"{what} gives `{k}`, which {flow_name} has no parameter for (it has: {', '.join(fields)})"
                     for k in given if k not in fields]
        merged = {**own, **given}
        for name in required:
            value = merged.get(name)
            if value is None:
                problems.append(f"{what} gives no `{name}`, a required parameter of {flow_name} "
                                f"({' '.join((fields[name].description or '').split())})")
            elif isinstance(value, str) and not value.strip():
                source = _env_source(trigger.get("parameters", {}).get(name, definition.get("parameters", {}).get(name)))
                hint = f" (${source} is empty: set it before deploying)" if source else ""
                problems.append(f"{what} gives an empty `{name}`, a required parameter of {flow_name}{hint}")
    return problems


def _resolve(params: dict, environ: Any) -> tuple[dict, list[tuple[str, str]]]:
    """``params`` with ``{{ $VAR }}`` placeholders replaced from ``environ`` as ``prefect deploy``
    does; a value that holds any other placeholder (``{{ event.payload.output }}``, a variable, a
    block) counts as given. Also (parameter, variable) for each variable that is not set."""
    out: dict[str, Any] = {}
    unset: list[tuple[str, str]] = []
    for key, value in params.items():
        if isinstance(value, str):
            names = _PLACEHOLDER.findall(value)
            for var in (n[1:] for n in names if n.startswith("$")):
                if var in environ:
                    value = re.sub(r"\{\{\s*\$" + re.escape(var) + r"\s*\}\}", str(environ[var]).replace("\\", "\\\\"), value)
                else:
                    unset.append((key, var))
            if any(not n.startswith("$") for n in names):
                value = f"<{value}>"   # given at run time (the event) or by Prefect: not empty
        out[key] = value
    return out, unset


def _env_source(template: Any) -> str | None:
    """The environment variable a parameter's template is made of alone (``{{ $X }}`` -> ``X``)."""
    if isinstance(template, str):
        m = re.fullmatch(r"\s*\{\{\s*\$(\w+)\s*\}\}\s*", template)
        if m:
            return m.group(1)
    return None
