"""pipeline: crawl -> curate -> tokenize -> pretrain -> finetune -> align, as subflows.

    refinery run pipeline --set input='crawl/*.warc.gz' --set data=sft.json \\
        --set pretrain.max_steps=2000 --set finetune.lora.r=16 --set align.dpo.beta=0.2

Each flow has a section typed by that flow's own parameter model, less the plumbing the pipeline
supplies (``workdir``, ``task_runner``, the upstream ``input``, and finetune's and align's
``data``). So a typo anywhere (``pretrain.lerning_rate``) fails when the pipeline's parameters are
validated, before curate starts, and every section reads as that flow's ``--help``.
"""
from __future__ import annotations

from copy import copy
from typing import Any, ClassVar

from pydantic import Field, create_model

from refinery.flows.align import AlignParams, AlignSettings
from refinery.flows.common import FlowParams, refinery_flow
from refinery.flows.curate import CurateParams
from refinery.flows.evaluate import EvaluateParams
from refinery.flows.finetune import FinetuneParams
from refinery.flows.pretrain import PretrainParams
from refinery.flows.tokenize import TokenizeParams
from refinery.tasks.config import StrictModel
from refinery.tasks.finetune.config import FinetuneSettings
from refinery.tasks.train.config import TrainConfig

ORDER = ("curate", "tokenize", "pretrain", "finetune", "align")
# what the pipeline (or the demo) supplies to each flow rather than its section
PLUMBING = {"workdir", "task_runner", "input"}
SUPPLIED = {"curate": PLUMBING, "tokenize": PLUMBING, "pretrain": PLUMBING,
            "finetune": PLUMBING | {"data"}, "align": PLUMBING | {"data"}, "evaluate": PLUMBING}


def section_model(params_cls: type[StrictModel], drop: set[str]) -> type[StrictModel]:
    """``params_cls`` without the fields in ``drop``: same types, defaults and descriptions.

    For flows whose settings are not a class of their own (curate, tokenize). Model-level
    validators of ``params_cls`` do not carry over; :func:`check_sections` runs them."""
    fields: Any = {n: (f.annotation, copy(f)) for n, f in params_cls.model_fields.items() if n not in drop}
    doc = f"The {params_cls.__name__} fields the pipeline does not supply."
    return create_model(f"{params_cls.__name__.removesuffix('Params')}Section", __base__=StrictModel,
                        __doc__=doc, **fields)


CurateSection = section_model(CurateParams, SUPPLIED["curate"])
TokenizeSection = section_model(TokenizeParams, SUPPLIED["tokenize"])
EvaluateSection = section_model(EvaluateParams, SUPPLIED["evaluate"])
TRAINED = ("pretrain", "finetune", "align")   # the flows whose model the evaluate section scores
# each flow's section model, and the full params model it completes
SECTIONS: dict[str, type[StrictModel]] = {"curate": CurateSection, "tokenize": TokenizeSection,
                                           "pretrain": TrainConfig, "finetune": FinetuneSettings,
                                           "align": AlignSettings}
PARAMS: dict[str, type[FlowParams]] = {"curate": CurateParams, "tokenize": TokenizeParams,
                                       "pretrain": PretrainParams, "finetune": FinetuneParams,
                                       "align": AlignParams, "evaluate": EvaluateParams}


class PipelineParams(FlowParams):
    """Flow parameters: the three inputs, then one typed section per flow."""

    flow_name: ClassVar[str] = "pipeline"

    input: str = Field(description="Crawl files for curate: a path, glob or fsspec URL (commas separate several).")
    data: str = Field(description="Instruction file for the fine-tune (Alpaca JSON, ShareGPT or messages JSONL).")
    preferences: str = Field("", description="Preference pairs for alignment (HH-RLHF or ShareGPT pairs); empty skips align.")
    curate: CurateSection = Field(default_factory=CurateSection, description="The curate flow's parameters (less input), e.g. dedup.bands.")  # type: ignore[valid-type]
    tokenize: TokenizeSection = Field(default_factory=TokenizeSection, description="The tokenize flow's parameters (less input), e.g. tokenizer.vocab_size.")  # type: ignore[valid-type]
    pretrain: TrainConfig = Field(default_factory=TrainConfig, description="The pretrain flow's parameters (less input), e.g. max_steps, preset.")
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings, description="The finetune flow's parameters (less input and data), e.g. method, lora.r.")
    align: AlignSettings = Field(default_factory=AlignSettings, description="The align flow's parameters (less input and data), e.g. method, dpo.max_steps.")
    evaluate: EvaluateSection | None = Field(None, description="The evaluate flow's parameters (less input): when given, each trained model (pretrain, finetune, align) is evaluated right after its flow, e.g. evaluate.tasks=[configs/eval/mc_local.yaml].")  # type: ignore[valid-type]


def flow_params(name: str, section: StrictModel, supplied: dict[str, Any]) -> FlowParams:
    """The full parameters of flow ``name``: its section plus what the pipeline supplies."""
    own = {k: getattr(section, k) for k in type(section).model_fields}
    return PARAMS[name].model_validate({**own, **supplied})


def check_sections(names: list[str], sections: dict[str, StrictModel], common: dict[str, Any]) -> None:
    """Complete every section with placeholder inputs and validate it as its flow will, so an
    error in a late flow's parameters (a rule that spans fields) surfaces before the first runs."""
    for name in names:
        placeholders = {k: f"<{name} {k}>" for k in SUPPLIED[name] - PLUMBING}
        flow_params(name, sections[name], {**common, **placeholders, "input": f"<{name} input>"})


def run_chain(p: FlowParams, crawl: str, data: str, preferences: str, sections: dict[str, StrictModel]) -> dict:
    """Run the flows one after another, each on the previous one's primary output."""
    from refinery.flows.cli import load_flow

    common = {"workdir": p.workdir, "task_runner": p.task_runner}
    names = [n for n in ORDER if n != "align" or preferences]
    check_sections(names + (["evaluate"] if sections.get("evaluate") is not None else []), sections, common)
    outputs: dict[str, str] = {}
    counts: dict[str, Any] = {}
    upstream = crawl
    files = {"finetune": {"data": data}, "align": {"data": preferences}}
    for name in names:
        params = flow_params(name, sections[name], {**common, **files.get(name, {}), "input": upstream})
        out = load_flow(name).run_params(params)
        outputs.update(out["outputs"])
        counts.update(out["counts"])
        upstream = primary_output(name, out)
        if sections.get("evaluate") is not None and name in TRAINED:   # judge each model on what it never saw
            ev = load_flow("evaluate").run_params(flow_params("evaluate", sections["evaluate"], {**common, "input": upstream}))
            outputs[f"evaluate_{name}"] = ev["outputs"]["evaluate"]
            counts[f"evaluate_{name}"] = ev["counts"]["evaluate"]
    return {"primary": upstream, "outputs": outputs, "counts": counts}


def primary_output(flow_name: str, out: dict) -> str:
    """The dataset the next flow takes as ``input``: the flow's ``primary`` (see
    ``refinery.flows.common.result``), else its last stage's output."""
    return out.get("primary") or list(out["outputs"].values())[-1]


@refinery_flow("pipeline", PipelineParams)
def pipeline_flow(p: PipelineParams) -> dict:
    """End to end: curate a crawl, tokenize it, pretrain, fine-tune, and align."""
    sections: dict[str, StrictModel] = {name: getattr(p, name) for name in ORDER}
    if p.evaluate is not None:
        sections["evaluate"] = p.evaluate
    return run_chain(p, p.input, p.data, p.preferences, sections)
