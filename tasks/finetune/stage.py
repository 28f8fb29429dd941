"""The ``finetune`` stage: (base model, instruction file, config) -> a dataset holding the result.

Output dataset layout::

    adapter/     PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer files
    merged/      lora / qlora / ia3: the adapter folded into the base (plain transformers folder)
    config.json, model.safetensors, tokenizer files ...   method=full: the whole model at the top
    metrics/     the run's per-step metrics (metrics.jsonl, loss.png, tensorboard/; the common
                 schema of refinery.tasks.train.metrics); a copy sits in adapter/ and merged/ too
    samples.parquet   held-out instructions generated before and after training
    manifest.json     extra keys: method, base_model, and the folders (relative): ``model`` the complete
                      model every consumer loads (``merged`` under an adapter, ``.`` for method=full),
                      ``adapter`` and ``merged``; prompt/prefix tuning and LLaMA-Adapter cannot be merged,
                      so their datasets hold an adapter and no ``model`` (refinery.tasks.modelref)

The raw inputs are no datasets, so their identities (content hash of the data file; a model
folder's file names, sizes and mtimes, or a refinery model dataset's fingerprint, or the hub id)
sit in ``cfg.identity`` and therefore in the fingerprint.

Training runs on the engine (refinery.tasks.engine; refinery.tasks.finetune.train's SFTMethod,
classify's ClassifyMethod). Checkpoints (every ``checkpoint_every`` steps, and on SIGTERM) and the
live metrics folder sit in ``<workdir>/checkpoints/<fingerprint>/``: a run that was stopped raises
and publishes nothing, and running the same stage again resumes it from its newest checkpoint.
"""
from __future__ import annotations

import gc
import os
import sys

from refinery.tasks.export.card import portable_ref, with_model_cards
from refinery.tasks.finetune.config import FinetuneConfig
from refinery.tasks.runtime import StageOutput, stage
from refinery.tasks.train.multinode import MultiNodeStage
from refinery.tasks.store import Builder, Dataset


def _logger():
    try:
        from prefect import get_run_logger

        lg = get_run_logger()
        return lg.info
    except Exception:
        return lambda msg: print(msg, file=sys.stderr)


def _free(device) -> None:
    """Give the training model's GPU memory back before the merge (a full gc costs ~1 s; CPU skips it)."""
    if device.type == "cuda":
        import torch

        gc.collect()
        torch.cuda.empty_cache()


@stage("finetune", version="1", kind=MultiNodeStage)
@with_model_cards   # README.md in merged/ and adapter/ (or the dataset, full): refinery.tasks.export.card
def finetune(b: Builder, inputs: list[Dataset], cfg: FinetuneConfig) -> StageOutput:
    """Supervised fine-tuning of a causal LM by full / LoRA / QLoRA / IA3 / LLaMA-Adapter / prompt /
    prefix tuning, with response-only loss, optional packing and early stopping."""
    import pyarrow as pa

    from refinery.tasks.finetune import methods as M
    from refinery.tasks.finetune import seq2seq as S
    from refinery.tasks.finetune.train import evaluate, generate_samples, prepare_data, run_summary, train_sft
    from refinery.tasks.train.common import PeakMemory, seed_everything
    from refinery.tasks.train.metrics import METRICS_DIR, publish_metrics
    from refinery.tasks.train.plan import plan_finetune, plan_or_note
    from refinery.tasks.train.stage import checkpoint_dir

    log = _logger()
    seed_everything(cfg.seed)
    # checkpoints (a rerun of the same stage resumes from the newest) and the live metrics folder
    ckpt_dir = checkpoint_dir(b)
    metrics_dir = ckpt_dir / METRICS_DIR

    # -- data
    source = M.resolve_model_source(cfg.model)
    kind = S.model_kind(source)   # the model's config decides: chat SFT (causal) or text-to-text (seq2seq)
    if kind == "encoder":   # classification: labelled texts and a new head (refinery.tasks.finetune.classify)
        from refinery.tasks.finetune import classify as C

        return C.run(b, cfg, source, log, plan_or_note(lambda: plan_finetune(cfg), log=log), ckpt_dir)
    if kind == "seq2seq" and cfg.packing:
        raise ValueError("packing=true is for causal LMs; encoder-decoder models take one example per row")
    tok = M.load_tokenizer(cfg, source)
    data = prepare_data(cfg, source, tok, kind, log=log, progress=True)
    seq_len, report, template = data.seq_len, data.report, data.template
    train_items, val_items, val_batches, sample_ex = data.train_items, data.val_items, data.val_batches, data.sample_ex
    train_counts, val_counts = data.train_counts, data.val_counts
    log(f"finetune[{cfg.method}]: {report.records} records ({report.bad} bad), {len(train_items)} train / "
        f"{len(val_items)} validation examples, {train_counts.get('truncated', 0) + val_counts.get('truncated', 0)} "
        f"truncated to {seq_len} tokens, chat template: {template}")

    # -- memory: the estimate per device, printed and kept; a run that cannot fit stops here
    memory_plan = plan_or_note(lambda: plan_finetune(cfg), log=log)

    # -- model, before
    device = M.resolve_device(cfg)
    compute_dtype, weights_dtype = M.resolve_dtypes(cfg, device)
    with PeakMemory(device) as mem:
        model = M.load_base_model(cfg, source, device, compute_dtype, weights_dtype)
        val_before = evaluate(model, val_batches, device, compute_dtype)
        samples_before = generate_samples(model, tok, sample_ex, device, cfg.sample_max_new_tokens,
                                          max_prompt_tokens=seq_len)
        seed_everything(cfg.seed)   # the adapter's initial weights do not depend on the steps before
        model = M.wrap_model(cfg, model, source)
        params = M.trainable_summary(model)
        footprint = M.memory_footprint(model)
        log(f"finetune[{cfg.method}]: {params['trainable_params']:,} trainable of {params['total_params']:,} "
            f"parameters ({params['trainable_pct']}%), lr {cfg.resolved_lr():g}, device {device.type}")
        seed_everything(cfg.seed)
        if cfg.launches():   # worker processes train; their weights come back into this model
            from refinery.tasks.finetune.processes import train_on_processes

            run = train_on_processes(cfg, model, ckpt_dir, metrics_dir, log, task="sft")
        else:
            engine, result = train_sft(cfg, model, train_items, val_batches, data.pad_id, device, compute_dtype,
                                       seq_len=seq_len, ckpt_dir=ckpt_dir, metrics_dir=metrics_dir, log=log,
                                       progress=True)
            result.raise_if_interrupted(ckpt_dir)   # never publish a half-trained model
            run = run_summary(cfg, engine, result)
            del engine
        val_after = evaluate(model, val_batches, device, compute_dtype)
        samples_after = generate_samples(model, tok, sample_ex, device, cfg.sample_max_new_tokens,
                                         no_cache=cfg.method == "prefix_tuning", max_prompt_tokens=seq_len)
        memory = mem.stats()

    # -- outputs
    tmp = b.tmpdir()
    extra: dict = {"method": cfg.method, "base_model": source, "chat_template": template, "memory_plan": memory_plan}
    if cfg.method == "full":
        out = os.path.join(tmp, "model")
        M.save_full(model, tok, out)
        b.put_dir(out, "")
        extra["model"] = "."
    else:
        adapter = os.path.join(tmp, "adapter")
        # the base by hub id or relative to the published adapter/ folder, never an absolute workdir path
        base_ref = portable_ref(cfg.model, os.path.join(b.store.dataset_path(b.stage, b.fingerprint), "adapter"))
        M.save_adapter(model, tok, adapter, base_ref=base_ref)
        b.put_dir(adapter, "adapter")
        extra["adapter"] = "adapter"
    del model
    _free(device)
    if cfg.method != "full" and M.is_mergeable(cfg.method):   # the merge loads the base model afresh
        merged = os.path.join(tmp, "merged")
        M.merge_adapter(cfg, source, adapter, tok, merged)
        b.put_dir(merged, "merged")
        extra["merged"] = extra["model"] = "merged"   # the complete model, where every training dataset names it
        _free(device)

    publish_metrics(b, metrics_dir, [extra[k] for k in ("adapter", "merged") if k in extra])
    rows = [{"when": w, **s} for w, ss in (("before", samples_before), ("after", samples_after)) for s in ss]
    if rows:
        b.write_table("samples.parquet", pa.Table.from_pylist(rows))

    counts = {
        "records": report.records, "bad_records": report.bad, "examples": report.examples,
        "train_examples": len(train_items), "val_examples": len(val_items),
        "truncated": train_counts.get("truncated", 0) + val_counts.get("truncated", 0),
        "steps": run["steps"], "train_tokens": run["train_tokens"],
    }
    stats = {
        **params, **footprint, **memory,
        "seq_len": seq_len, "lr": run["lr"], "optimizer": run["optimizer"], "device": device.type,
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "val_loss_before": val_before, "val_loss_after": val_after,
        "best_val_loss": run["best_val_loss"], "best_step": run["best_step"],
        "stopped_early": run["stopped_early"], "restored_best": run["restored_best"],
        "val_history": run["val_history"],
        "train_loss_first": run["train_losses"][0] if run["train_losses"] else None,
        "train_loss_last": run["train_losses"][-1] if run["train_losses"] else None,
        "tokens_per_sec": run["tokens_per_sec"], "train_seconds": run["train_seconds"],
        "train_label_tokens": run["train_label_tokens"], "resumed_from": run.get("resumed_from"),
        "data": report.as_dict(), "train_encoding": train_counts, "val_encoding": val_counts,
        "samples_before": samples_before, "samples_after": samples_after,
    }
    _report_artifact(cfg, counts, stats)
    return StageOutput(counts=counts, stats=stats, extra=extra)


def summary_markdown(cfg: FinetuneConfig, counts: dict, stats: dict) -> str:
    """A short Markdown report: parameters, losses, memory, throughput, samples before/after."""
    def f(x, fmt="{:.4f}"):
        return "n/a" if x is None else fmt.format(x)

    lines = [
        f"## Fine-tuning: {cfg.method}",
        "",
        "| metric | value |", "|---|---|",
        f"| trainable parameters | {stats['trainable_params']:,} of {stats['total_params']:,} ({stats['trainable_pct']}%) |",
        f"| validation loss before / after | {f(stats['val_loss_before'])} / {f(stats['val_loss_after'])} |",
        f"| best validation loss (step) | {f(stats['best_val_loss'])} ({stats['best_step']}) |",
        f"| steps (early stop) | {counts['steps']} ({stats['stopped_early']}) |",
        f"| peak memory | {stats['peak_memory_mb']} MiB ({stats['peak_memory_kind']}) |",
        f"| tokens / s | {f(stats['tokens_per_sec'], '{:.1f}')} |",
        f"| records / bad / truncated | {counts['records']} / {counts['bad_records']} / {counts['truncated']} |",
        "",
        "### Held-out samples",
        "",
    ]
    after = {s["record"]: s for s in stats.get("samples_after", [])}
    for s in stats.get("samples_before", []):
        a = after.get(s["record"], {})
        clean = lambda t: " ".join(str(t).split())[:300]  # noqa: E731
        lines += [f"**Instruction** (record {s['record']}): {clean(s['instruction'])}", "",
                  f"- before: {clean(s['generation'])}", f"- after: {clean(a.get('generation', ''))}",
                  f"- reference: {clean(s['reference'])}", ""]
    return "\n".join(lines)


def _report_artifact(cfg: FinetuneConfig, counts: dict, stats: dict) -> None:
    try:
        from refinery.tasks.report import markdown_artifact
    except ImportError:  # pragma: no cover
        return
    try:
        markdown_artifact(f"finetune-{cfg.method}", summary_markdown(cfg, counts, stats),
                          description=f"fine-tuning report ({cfg.method})")
    except Exception as e:  # an artifact must never fail the stage
        print(f"finetune: could not publish the report artifact: {e}", file=sys.stderr)
