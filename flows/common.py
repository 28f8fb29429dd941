"""What every flow shares: the parameter base model and the decorator that turns a function of one
pydantic model into a Prefect flow whose parameters are that model's fields.

One model serves the YAML file, the CLI (``--set a.b=v``), Python callers and the Prefect UI form:
the flow's signature is generated from the model's fields, with their descriptions as the
docstring's ``Args:`` section (which Prefect shows in the form), so ``prefect deployment run
FLOW/DEPLOYMENT --param input=...`` uses the same names as ``refinery run FLOW --set input=...``.
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable, ClassVar, TypeVar

from pydantic import BaseModel, Field, ValidationInfo, model_validator

from refinery.tasks.config import StrictModel, check_no_secrets

from refinery.tasks.report import format_table, table_artifact

P = TypeVar("P", bound="FlowParams")

# name -> "module:attribute" of the flow; imported only when used so `refinery --help` stays instant.
FLOWS = {
    "curate": "refinery.flows.curate:curate_flow",
    "tokenize": "refinery.flows.tokenize:tokenize_flow",
    "pretrain": "refinery.flows.pretrain:pretrain_flow",
    "finetune": "refinery.flows.finetune:finetune_flow",
    "align": "refinery.flows.align:align_flow",
    "pipeline": "refinery.flows.pipeline:pipeline_flow",
    "demo": "refinery.flows.demo:demo_flow",
    "evaluate": "refinery.flows.evaluate:evaluate_flow",
    "ablate": "refinery.flows.ablate:ablate_flow",
    "synth": "refinery.flows.synth:synth_flow",
}

# name -> one line, for `refinery flows` without importing every flow (tests/flows/test_cli.py
# checks each against the first line of the flow's docstring).
FLOW_SUMMARIES = {
    "curate": "Ingest crawl files and dumps, extract main text, identify language, filter, deduplicate (and, when configured, mix).",
    "tokenize": "Train (or load) a tokenizer and tokenize a documents dataset into memory-mappable token shards.",
    "pretrain": "Pretrain a causal LM (or MLM / T5 span corruption) from config on token datasets.",
    "finetune": "Fine-tune a causal LM on instructions (full, LoRA, QLoRA, IA3, LLaMA-Adapter, prompt or prefix tuning).",
    "align": "Align a model: DPO, ORPO, CPO or SimPO on preference pairs, KTO on labelled replies, PPO against a reward model, GRPO, RLOO or online DPO with reward functions.",
    "pipeline": "End to end: curate a crawl, tokenize it, pretrain, fine-tune, and align.",
    "demo": "Generate a small deterministic crawl and run curate, tokenize, pretrain, finetune and align on it.",
    "evaluate": "Compare models: held-out bits per byte and perplexity, lm-eval benchmarks, generation samples.",
    "ablate": "Ablate curation choices: train the same small model on each variant of the data and compare evaluations.",
    "synth": "Generate synthetic data from documents: rephrasings, instruction/response pairs or preference pairs.",
}


class FlowParams(StrictModel):
    """Parameters every flow has."""

    workdir: str = Field("refinery-work", description="Root of all datasets: a local folder or an fsspec URL such as s3://bucket/refinery.")
    task_runner: str = Field("threads", description="Where shards run: threads[:N], processes[:N], dask[:N] (local cluster), tcp://HOST:PORT (an existing Dask scheduler), ray[:N] (local Ray cluster of N CPUs) or ray://HOST:PORT (an existing Ray cluster).")

    # dotted name -> kind of the local paths among the parameters (refinery.flows.paths.PATH_FIELDS);
    # checked when validated with context={"check_paths": True}, as the CLI does
    flow_name: ClassVar[str] = ""

    @model_validator(mode="after")
    def _no_secrets(self):
        # before any run starts or Prefect stores the parameters: no URL with credentials (user:password@, token@) anywhere
        # (input, data, workdir, nested sections), no secret-looking storage option
        check_no_secrets(self.model_dump(mode="json"))
        return self

    @model_validator(mode="after")
    def _local_paths(self, info: ValidationInfo):
        # a missing or unreadable local input fails here, before a server starts or torch loads
        if self.flow_name and isinstance(info.context, dict) and info.context.get("check_paths"):
            from refinery.flows.paths import preflight

            preflight(self.flow_name, self.model_dump())
        return self


def _docstring(fn: Callable, params_cls: type[BaseModel]) -> str:
    lines = [inspect.getdoc(fn) or "", "", "Args:"]
    for name, field in params_cls.model_fields.items():
        desc = " ".join((field.description or "").split())
        lines.append(f"    {name}: {desc}")
    return "\n".join(lines)


def _signature(params_cls: type[BaseModel]) -> inspect.Signature:
    params = []
    for name, field in params_cls.model_fields.items():
        if field.is_required():
            default = inspect.Parameter.empty
        elif field.default_factory is not None:
            default = field.get_default(call_default_factory=True)
        else:
            default = field.default
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=field.annotation))
    return inspect.Signature(params, return_annotation=dict)


def refinery_flow(name: str, params_cls: type[P], **flow_kwargs) -> Callable[[Callable[[P], dict]], Any]:
    """Decorate ``fn(params) -> {"outputs": ..., "counts": ...}`` into a Prefect flow named ``name``.

    The flow takes the model's fields as keyword parameters; ``flow.params_cls`` is the model and
    ``flow.run_params(p)`` calls the flow with a model instance.
    """
    from prefect import flow

    def decorate(fn: Callable[[P], dict]):
        @functools.wraps(fn)
        def wrapper(**kwargs):
            return fn(params_cls.model_validate(kwargs))

        wrapper.__signature__ = _signature(params_cls)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {n: f.annotation for n, f in params_cls.model_fields.items()} | {"return": dict}
        wrapper.__doc__ = _docstring(fn, params_cls)
        del wrapper.__wrapped__  # Prefect must see the generated signature, not fn's
        f = flow(name=name, validate_parameters=True, log_prints=True, **flow_kwargs)(wrapper)
        f.params_cls = params_cls  # type: ignore[attr-defined]

        def run_params(p: P, **options) -> dict:
            target = f.with_options(**options) if options else f
            return target(**{k: getattr(p, k) for k in params_cls.model_fields})

        f.run_params = run_params  # type: ignore[attr-defined]
        return f

    return decorate


def _number(v: Any) -> Any:
    """A number as a summary table shows it: integers whole, floats to 4 significant digits
    (1066.9422 -> 1067, 4.93127 -> 4.931), NaN and infinities as nan/inf; other values unchanged."""
    if isinstance(v, bool) or not isinstance(v, float):
        return v
    if v != v:
        return "nan"
    if v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4g}"


def tidy_rows(rows: list[dict]) -> list[dict]:
    """Rows for a console table: numbers formatted alike (:func:`_number`), a column that is empty
    in every row (None or "") left out, and None shown as an empty cell elsewhere."""
    cols = [c for c in dict.fromkeys(k for r in rows for k in r)
            if any(r.get(c) not in (None, "") for r in rows)]
    return [{c: ("" if r.get(c) is None else _number(r.get(c, ""))) for c in cols} for r in rows]


def print_table(rows: list[dict], title: str) -> None:
    """Print a summary table on stderr (tidied: :func:`tidy_rows`); artifacts keep the raw rows."""
    if rows:
        print(format_table(tidy_rows(rows), title=title), file=sys.stderr)


def stage_seconds(ds: Any) -> Any:
    """A stage's time for a report: ``cached`` when this run found it built (``ds.cached``, set by
    the runtime), else the seconds its build took."""
    return "cached" if getattr(ds, "cached", None) else ds.manifest.get("stats", {}).get("seconds", "")


def stage_rows(stages: dict[str, Any]) -> list[dict]:
    """One summary row per stage dataset: documents in/out, drops per reason, time.

    A stage this run found already built (``ds.cached``, set by the runtime) shows ``cached``
    instead of the seconds its original build took, which this run did not spend."""
    rows = []
    for name, ds in stages.items():
        c = ds.counts
        dropped = c.get("dropped_by_rule", c.get("dropped", {}))
        rows.append({
            "stage": name,
            "in": c.get("docs_in", ""),
            "out": c.get("docs_out", c.get("tokens", "")),
            "dropped": ", ".join(f"{k}={v}" for k, v in sorted(dropped.items()) if v) if isinstance(dropped, dict) else dropped,
            "seconds": stage_seconds(ds),
            "fingerprint": ds.fingerprint,
        })
    return rows


def report_stages(flow_name: str, stages: dict[str, Any]) -> list[dict]:
    """Print the per-stage summary table and publish it as a Prefect table artifact."""
    rows = stage_rows(stages)
    print_table(rows, title=f"== {flow_name}: stages")
    table_artifact(f"{flow_name}-stages", rows, description=f"{flow_name}: documents in/out and drops per stage")
    return rows


def result(stages: dict[str, Any], primary: str | None = None, **extra) -> dict:
    """The value every flow returns: ``primary`` (the dataset path the next flow takes as
    ``input``; default: the last stage's output), then output paths and counts in stage order."""
    outputs = {k: ds.path for k, ds in stages.items()}
    if primary is None and outputs:
        primary = list(outputs.values())[-1]
    return {"primary": primary, "outputs": outputs,
            "counts": {k: ds.counts for k, ds in stages.items()}, **extra}


def emit_completed(flow_name: str, out: dict, primary: str) -> None:
    """Emit ``refinery.<flow>.completed`` with the primary output path in the payload, so a
    deployment trigger can start the next flow on it (``{{ event.payload.output }}``).

    The resource's ``refinery.subflow`` label is ``"true"`` when this run is a subflow (of the
    pipeline, the demo, an ablation, ...): its parent runs the next flow itself, and the triggers in
    ``deployments/prefect.yaml`` match ``"false"`` only, so such a run starts no deployment."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None:
        return
    from prefect.events import emit_event

    subflow = ctx.flow_run is not None and ctx.flow_run.parent_task_run_id is not None
    emit_event(
        event=f"refinery.{flow_name}.completed",
        resource={"prefect.resource.id": f"refinery.dataset.{primary}", "prefect.resource.name": flow_name,
                  "refinery.subflow": "true" if subflow else "false"},
        payload={"output": primary, "outputs": out.get("outputs", {})},
    )


def gpu_slot():
    """Hold one slot of the global concurrency limit named by ``REFINERY_GPU_SLOTS`` (set on GPU
    work pools) for the duration of a training stage, so two runs never share a card. Outside a
    server deployment (variable unset) it does nothing."""
    import contextlib
    import os

    name = os.environ.get("REFINERY_GPU_SLOTS")
    if not name:
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency(name, occupy=1)
