"""demo: the whole pipeline on a generated crawl, on embedded defaults (no server, network or GPU)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from refinery.flows.align import AlignSettings
from refinery.flows.common import FlowParams, print_table, refinery_flow
from refinery.flows.pipeline import (ORDER, TRAINED, CurateSection, EvaluateSection, TokenizeSection, check_sections,
                                     flow_params, primary_output)
from refinery.tasks.finetune.config import FinetuneSettings
from refinery.tasks.report import markdown_artifact, markdown_table, table_artifact
from refinery.tasks.train.config import TrainConfig

# Small enough for a few minutes on 2 CPU cores, big enough that every stage visibly does something.
# Each section is that flow's parameters (as in the pipeline); what a run sets is merged over these.
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    # The demo crawl plants pages on a gambling domain; a real deployment lists its own.
    "curate": {"source": "demo-crawl", "filters": {"url": {"extra_domains": ["royal-casino-bets.com"]}}},
    "tokenize": {"tokenizer": {"vocab_size": 2048}},
    # Trained on 128-token windows, with room for the longer instruction examples of the fine-tune.
    "pretrain": {"preset": "tiny", "max_steps": 300, "seq_len": 128, "batch_size": 16, "eval_every": 50,
                 "model": {"max_position_embeddings": 512}},
    "finetune": {"method": "lora", "max_steps": 60, "seq_len": 384},
    "align": {"method": "dpo", "dpo": {"max_steps": 30}},
}
SEEDED = ("pretrain", "finetune", "align")  # sections whose seed defaults to the demo's
# The demo's evaluation: held-out documents, and without other tasks the shipped local GSM8K task
# on arithmetic problems the demo writes (tasks.eval.problems); short generations on 2 CPU cores.
DEMO_EVALUATE: dict[str, Any] = {"limit": 10, "gen_kwargs": "max_gen_toks=32", "prompts": ["Once upon a time"],
                                 "max_new_tokens": 24, "max_docs": 200}
GSM8K_TASK = Path(__file__).resolve().parents[1] / "configs" / "eval" / "gsm8k_local.yaml"


class DemoParams(FlowParams):
    """Flow parameters: the demo crawl, then one typed section per flow (as in the pipeline),
    defaulting to :data:`DEMO_DEFAULTS`."""

    flow_name: ClassVar[str] = "demo"

    pages: int = Field(400, ge=1, description="Pages in the generated demo crawl.")
    seed: int = Field(0, description="Seed of the demo crawl, its instructions and preference pairs, and the "
                      "default seed of the pretrain, finetune and align sections.")
    stop_after: Literal["curate", "tokenize", "pretrain", "finetune", "align"] = Field(
        "align", description="Last flow to run: curate, tokenize, pretrain, finetune or align.")
    curate: CurateSection = Field(default_factory=lambda: CurateSection(**DEMO_DEFAULTS["curate"]),  # type: ignore[valid-type]
                                  description="The curate flow's parameters (less input).")
    tokenize: TokenizeSection = Field(default_factory=lambda: TokenizeSection(**DEMO_DEFAULTS["tokenize"]),  # type: ignore[valid-type]
                                      description="The tokenize flow's parameters (less input).")
    pretrain: TrainConfig = Field(default_factory=lambda: TrainConfig(**DEMO_DEFAULTS["pretrain"]),
                                  description="The pretrain flow's parameters (less input).")
    finetune: FinetuneSettings = Field(default_factory=lambda: FinetuneSettings(**DEMO_DEFAULTS["finetune"]),
                                       description="The finetune flow's parameters (less input and data).")
    align: AlignSettings = Field(default_factory=lambda: AlignSettings(**DEMO_DEFAULTS["align"]),
                                 description="The align flow's parameters (less input and data).")
    evaluate: EvaluateSection | None = Field(default_factory=lambda: EvaluateSection(**DEMO_EVALUATE),  # type: ignore[valid-type]
                                             description="The evaluate flow's parameters (less input) for the final comparison of the trained models; null skips it.")

    @model_validator(mode="before")
    @classmethod
    def _demo_defaults(cls, data: Any) -> Any:
        """What a run sets in a section is merged over the demo's defaults for it (``--set
        pretrain.max_steps=100`` keeps the demo's preset and seq_len), and the training
        sections' seed defaults to the demo's ``seed``."""
        if not isinstance(data, dict):
            return data
        from refinery.flows.cli import deep_merge

        data = dict(data)
        for name in ORDER:
            given = data.get(name) or {}
            if hasattr(given, "model_dump"):  # an instance: only what it set explicitly
                given = given.model_dump(exclude_unset=True, exclude_computed_fields=True)
            base = dict(DEMO_DEFAULTS.get(name, {}))
            if name in SEEDED:
                base["seed"] = data.get("seed", 0)
            data[name] = deep_merge(base, given)
        if isinstance(data.get("evaluate"), dict):   # likewise for the evaluation (null still skips it)
            data["evaluate"] = deep_merge(DEMO_EVALUATE, data["evaluate"])
        return data


def _docs(ds_path: str, limit: int = 2000) -> list[dict]:
    from refinery.tasks.store import Dataset

    table = Dataset.open(ds_path).read_table(columns=["id", "text", "url"])
    return table.slice(0, limit).to_pylist()


def _summary_row(flow: str, stage: str, c: dict) -> dict:
    """The few numbers that say what a stage did, whatever its kind."""
    dropped = c.get("dropped")
    if isinstance(dropped, dict):
        dropped = sum(v for v in dropped.values() if isinstance(v, (int, float)))
    return {"flow": flow, "stage": stage, "docs_in": c.get("docs_in", ""), "docs_out": c.get("docs_out", ""),
            "dropped": dropped if dropped is not None else "", "tokens": c.get("tokens", c.get("train_tokens", "")),
            "steps": c.get("steps", ""), "examples": c.get("examples", c.get("pairs", ""))}


def _evaluate(p: DemoParams, models: dict[str, str], crawl_dir: Path, common: dict) -> dict:
    """One evaluate run over the trained models, and one table: held-out bits per byte and the
    local GSM8K task per model."""
    from refinery.flows.cli import load_flow
    from refinery.flows.evaluate import EvaluateParams, model_label
    from refinery.tasks.eval.problems import write_problems

    assert p.evaluate is not None  # the caller runs this only with an evaluate section
    own = p.evaluate.model_dump()
    if not own["tasks"]:
        own["tasks"] = [str(GSM8K_TASK)]
        own["data_files"] = {"gsm8k_local": str(write_problems(crawl_dir / "arithmetic.jsonl", seed=p.seed)),
                             **own["data_files"]}
    params = EvaluateParams.model_validate({**own, **common, "input": ",".join(models.values())})
    out = load_flow("evaluate").run_params(params)
    flow_of = {model_label(path): name for name, path in models.items()}
    rows: dict[str, dict] = {}
    for r in out.get("results", []):
        if r["task"] == "heldout" or not r["task"].startswith("heldout["):
            key = "heldout " + r["metric"] if r["task"] == "heldout" else f"{r['task']} {r['metric']}"
            rows.setdefault(r["model"], {"model": flow_of.get(r["model"], r["model"])})[key] = r["value"]
    table = list(rows.values())
    print_table(table, title="== demo: evaluation (held-out documents; GSM8K-format problems: "
                                    "a model this small scores about zero)")
    table_artifact("demo-evaluation", table, description="Held-out bits per byte and local GSM8K per trained model")
    return out


@refinery_flow("demo", DemoParams)
def demo_flow(p: DemoParams) -> dict:
    """Generate a small deterministic crawl and run curate, tokenize, pretrain, finetune and align on it."""
    from refinery.flows.cli import load_flow
    from refinery.tasks.demo.crawl import make_demo_crawl
    from refinery.tasks.demo.instructions import make_instructions, make_preferences

    work = Path(p.workdir) if "://" not in p.workdir else Path("refinery-demo-inputs")
    crawl_dir = work / "demo-inputs" / f"crawl-{p.seed}-{p.pages}"
    files = make_demo_crawl(crawl_dir, seed=p.seed, n_pages=p.pages)
    print(f"demo crawl: {len(files)} WARC files in {crawl_dir}", file=sys.stderr)

    names = list(ORDER[: ORDER.index(p.stop_after) + 1])
    common = {"workdir": p.workdir, "task_runner": p.task_runner}
    sections = {name: getattr(p, name) for name in ORDER}
    check_sections(names, sections, common)  # a bad late section fails before curate runs
    outputs: dict[str, str] = {}
    counts: dict[str, Any] = {}
    summary: list[dict] = []
    upstream = ",".join(str(f) for f in files)
    curated = ""
    models: dict[str, str] = {}
    for name in names:
        supplied: dict[str, Any] = {**common, "input": upstream}
        if name == "finetune":
            supplied["data"] = str(make_instructions(_docs(curated), crawl_dir / "instructions.json", seed=p.seed))
        if name == "align":
            supplied["data"] = str(make_preferences(_docs(curated), crawl_dir / "preferences.jsonl", seed=p.seed))
        # a subflow: its completion event says so (refinery.subflow "true"), and no deployment trigger
        # fires on it, so a demo against a server with the project's deployments starts none of them
        out = load_flow(name).run_params(flow_params(name, sections[name], supplied))
        outputs.update(out["outputs"])
        counts.update(out["counts"])
        for stage, c in out["counts"].items():
            summary.append(_summary_row(name, stage, c))
        if name == "curate":
            curated = primary_output(name, out)
        upstream = primary_output(name, out)
        if name in TRAINED:
            models[name] = upstream
    if p.evaluate is not None and models:
        ev = _evaluate(p, models, crawl_dir, common)
        outputs["evaluate"], counts["evaluate"] = ev["outputs"]["evaluate"], ev["counts"]["evaluate"]
    print_table(summary, title="== demo: counts per stage")
    table_artifact("demo-summary", summary, description="Counts per stage of the demo run")
    markdown_artifact("demo-outputs", "# Demo outputs\n\n" + markdown_table(
        [{"stage": k, "path": v} for k, v in outputs.items()]))
    return {"primary": upstream, "outputs": outputs, "counts": counts}
