"""synth: curated documents -> synthetic records (rephrased documents, SFT records or preference pairs).

    refinery run synth --set input=WORK/dedup/<fp> --set model=WORK/finetune/<fp> --set task=instructions --json
    refinery run synth --set input=WORK/dedup/<fp> --set task=rephrase --set style=qa \\
        --set base_url=http://127.0.0.1:8000/v1 --set model=served-name --set token_budget=2000000

Output: one ``synth`` dataset (see refinery.tasks.synth.stage) that the next flow takes as it is:
``tokenize --set input=`` (rephrase), ``finetune --set data=`` (instructions), ``align --set data=``
(preferences). Documents that yielded nothing are in its ``failures/`` table, counted by reason.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import ClassVar

from pydantic import Field, ValidationInfo, model_validator

from refinery.flows.common import FlowParams, emit_completed, gpu_slot, refinery_flow, report_stages, result
from refinery.tasks.synth.stage import SynthConfig


class _Inputs(FlowParams):
    """The storage root and the documents: first in the help and the Prefect form."""

    input: str = Field(description="Documents dataset (the curate flow's output, or any dataset with a `text` "
                                   "column): a path or fsspec URL.", examples=["refinery-work/dedup/FINGERPRINT"])


class SynthParams(SynthConfig, _Inputs):
    """Flow parameters: the storage root, the documents, then the stage's settings (one field each)."""

    flow_name: ClassVar[str] = "synth"

    @model_validator(mode="after")
    def _paths(self, info: ValidationInfo):
        """With the CLI's ``check_paths``: the documents, and a local model (not an endpoint's model
        name), must exist before a server starts or a model loads."""
        if isinstance(info.context, dict) and info.context.get("check_paths"):
            from refinery.flows.paths import check_fields

            check_fields({"input": "datasets"} if self.base_url else {"input": "datasets", "model": "model"}, self)
        return self

    def stage_config(self) -> SynthConfig:
        settings = self.model_dump(include=set(SynthConfig.model_fields))
        model = settings["model"]
        if not self.base_url and "://" not in model and os.path.exists(model):
            settings["model"] = os.path.abspath(model)   # the fingerprint does not depend on the cwd
        return SynthConfig.model_validate(settings)


@refinery_flow("synth", SynthParams)
def synth_flow(p: SynthParams) -> dict:
    """Generate synthetic data from documents: rephrasings, instruction/response pairs or preference pairs."""
    from refinery.tasks.runtime import make_runner
    from refinery.tasks.store import Dataset
    from refinery.tasks.synth.stage import Synth

    if not p.input:
        raise ValueError("synth needs a documents dataset: --set input=PATH")
    cfg = p.stage_config()
    if not cfg.base_url:
        from refinery.tasks.modelref import resolve_model

        resolve_model(cfg.model)   # a path that holds no model fails now, before any shard starts
    docs = Dataset.open(p.input)
    slot = contextlib.nullcontext() if cfg.base_url else gpu_slot()   # a local model holds a card's slot
    with slot, make_runner(p.task_runner) as runner:
        ds = Synth.call(p.workdir, [docs], cfg, runner=runner)
    report_stages("synth", {"synth": ds})
    c = ds.counts
    if c.get("failed") or c.get("skipped_budget"):
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(c.get("failed_by_reason", {}).items()))
        print(f"synth: {c.get('failed', 0)} document(s) failed ({reasons}; see {ds.path}/failures), "
              f"{c.get('skipped_budget', 0)} skipped by the token budget", file=sys.stderr)
    out = result({"synth": ds}, primary=ds.path)
    emit_completed("synth", out, primary=ds.path)
    return out
