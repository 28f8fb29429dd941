"""evaluate: models -> held-out bits per byte and perplexity, benchmarks (lm-eval), generation samples.

    refinery run evaluate --set input=WORK/pretrain/<fp>,WORK/finetune/<fp> --json
    refinery run evaluate --set input=gpt2 --set data=WORK/holdout/<fp> \\
        --set "tasks=[configs/eval/gsm8k_local.yaml]" --set data_files.gsm8k_local=gsm8k-test.jsonl --set limit=50

``data`` defaults to the held-out documents of the first model's training data (found through the
manifests' lineage); with none found and none given, held-out scoring is skipped (and said so).
Output: one ``evaluate`` dataset (results.parquet, samples/, chart.png; see
refinery.tasks.eval.stage), a comparison table artifact and the bar chart as an image artifact.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator

from refinery.flows.common import FlowParams, emit_completed, gpu_slot, print_table, refinery_flow, result

_DEFAULT_PROMPTS = ["The history of the city", "Once upon a time", "Question: What is 12 plus 7?\nAnswer:"]


class EvaluateParams(FlowParams):
    flow_name: ClassVar[str] = "evaluate"

    input: str = Field(description="Models to compare, separated by commas: refinery datasets (pretrain, finetune, align outputs), Hugging Face model folders or hub ids.")
    data: str = Field("", description="Documents dataset for held-out bits per byte and perplexity; empty: the held-out split of the first model's training data (through the manifests), or none.")
    tasks: list[str] = Field(default_factory=list, description="Benchmarks: lm-eval task names or paths of task YAML files in lm-eval's format (e.g. configs/eval/gsm8k_local.yaml).")
    data_files: dict[str, str] = Field(default_factory=dict, description="Data file per local task name, replacing its YAML's dataset_kwargs.data_files (e.g. data_files.gsm8k_local=PATH).")
    limit: int | None = Field(None, ge=1, description="At most this many samples per benchmark.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per benchmark prompt (default: the task's own).")
    seed: int = Field(1234, description="Seed of lm-eval (sampling, few-shot choice).")
    gen_kwargs: str = Field("", description="lm-eval generation overrides for generative tasks, e.g. max_gen_toks=64.")
    prompts: list[str] = Field(default_factory=lambda: list(_DEFAULT_PROMPTS), description="Prompts of the generation samples (the chat template is used when the model has one); [] for none.")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per sample prompt.")
    batch_size: int = Field(8, ge=1, description="Batch size of scoring and of lm-eval.")
    max_length: int = Field(1024, ge=2, description="Context length of held-out scoring (capped by each model's).")
    max_docs: int | None = Field(2000, ge=1, description="Score at most this many held-out documents.")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda or cuda:N.")

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_list(cls, v):
        """``--set tasks=a.yaml,b`` as well as ``--set "tasks=[a.yaml, b]"``."""
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        """``--set prompts=TEXT`` is one prompt (commas and all)."""
        return [v] if isinstance(v, str) else v


def model_label(ref: str) -> str:
    """A short name: ``STAGE-FP6`` for a refinery dataset, the folder name, or the hub id."""
    from refinery.tasks.modelref import dataset_manifest

    try:
        m = dataset_manifest(ref)
    except ValueError:
        m = None
    if m and "stage" in m and "fingerprint" in m:
        return f"{m['stage']}-{m['fingerprint'][:6]}"
    p = Path(ref)
    return p.name if p.exists() else ref


def model_specs(refs: list[str]):
    from refinery.tasks.eval.stage import ModelSpec
    from refinery.tasks.modelref import model_identity, resolve_model

    specs, used = [], set()
    for ref in refs:
        local = os.path.abspath(ref) if "://" not in ref and os.path.exists(ref) else ref
        resolve_model(local)   # fails now, with a clear message, on a path that holds no model
        label, k = model_label(local), 2
        while label in used:
            label, k = f"{model_label(local)}#{k}", k + 1
        used.add(label)
        specs.append(ModelSpec(label=label, path=local, identity=model_identity(local)))
    return specs


def default_data(refs: list[str]) -> str:
    """The held-out documents of the first model that has some in its lineage."""
    from refinery.tasks.eval.lineage import heldout_of

    for ref in refs:
        found = heldout_of(ref)
        if found:
            return found
    return ""


def stage_config(p: EvaluateParams):
    from refinery.tasks.eval.harness import resolve_tasks
    from refinery.tasks.eval.stage import EvalConfig

    refs = [s.strip() for s in p.input.split(",") if s.strip()]
    if not refs:
        raise ValueError("evaluate needs at least one model: --set input=MODEL[,MODEL...]")
    return refs, EvalConfig(models=model_specs(refs), tasks=resolve_tasks(p.tasks, p.data_files), limit=p.limit,
                            num_fewshot=p.num_fewshot, seed=p.seed, gen_kwargs=p.gen_kwargs or None,
                            batch_size=p.batch_size, max_length=p.max_length, max_docs=p.max_docs,
                            prompts=p.prompts, max_new_tokens=p.max_new_tokens, device=p.device)


@refinery_flow("evaluate", EvaluateParams)
def evaluate_flow(p: EvaluateParams) -> dict:
    """Compare models: held-out bits per byte and perplexity, lm-eval benchmarks, generation samples."""
    from refinery.tasks.eval.stage import evaluate, read_results
    from refinery.tasks.report import image_artifact, table_artifact
    from refinery.tasks.store import Dataset

    refs, cfg = stage_config(p)
    data = p.data or default_data(refs)
    if not data:
        print("evaluate: no held-out documents given or found in the models' lineage; "
              "bits per byte skipped (--set data=DOCS)", file=sys.stderr)
    inputs = [Dataset.open(data)] if data else []
    with gpu_slot():   # a deployment on a GPU pool holds one card's slot while models run
        ds = evaluate.call(p.workdir, inputs, cfg)
    labels = [m.label for m in cfg.models]   # the manifest sorts keys: put task, metric, then models in order
    table = [{"task": r["task"], "metric": r["metric"], **{lab: r.get(lab) for lab in labels}}
             for r in ds.manifest.get("stats", {}).get("table", [])]
    print_table(table, title="== evaluate")
    table_artifact("evaluate-comparison", table, description="Every metric (rows) for every model (columns)")
    image_artifact("evaluate-chart", f"{ds.local_path()}/chart.png", description="Metrics across models")
    out = result({"evaluate": ds}, results=read_results(ds), heldout=data or None)
    emit_completed("evaluate", out, primary=ds.path)
    return out
