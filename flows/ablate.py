"""ablate: prove a curation choice by the models it makes.

    refinery run ablate -c configs/ablate-demo.yaml --json
    refinery run ablate --set input='crawl/*.warc.gz' \\
        --set 'variants={no_dedup: {dedup.exact: false, dedup.near: false}}' --set 'seeds=[0,1]'

A base curate config (``curate``) and named variants, each a set of dotted overrides of it
(``variants.strict: {filters.gopher_quality.min_stop_words: 3}``). Every variant is curated, then
trained and evaluated the same way: one tokenizer for all (given, or trained on the base's ingested
documents, which every filter/dedup variant is a subset of), the same pretrain config and seeds,
one evaluation on the same held-out documents and tasks. The held-out documents (``heldout``, else
the base's held-out split) are kept out of every variant's training by n-gram decontamination, so
a variant that keeps duplicates does not train on copies of what it is scored on.

Phases:
  1. validate every variant's curate config (before anything runs; unknown keys get did-you-mean);
  2. the base: curate, held-out documents, tokenizer;
  3. each variant (the base too) as an ``ablate-variant`` subflow, up to ``parallel`` at a time:
     curate (a subflow; stages shared with the base are reused), held-out decontamination,
     tokenize, then per seed a ``pretrain`` subflow and the evaluate stage;
  4. the ``ablation`` stage: one row per (variant, seed, metric), summary over seeds, PNG; the
     comparison table is printed and published as an artifact.

Every step is a cached stage, so a rerun trains nothing and one more variant (or seed) trains only
that one. Training and evaluation (torch) hold one process-wide lock: the trainers seed torch's
global generators, which threads share, so model work runs one at a time to stay deterministic
while the other variants' data stages run beside it.
"""
from __future__ import annotations

import contextvars
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from refinery.flows.common import FlowParams, emit_completed, gpu_slot, print_table, refinery_flow
from refinery.flows.curate import CurateParams
from refinery.flows.evaluate import EvaluateParams
from refinery.flows.pipeline import PLUMBING, CurateSection, section_model
from refinery.tasks.config import StrictModel
from refinery.tasks.tokens.holdout import HoldoutConfig
from refinery.tasks.tokens.stage import TokenizeConfig
from refinery.tasks.tokens.tokenizer import TokenizerConfig
from refinery.tasks.train.config import TrainConfig

# the evaluate flow's parameters less what the ablation supplies: the models and the documents
EvaluateSection = section_model(EvaluateParams, PLUMBING | {"data"})
# what every variant shares: a variant may not override these curate fields
SHARED_CURATE = {"workdir", "task_runner", "input"}
_TORCH = threading.Lock()   # one training or evaluation at a time in this process (see the docstring)


class DemoCrawl(StrictModel):
    """The demo crawl (refinery.tasks.demo.crawl) as the input: real prose pages with planted
    duplicates, spam, foreign and blocklisted pages."""

    pages: int = Field(400, ge=30, description="Pages in the generated crawl.")
    seed: int = Field(0, description="Seed of the generated crawl.")


class AblateParams(FlowParams):
    """Flow parameters: the crawl, the base curate config and its variants, then what every
    variant shares (tokenizer, held-out documents, pretrain, seeds, evaluation)."""

    flow_name: ClassVar[str] = "ablate"

    input: str = Field("", description="Crawl files for curate: a path, glob or fsspec URL (commas separate "
                       "several). Required unless demo_crawl or curate.ingest.inputs is set.")
    demo_crawl: DemoCrawl | None = Field(None, description="Generate the demo crawl (demo_crawl.pages, "
                                         "demo_crawl.seed) into WORKDIR/demo-inputs and use it as the input.")
    curate: CurateSection = Field(default_factory=CurateSection,  # type: ignore[valid-type]
                                  description="The base curate config (the curate flow's parameters less input).")
    base_name: str = Field("base", description="Name of the base variant in tables.")
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Variant name -> overrides of "
                                                "the base curate config, dotted or nested (e.g. "
                                                "{no_dedup: {dedup.exact: false, dedup.near: false}}).")
    heldout: str = Field("", description="Held-out documents dataset every model is scored on; empty: the base "
                         "variant's held-out split (see holdout).")
    holdout: HoldoutConfig = Field(default_factory=lambda: HoldoutConfig(fraction=0.05, min_docs=16),
                                   description="The base's held-out split when heldout is empty (fraction, "
                                   "min_docs, max_docs, salt).")
    heldout_ngram: int | None = Field(13, ge=1, description="Drop from every variant's training documents those "
                                      "sharing a word n-gram of this length with a held-out document (the "
                                      "held-out ones, their copies and near-copies); null: no such step.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The tokenizer every variant "
                                       "shares: tokenizer.path loads one, else a byte-level BPE is trained "
                                       "(vocab_size, ...) on tokenizer_data.")
    tokenizer_data: Literal["ingest", "base"] = Field("ingest", description="What a trained tokenizer learns "
                                                      "from: ingest = the base's ingested documents before "
                                                      "filters and dedup (the union of what filter/dedup "
                                                      "variants keep; adding a variant keeps it), base = the "
                                                      "base variant's curated documents.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="Token shards of every variant.")
    pretrain: TrainConfig = Field(default_factory=TrainConfig, description="The pretrain config of every variant "
                                  "(the pretrain flow's parameters less input), e.g. preset, max_steps.")
    seeds: list[int] | None = Field(None, description="Pretrain each variant once per seed and report mean and "
                                    "spread; null: [pretrain.seed].")
    evaluate: EvaluateSection = Field(default_factory=lambda: EvaluateSection(prompts=[]),  # type: ignore[valid-type, call-arg]
                                      description="The evaluation of every model (the evaluate flow's parameters "
                                      "less input and data), e.g. tasks, limit; prompts: [] skips generation samples.")
    parallel: int | None = Field(None, ge=1, description="Variants run at once (their data stages; training and "
                                 "evaluation take turns); null: the task runner's width (threads:N -> N).")

    @field_validator("variants", mode="before")
    @classmethod
    def _yaml_text(cls, v):
        """``--set 'variants={a: {dedup.near: false}}'`` and ``--set 'variants.a={dedup.near: false}'``
        arrive as text (the CLI keeps a mapping typed on the command line as text): read it as YAML."""
        import yaml

        def load(x):
            if not isinstance(x, str):
                return x
            try:
                return yaml.safe_load(x)
            except yaml.YAMLError as e:
                raise ValueError(f"not a YAML mapping: {x!r} ({e})") from None

        v = load(v)
        return {k: load(o) for k, o in v.items()} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _check(self):
        # before anything runs: a typo in any variant fails here, naming the variant and the key
        if not self.input.replace(",", " ").strip() and self.demo_crawl is None and not self.curate.ingest.inputs:
            raise ValueError("ablate needs an input: --set input=crawl/*.warc.gz, or demo_crawl: {pages: 400}")
        seeds = self.seed_list()
        if len(set(seeds)) != len(seeds) or not seeds:
            raise ValueError(f"seeds: expected distinct seeds, got {seeds}")
        curate_configs(self)
        return self

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [self.pretrain.seed]


def curate_configs(p: AblateParams, input_: str = "<input>") -> dict[str, CurateParams]:
    """Each variant's full curate parameters (the base's first), validated as the curate flow will."""
    from refinery.flows.helptext import explain
    from refinery.tasks.ablate.variants import variant_configs

    base = p.curate.model_dump(exclude_unset=True, exclude_computed_fields=True)  # type: ignore[attr-defined]  # a section model built at import
    merged = variant_configs(base, p.variants, p.base_name, forbidden=SHARED_CURATE)
    out, errors = {}, []
    for name, cfg in merged.items():
        try:
            out[name] = CurateParams.model_validate({**cfg, "workdir": p.workdir, "task_runner": p.task_runner,
                                                     "input": input_})
        except ValidationError as e:   # every variant's mistakes at once, each line naming its variant
            where = "curate" if name == p.base_name else f"variants.{name}"
            errors += [f"{where}: {line.strip().removeprefix('- ')}"
                       for line in explain("curate", CurateParams, e).splitlines() if line.strip()]
    if errors:
        raise ValueError("\n  - ".join(errors))
    return out


# --------------------------------------------------------------------------- one variant
@dataclass
class Shared:
    """What the base phase made, which every variant uses."""
    workdir: str
    task_runner: str
    tokenizer: str
    heldout: str
    heldout_source: str | None          # the held-out texts as a decontamination source (JSONL)
    heldout_ngram: int | None
    tokenize: dict
    pretrain: dict
    seeds: list[int]
    evaluate: dict


@dataclass
class VariantResult:
    name: str
    curate: list[str] = field(default_factory=list)      # its curate stages' datasets, in order
    trained_docs: str | None = None
    tokens: str = ""
    models: dict[int, str] = field(default_factory=dict)
    evaluations: dict[int, str] = field(default_factory=dict)


def _curate_outputs(out: dict) -> list[str]:
    return [path for path in out["outputs"].values()]


def run_variant(name: str, curate: CurateParams, shared: Shared, curated: dict | None = None) -> VariantResult:
    """Curate (unless ``curated`` is the curate flow's result already), drop what overlaps the
    held-out documents, tokenize, then train and evaluate once per seed."""
    from refinery.flows.cli import load_flow
    from refinery.tasks.decontam.stage import DecontamConfig, decontam_stages
    from refinery.tasks.runtime import make_runner
    from refinery.tasks.store import Dataset
    from refinery.tasks.tokens.stage import Tokenize

    res = VariantResult(name)
    curated = curated or load_flow("curate").run_params(curate)
    res.curate = _curate_outputs(curated)
    docs = Dataset.open(curated["primary"])
    skip: list = []
    with make_runner(shared.task_runner) as runner:
        if shared.heldout_source:
            cfg = DecontamConfig(sources=[shared.heldout_source], n=shared.heldout_ngram or 13)
            docs = decontam_stages(shared.workdir, docs, cfg, runner=runner)["decontaminate"]
            res.trained_docs = docs.path
        else:   # no n-gram step: the tokenize stage still skips the held-out documents themselves (by id)
            skip = [Dataset.open(shared.heldout)]
        tok_cfg = TokenizeConfig.model_validate(shared.tokenize)
        tokens = Tokenize.call(shared.workdir, [docs, Dataset.open(shared.tokenizer), *skip], tok_cfg, runner=runner)
    res.tokens = tokens.path
    for seed in shared.seeds:
        res.models[seed] = train(tokens.path, seed, shared)
        res.evaluations[seed] = evaluate_model(res.models[seed], shared)
    return res


def train(tokens: str, seed: int, shared: Shared) -> str:
    """One ``pretrain`` subflow (cached by fingerprint like every stage)."""
    from refinery.flows.cli import load_flow
    from refinery.flows.pretrain import PretrainParams

    params = PretrainParams.model_validate({**shared.pretrain, "seed": seed, "input": tokens,
                                            "workdir": shared.workdir, "task_runner": shared.task_runner})
    with _TORCH:
        out = load_flow("pretrain").run_params(params)
    return out["primary"]


def evaluate_model(model: str, shared: Shared) -> str:
    """The evaluate stage for one model on the shared held-out documents and tasks: one dataset
    per model, so a new variant evaluates only its own models."""
    from refinery.flows.evaluate import stage_config
    from refinery.tasks.eval.stage import evaluate
    from refinery.tasks.store import Dataset

    params = EvaluateParams.model_validate({**shared.evaluate, "input": model, "data": shared.heldout,
                                            "workdir": shared.workdir, "task_runner": shared.task_runner})
    _, cfg = stage_config(params)
    with _TORCH, gpu_slot():
        return evaluate.call(shared.workdir, [Dataset.open(shared.heldout)], cfg).path


def _variant_flow():
    """The ``ablate-variant`` subflow (made on first use: Prefect is imported lazily)."""
    global _VARIANT_FLOW
    if _VARIANT_FLOW is None:
        from prefect import flow

        def ablate_variant(name: str, curate: dict, shared: dict, curated: dict | None = None) -> dict:
            """One variant of an ablation: curate, held-out decontamination, tokenize, train and
            evaluate per seed."""
            res = run_variant(name, CurateParams.model_validate(curate), Shared(**shared), curated)
            return res.__dict__

        _VARIANT_FLOW = flow(name="ablate-variant", flow_run_name="ablate-variant-{name}", log_prints=True,
                             validate_parameters=False)(ablate_variant)
    return _VARIANT_FLOW


_VARIANT_FLOW: Any = None


def run_variants(configs: dict[str, CurateParams], shared: Shared, parallel: int,
                 curated: dict[str, dict]) -> list[VariantResult]:
    """Every variant's subflow, ``parallel`` at a time (threads carrying the flow run's context, so
    each is a child of this run); results in the variants' order whatever finishes first. A failed
    variant fails the ablation once the others are done, naming it."""
    sub = _variant_flow()
    dumped = {n: c.model_dump(mode="json", exclude_computed_fields=True) for n, c in configs.items()}

    def one(name: str) -> dict:
        return sub(name=name, curate=dumped[name], shared=shared.__dict__, curated=curated.get(name))

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(configs))), thread_name_prefix="ablate") as pool:
        futures = {n: pool.submit(contextvars.copy_context().run, one, n) for n in configs}
        results, failed = [], []
        for n, fut in futures.items():
            try:
                got = fut.result()   # Prefect's parameters and results are JSON: seeds come back as text keys
                results.append(VariantResult(**{**got, "models": _int_keys(got["models"]),
                                                "evaluations": _int_keys(got["evaluations"])}))
            except Exception as e:  # noqa: BLE001 - every variant is waited for, then all failures named
                failed.append(f"{n}: {type(e).__name__}: {e}")
    if failed:
        raise RuntimeError("ablate: variant(s) failed:\n  " + "\n  ".join(failed))
    return results


def _int_keys(d: dict) -> dict[int, str]:
    return {int(k): v for k, v in d.items()}


def runner_width(spec: str, n: int) -> int:
    """How many variants run at once by default: ``threads:N`` (processes, dask, ray) -> N, else
    the CPU count; never more than the variants."""
    kind, _, arg = (spec or "threads").partition(":")
    width = int(arg) if arg.isdigit() else (os.cpu_count() or 1)
    return max(1, min(width, n))


# --------------------------------------------------------------------------- the base phase
def crawl_input(p: AblateParams) -> str:
    """The crawl files: ``input``, or the generated demo crawl (written where the demo writes it,
    and only rewritten when its bytes change, so its files keep their identity across runs)."""
    if p.demo_crawl is None:
        return p.input
    from refinery.tasks.demo.crawl import make_demo_crawl

    work = Path(p.workdir) if "://" not in p.workdir else Path("refinery-demo-inputs")
    crawl_dir = work / "demo-inputs" / f"crawl-{p.demo_crawl.seed}-{p.demo_crawl.pages}"
    files = make_demo_crawl(crawl_dir, seed=p.demo_crawl.seed, n_pages=p.demo_crawl.pages)
    print(f"ablate: demo crawl, {len(files)} WARC files in {crawl_dir}", file=sys.stderr)
    return ",".join(str(f) for f in files)


def local_folder(p: AblateParams) -> Path:
    """A local folder for the ablation's small input files (the held-out JSONL)."""
    if "://" not in p.workdir:
        return Path(p.workdir) / "ablate-inputs"
    return Path(os.environ.get("REFINERY_CACHE", Path.home() / ".cache" / "refinery")) / "ablate-inputs"


def base_phase(p: AblateParams, base: CurateParams) -> tuple[dict, Shared]:
    """Curate the base, pick the held-out documents and the tokenizer every variant shares."""
    from refinery.flows.cli import load_flow
    from refinery.tasks.ablate.heldout import heldout_jsonl
    from refinery.tasks.runtime import make_runner
    from refinery.tasks.store import Dataset
    from refinery.tasks.tokens.holdout import holdout
    from refinery.tasks.tokens.tokenizer import tokenizer_stage

    curated = load_flow("curate").run_params(base)
    with make_runner(p.task_runner) as runner:
        if p.heldout:
            held = Dataset.open(p.heldout)
        else:
            if p.holdout.fraction <= 0:
                raise ValueError("ablate needs held-out documents: set heldout, or holdout.fraction > 0")
            held = holdout.call(p.workdir, [Dataset.open(curated["primary"])], p.holdout, runner=runner)
        source = str(heldout_jsonl(held, local_folder(p))) if p.heldout_ngram else None
        if p.tokenizer.path:
            tok_inputs = []
        else:
            tok_inputs = [Dataset.open(curated["outputs"]["ingest"] if p.tokenizer_data == "ingest"
                                       else curated["primary"])]
        tok = tokenizer_stage.call(p.workdir, tok_inputs, p.tokenizer, runner=runner)
    shared = Shared(workdir=p.workdir, task_runner=p.task_runner, tokenizer=tok.path, heldout=held.path,
                    heldout_source=source, heldout_ngram=p.heldout_ngram,
                    tokenize=p.tokenize.model_dump(mode="json", exclude_computed_fields=True),
                    pretrain=p.pretrain.model_dump(mode="json", exclude_computed_fields=True),
                    seeds=p.seed_list(),
                    evaluate=p.evaluate.model_dump(mode="json", exclude_computed_fields=True))  # type: ignore[attr-defined]
    return curated, shared


# --------------------------------------------------------------------------- the comparison
def compare(p: AblateParams, results: list[VariantResult], shared: Shared):
    """The ``ablation`` stage over every dataset the variants made."""
    from refinery.tasks.ablate.stage import AblationConfig, Entry, ablation
    from refinery.tasks.ablate.variants import expand, flatten

    entries, inputs = [], []

    def add(variant: str, role: str, path: str, seed: int | None = None) -> None:
        entries.append(Entry(variant=variant, role=role, seed=seed))
        inputs.append(path)

    for r in results:
        for path in r.curate:
            add(r.name, "curate", path)
        if r.trained_docs:
            add(r.name, "trained_docs", r.trained_docs)
        add(r.name, "tokens", r.tokens)
        for seed in shared.seeds:
            add(r.name, "model", r.models[seed], seed)
            add(r.name, "evaluate", r.evaluations[seed], seed)
    overrides = {p.base_name: {}, **{n: flatten(expand(o)) for n, o in p.variants.items()}}
    cfg = AblationConfig(base=p.base_name, variants=overrides, seeds=shared.seeds, entries=entries)
    return ablation.call(p.workdir, inputs, cfg)


def report(ds) -> list[dict]:
    """Print the comparison table (from the manifest, the same on a cached run) and publish it, the
    rows and the picture as artifacts."""
    from refinery.tasks.ablate.stage import read_rows
    from refinery.tasks.report import image_artifact, markdown_artifact, markdown_table, table_artifact

    m = ds.manifest
    rows = read_rows(ds)
    order = list(dict.fromkeys(r["variant"] for r in rows))   # the manifest sorts keys: the base first again
    table = [{"metric": r["metric"], **{v: r.get(v, "") for v in order}} for r in m.get("comparison", [])]
    title = f"== ablate: variants against {m.get('base')} over seeds {m.get('seeds')}\n   {m.get('legend', '')}"
    print_table(table, title=title)
    changes = [{"variant": v, "overrides": ", ".join(f"{k}={val}" for k, val in m["variants"].get(v, {}).items())
                or "(base)"} for v in order]
    print_table(changes, title="== ablate: variants")
    print(f"ablate: rows and plot in {ds.path} ({m.get('plot')})", file=sys.stderr)
    table_artifact("ablate-comparison", table, description="Every metric (rows) per variant (columns): "
                   + m.get("legend", ""))
    table_artifact("ablate-rows", rows, description="One row per (variant, seed, metric)")
    markdown_artifact("ablate-variants", "# Variants\n\n" + markdown_table(changes))
    image_artifact("ablate-plot", f"{ds.local_path()}/{m.get('plot')}", description="Training curves and "
                   "the headline metric with its seed spread")
    return table


@refinery_flow("ablate", AblateParams)
def ablate_flow(p: AblateParams) -> dict:
    """Ablate curation choices: train the same small model on each variant of the data and compare evaluations."""
    crawl = crawl_input(p)
    configs = curate_configs(p, crawl)
    base_curated, shared = base_phase(p, configs[p.base_name])
    width = p.parallel or runner_width(p.task_runner, len(configs))
    results = run_variants(configs, shared, width, {p.base_name: base_curated})
    ds = compare(p, results, shared)
    table = report(ds)
    outputs: dict[str, str] = {"heldout": shared.heldout, "tokenizer": shared.tokenizer}
    for r in results:
        outputs[f"{r.name}/documents"] = r.trained_docs or r.curate[-1]
        outputs[f"{r.name}/tokens"] = r.tokens
        for seed in shared.seeds:
            outputs[f"{r.name}/model-seed{seed}"] = r.models[seed]
            outputs[f"{r.name}/evaluate-seed{seed}"] = r.evaluations[seed]
    outputs["ablation"] = ds.path
    out = {"primary": ds.path, "outputs": outputs, "counts": {"ablation": ds.counts}, "table": table}
    emit_completed("ablate", out, primary=ds.path)
    return out
