"""demo: the whole pipeline on a generated crawl, on embedded defaults (no server, network or GPU)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from refinery.flows.common import FlowParams, refinery_flow
from refinery.tasks.report import format_table, markdown_artifact, markdown_table, table_artifact

# Small enough for a few minutes on 2 CPU cores, big enough that every stage visibly does something.
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    # The demo crawl plants pages on a gambling domain; a real deployment lists its own.
    "curate": {"filters": {"url": {"extra_domains": ["royal-casino-bets.com"]}}},
    "tokenize": {"tokenizer": {"vocab_size": 2048}},
    # Trained on 128-token windows, with room for the longer instruction examples of the fine-tune.
    "pretrain": {"preset": "tiny", "max_steps": 300, "seq_len": 128, "batch_size": 16, "eval_every": 50,
                 "model": {"max_position_embeddings": 512}},
    "finetune": {"method": "lora", "max_steps": 60, "seq_len": 384},
    "align": {"method": "dpo", "max_steps": 30},
}


class DemoParams(FlowParams):
    pages: int = Field(400, description="Pages in the generated demo crawl.")
    seed: int = Field(0, description="Seed of the demo crawl and of every training stage.")
    stop_after: str = Field("align", description="Last flow to run: curate, tokenize, pretrain, finetune or align.")
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per-flow parameter overrides, e.g. {\"pretrain\": {\"max_steps\": 100}}.")


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


@refinery_flow("demo", DemoParams)
def demo_flow(p: DemoParams) -> dict:
    """Generate a small deterministic crawl and run curate, tokenize, pretrain, finetune and align on it."""
    from refinery.flows.cli import deep_merge, load_flow
    from refinery.flows.pipeline import primary_output
    from refinery.tasks.demo.crawl import make_demo_crawl
    from refinery.tasks.demo.instructions import make_instructions, make_preferences

    work = Path(p.workdir) if "://" not in p.workdir else Path("refinery-demo-inputs")
    crawl_dir = work / "demo-inputs" / f"crawl-{p.seed}-{p.pages}"
    files = make_demo_crawl(crawl_dir, seed=p.seed, n_pages=p.pages)
    print(f"demo crawl: {len(files)} WARC files in {crawl_dir}", file=sys.stderr)

    order = ["curate", "tokenize", "pretrain", "finetune", "align"]
    last = order.index(p.stop_after) if p.stop_after in order else len(order) - 1
    common = {"workdir": p.workdir, "task_runner": p.task_runner}
    outputs: dict[str, str] = {}
    counts: dict[str, Any] = {}
    summary: list[dict] = []
    upstream = ",".join(str(f) for f in files)
    curated = None
    for name in order[: last + 1]:
        extra: dict[str, Any] = {"input": upstream}
        if name == "curate":
            extra["source"] = "demo-crawl"
        if name in ("pretrain", "finetune", "align"):
            extra["seed"] = p.seed
        if name == "finetune":
            extra["data"] = str(make_instructions(_docs(curated), crawl_dir / "instructions.json", seed=p.seed))
        if name == "align":
            extra["data"] = str(make_preferences(_docs(curated), crawl_dir / "preferences.jsonl", seed=p.seed))
        flow = load_flow(name)
        cfg = deep_merge(deep_merge(DEMO_DEFAULTS.get(name, {}), p.overrides.get(name, {})), {**common, **extra})
        out = flow.run_params(flow.params_cls.model_validate(cfg))
        outputs.update(out["outputs"])
        counts.update(out["counts"])
        for stage, c in out["counts"].items():
            summary.append(_summary_row(name, stage, c))
        if name == "curate":
            curated = primary_output(name, out)
        upstream = primary_output(name, out)
    print(format_table(summary, title="== demo: counts per stage"), file=sys.stderr)
    table_artifact("demo-summary", summary, description="Counts per stage of the demo run")
    markdown_artifact("demo-outputs", "# Demo outputs\n\n" + markdown_table(
        [{"stage": k, "path": v} for k, v in outputs.items()]))
    return {"outputs": outputs, "counts": counts}
