"""pipeline: crawl -> curate -> tokenize -> pretrain -> finetune -> align, as subflows."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from refinery.flows.common import FlowParams, refinery_flow


class PipelineParams(FlowParams):
    input: str = Field(description="Crawl files for curate: a path, glob or fsspec URL (commas separate several).")
    data: str = Field(description="Instruction file for the fine-tune (Alpaca JSON, ShareGPT or messages JSONL).")
    preferences: str = Field("", description="Preference pairs for alignment (HH-RLHF or ShareGPT pairs); empty skips align.")
    curate: dict[str, Any] = Field(default_factory=dict, description="Extra curate parameters (see the curate flow), e.g. {\"dedup\": {\"bands\": 20}}.")
    tokenize: dict[str, Any] = Field(default_factory=dict, description="Extra tokenize parameters.")
    pretrain: dict[str, Any] = Field(default_factory=dict, description="Extra pretrain parameters, e.g. {\"max_steps\": 2000, \"preset\": \"124m\"}.")
    finetune: dict[str, Any] = Field(default_factory=dict, description="Extra finetune parameters, e.g. {\"method\": \"lora\"}.")
    align: dict[str, Any] = Field(default_factory=dict, description="Extra align parameters, e.g. {\"method\": \"dpo\"}.")


def run_chain(p: FlowParams, crawl: str, data: str, preferences: str, overrides: dict[str, dict]) -> dict:
    """Run the flows one after another, each on the previous one's primary output."""
    from refinery.flows.cli import load_flow

    common = {"workdir": p.workdir, "task_runner": p.task_runner}
    outputs: dict[str, str] = {}
    counts: dict[str, Any] = {}
    upstream = crawl
    for name, extra in (("curate", {}), ("tokenize", {}), ("pretrain", {}), ("finetune", {"data": data}),
                        ("align", {"data": preferences})):
        if name == "align" and not preferences:
            break
        flow = load_flow(name)
        params = flow.params_cls.model_validate({**overrides.get(name, {}), **common, **extra, "input": upstream})
        out = flow.run_params(params)
        outputs.update(out["outputs"])
        counts.update(out["counts"])
        upstream = primary_output(name, out)
    return {"outputs": outputs, "counts": counts}


def primary_output(flow_name: str, out: dict) -> str:
    """The dataset the next flow takes as ``input``: the last stage's output."""
    return list(out["outputs"].values())[-1]


@refinery_flow("pipeline", PipelineParams)
def pipeline_flow(p: PipelineParams) -> dict:
    """End to end: curate a crawl, tokenize it, pretrain, fine-tune, and align."""
    return run_chain(p, p.input, p.data, p.preferences,
                     {"curate": p.curate, "tokenize": p.tokenize, "pretrain": p.pretrain,
                      "finetune": p.finetune, "align": p.align})
