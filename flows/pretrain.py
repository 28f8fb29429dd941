"""Flow ``pretrain``: a token dataset -> a pretrained Hugging Face model folder.

    refinery run pretrain --set input=WORK/tokenize/<fp> --set max_steps=300 --json

Every TrainConfig field is a flow parameter, spelled as in the finetune flow and align's nested
configs (``max_steps``, ``lr``, ``batch_size``, ``grad_accum``, ``warmup_steps`` / ``warmup_ratio``,
``scheduler``, ``eval_every``, ``early_stopping_patience``, ``seed``, ``device``, ``dtype``, ...; see
:mod:`refinery.tasks.train.config`), plus the pretraining ones (``objective``, ``preset``, ``model``,
``seq_len``, ``compile``, ``devices``, ...). Re-running after a crash or SIGTERM resumes from
``<workdir>/checkpoints/<fingerprint>/``.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from refinery.flows.common import FlowParams, emit_completed, gpu_slot, print_table, refinery_flow, result
from refinery.tasks.report import markdown_artifact, markdown_table, table_artifact
from refinery.tasks.train.config import TrainConfig
from refinery.tasks.train.stage import pretrain


class _Inputs(FlowParams):
    """The storage root and the input: first in the help and the Prefect form."""

    input: str = Field(description="Token dataset path (output of the tokenize flow); several datasets "
                       "separated by commas are mixed (see weights).")


class PretrainParams(TrainConfig, _Inputs):
    """Flow parameters: the storage root, the input token dataset(s), then the training config."""

    flow_name: ClassVar[str] = "pretrain"

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))

    def inputs(self) -> list[str]:
        return [s.strip() for s in self.input.split(",") if s.strip()]

    def memory_plan(self):
        """The memory estimate per device of this run (``refinery plan pretrain``)."""
        from refinery.tasks.train.plan import plan_pretrain

        return plan_pretrain(self.train_config(), self.inputs())


def _report(ds) -> None:
    m = ds.manifest
    summary = [{"steps": ds.counts.get("steps"), "tokens": ds.counts.get("tokens"), "params": ds.counts.get("params"),
                "val_loss_start": m.get("val_loss_start"), "val_loss_end": m.get("val_loss_end"),
                "best_step": m.get("best_step"), "unigram_entropy": m.get("unigram_entropy"),
                "tokens_per_sec": m.get("training", {}).get("tokens_per_sec"),
                "mfu": m.get("training", {}).get("mfu")}]
    print_table(summary, title="== pretrain")
    table_artifact("pretrain-summary", summary, description="pretraining: validation loss vs the unigram baseline")
    markdown_artifact("pretrain-report", markdown_table(summary))
    # the per-step table and loss.png from the dataset's metrics/ folder (the same for every trainer)
    from refinery.tasks.train.metrics import report_metrics

    report_metrics(ds, "pretrain", description="loss, lr, tokens/sec, MFU, validation loss by step")


@refinery_flow("pretrain", PretrainParams)
def pretrain_flow(p: PretrainParams) -> dict:
    """Pretrain a causal LM (or MLM / T5 span corruption) from config on token datasets."""
    with gpu_slot():
        ds = pretrain.call(p.workdir, p.inputs(), p.train_config())
    _report(ds)
    out = result({"pretrain": ds}, val_loss_start=ds.manifest.get("val_loss_start"),
                 val_loss_end=ds.manifest.get("val_loss_end"), unigram_entropy=ds.manifest.get("unigram_entropy"))
    emit_completed("pretrain", out, primary=ds.path)  # the finetune deployment's trigger
    return out
