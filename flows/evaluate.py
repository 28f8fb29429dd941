"""evaluate: models -> held-out bits per byte and perplexity, benchmarks (lm-eval), generation samples.

    refinery run evaluate --set input=WORK/pretrain/<fp>,WORK/finetune/<fp> --json
    refinery run evaluate --set input=gpt2 --set data=WORK/holdout/<fp> \\
        --set "tasks=[configs/eval/gsm8k_local.yaml]" --set data_files.gsm8k_local=gsm8k-test.jsonl --set limit=50
    refinery run evaluate --set input=WORK/align/<fp> --set baseline=WORK/finetune/<fp> \\
        --set judge=http://127.0.0.1:8000/v1 --set prompts=prompts.jsonl

``data`` defaults to the held-out documents of the first model's training data (found through the
manifests' lineage); with none found and none given, held-out scoring is skipped (and said so).
Output: one ``evaluate`` dataset (results.parquet, samples/, chart.png; see
refinery.tasks.eval.stage), a comparison table artifact and the bar chart as an image artifact.

Chat templates: ``chat_template=auto`` (the default) frames the benchmark requests and the samples
with each model's chat template when its tokenizer has one; ``true`` requires one, ``false`` never.
Pairwise judging (``judge=MODEL_OR_URL``): every model of ``input`` is judged against ``baseline``
(default: the first model of ``input``; one not in ``input`` is added to it) on the answers to
``prompts`` (a file of prompts, or the prompts themselves), each pair asked in both orders; see
refinery.tasks.eval.judge for the rule, the judge prompt and the endpoint's key variables.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from refinery.flows.common import FlowParams, emit_completed, gpu_slot, print_table, refinery_flow, result

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".arrow", ".gz")
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
    prompts: list[str] = Field(default_factory=lambda: list(_DEFAULT_PROMPTS), description="Prompts of the generation samples (and of judging), or one file of them (.txt: a prompt per line; JSONL/JSON/Parquet: records with prompt, question, instruction or messages); [] for none.")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per sample prompt (greedy; also the judged answers' bound).")
    chat_template: Literal["auto", "true", "false"] = Field("auto", description="Frame prompts (benchmark requests, samples, judged answers) with the model's chat template: auto = when its tokenizer has one, true = required (error without), false = never.")
    fewshot_as_multiturn: bool = Field(True, description="With the chat template: few-shot examples as separate user/assistant turns (false: all in one user turn).")
    judge: str = Field("", description="Pairwise judging: a local judge model (dataset, folder, hub id) or an OpenAI-compatible URL (http://HOST:PORT/v1; key from REFINERY_JUDGE_API_KEY or OPENAI_API_KEY); empty: no judging.")
    baseline: str = Field("", description="The model the others are judged against; empty: the first of input (one not in input is added to it).")
    judge_model: str = Field("", description="Model name sent to a judge endpoint; empty: the first its /v1/models lists.")
    judge_max_tokens: int = Field(16, ge=1, description="Tokens the judge may generate per verdict.")
    judge_concurrency: int = Field(4, ge=1, le=64, description="Judge endpoint requests in flight at once.")
    judge_retries: int = Field(4, ge=0, le=10, description="Retries of a judge request on a transient failure (connection, timeout, 429, 5xx), with backoff.")
    batch_size: int = Field(8, ge=1, description="Batch size of scoring and of lm-eval.")
    max_length: int = Field(1024, ge=2, description="Context length of held-out scoring (capped by each model's).")
    max_docs: int | None = Field(2000, ge=1, description="Score at most this many held-out documents.")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda or cuda:N.")

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_list(cls, v):
        """``--set tasks=a.yaml,b`` as well as ``--set "tasks=[a.yaml, b]"``."""
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_bool(cls, v):
        """``--set chat_template=true`` arrives as a YAML boolean."""
        return str(v).lower() if isinstance(v, bool) else v

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


def read_prompt_param(prompts: list[str]) -> list[str]:
    """The ``prompts`` parameter: one entry naming an existing file or folder is a file of prompts
    (refinery.tasks.eval.judge.read_prompts), anything else the prompts themselves."""
    from refinery.tasks.eval.judge import read_prompts

    one = prompts[0].strip() if len(prompts) == 1 else ""
    if one and "\n" not in one and os.path.exists(os.path.expanduser(one)):
        found, counts = read_prompts(os.path.expanduser(one))
        if counts["skipped"]:
            print(f"evaluate: {prompts[0]}: {counts['skipped']} of {counts['records']} records hold no prompt; "
                  "skipped", file=sys.stderr)
        return found
    if one and " " not in one and one.lower().endswith(PROMPT_FILE_SUFFIXES):   # a file name, not a prompt
        raise ValueError(f"prompts: no such file {one} (give the path of a prompts file, or the prompts themselves)")
    return prompts


def _same_model(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) if os.path.exists(a) and os.path.exists(b) else a == b


def judge_refs(p: EvaluateParams, refs: list[str]) -> tuple[list[str], dict | None]:
    """The models with the baseline first, and the judge's settings (None without a judge)."""
    from refinery.tasks.config import check_url
    from refinery.tasks.eval.judge import is_endpoint
    from refinery.tasks.modelref import model_identity, resolve_model

    if not p.judge:
        return refs, None
    baseline = p.baseline or refs[0]
    refs = [baseline] + [r for r in refs if not _same_model(r, baseline)]
    if len(refs) < 2:
        raise ValueError("judging compares models: give two in input, or one and --set baseline=MODEL")
    if is_endpoint(p.judge):
        check_url(p.judge, "judge")   # a key belongs in REFINERY_JUDGE_API_KEY, never in the URL
        identity = None
    else:
        resolve_model(p.judge)        # fails now, with a clear message, on a path that holds no model
        identity = model_identity(p.judge)
    return refs, dict(judge=p.judge, identity=identity, model=p.judge_model, max_tokens=p.judge_max_tokens,
                      concurrency=p.judge_concurrency, retries=p.judge_retries, seed=p.seed)


def stage_config(p: EvaluateParams):
    from refinery.tasks.eval.harness import resolve_tasks
    from refinery.tasks.eval.judge import JudgeSpec
    from refinery.tasks.eval.stage import EvalConfig

    refs = [s.strip() for s in p.input.split(",") if s.strip()]
    if not refs:
        raise ValueError("evaluate needs at least one model: --set input=MODEL[,MODEL...]")
    refs, judge = judge_refs(p, refs)
    prompts = read_prompt_param(p.prompts)
    if judge and not prompts:
        raise ValueError("judging compares answers to prompts: --set prompts=FILE")
    models = model_specs(refs)
    spec = JudgeSpec(baseline=models[0].label, **judge) if judge else None
    return refs, EvalConfig(models=models, tasks=resolve_tasks(p.tasks, p.data_files), limit=p.limit,
                            num_fewshot=p.num_fewshot, seed=p.seed, gen_kwargs=p.gen_kwargs or None,
                            batch_size=p.batch_size, max_length=p.max_length, max_docs=p.max_docs,
                            prompts=prompts, max_new_tokens=p.max_new_tokens, device=p.device,
                            chat_template=p.chat_template, fewshot_as_multiturn=p.fewshot_as_multiturn,
                            judge=spec)


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
    extra = {}
    if cfg.judge is not None:
        image_artifact("evaluate-judge", f"{ds.local_path()}/judge.png", description="Pairwise win/tie/loss rates")
        extra["judge"] = ds.manifest.get("stats", {}).get("judge")
    out = result({"evaluate": ds}, results=read_results(ds), heldout=data or None,
                 chat_template=ds.manifest.get("chat_template"), **extra)
    emit_completed("evaluate", out, primary=ds.path)
    return out
