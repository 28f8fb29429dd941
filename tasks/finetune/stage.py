"""The ``finetune`` stage: (base model, instruction file, config) -> a dataset holding the result.

Output dataset layout::

    adapter/     PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer files
    merged/      lora / qlora / ia3: the adapter folded into the base (plain transformers folder)
    config.json, model.safetensors, tokenizer files ...   method=full: the whole model at the top
    metrics/     the run's per-step metrics (metrics.jsonl, loss.png, tensorboard/; the common
                 schema of refinery.tasks.train.metrics); a copy sits in adapter/ and merged/ too
    samples.parquet   held-out instructions generated before and after training
    manifest.json     extra keys: method, adapter / merged / model (folders, relative), base_model

The raw inputs are no datasets, so their identities (content hash of the data file; a model
folder's file names, sizes and mtimes, or a refinery model dataset's fingerprint, or the hub id)
sit in ``cfg.identity`` and therefore in the fingerprint.
"""
from __future__ import annotations

import gc
import os
import sys

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
def finetune(b: Builder, inputs: list[Dataset], cfg: FinetuneConfig) -> StageOutput:
    """Supervised fine-tuning of a causal LM by full / LoRA / QLoRA / IA3 / LLaMA-Adapter / prompt /
    prefix tuning, with response-only loss, optional packing and early stopping."""
    import pyarrow as pa

    from refinery.tasks.finetune import data as D
    from refinery.tasks.finetune import methods as M
    from refinery.tasks.finetune.train import evaluate, generate_samples, train_loop
    from refinery.tasks.train.common import PeakMemory, seed_everything
    from refinery.tasks.train.metrics import METRICS_DIR, MetricsLog, publish_metrics
    from refinery.tasks.train.stage import checkpoint_dir

    log = _logger()
    seed_everything(cfg.seed)

    # -- data
    from refinery.tasks.finetune import seq2seq as S

    source = M.resolve_model_source(cfg.model)
    kind = S.model_kind(source)   # the model's config decides: chat SFT (causal) or text-to-text (seq2seq)
    if kind == "encoder":   # classification: labelled texts and a new head (refinery.tasks.finetune.classify)
        from refinery.tasks.finetune import classify as C
        from refinery.tasks.train.plan import plan_finetune, plan_or_note

        return C.run(b, cfg, source, log, plan_or_note(lambda: plan_finetune(cfg), log=log))
    if kind != "causal" and cfg.launches():
        raise ValueError(f"devices={cfg.devices}: several processes fine-tune causal LMs only (this model is {kind})")
    if kind == "seq2seq" and cfg.packing:
        raise ValueError("packing=true is for causal LMs; encoder-decoder models take one example per row")
    tok = M.load_tokenizer(cfg, source)
    template = D.ensure_chat_template(tok) if kind == "causal" else "none (text-to-text)"
    seq_len = M.effective_seq_len(cfg, source)
    encode_all = D.encode_all if kind == "causal" else S.encode_all
    examples, report = D.read_examples(cfg.data, cfg.data_format, cfg.max_records, log=log)
    if not examples:
        raise ValueError(f"{cfg.data}: no valid records ({report.bad} bad: {dict(report.bad_by_reason)})")
    train_ex, val_ex = D.split_examples(examples, cfg.val_fraction, cfg.seed, cfg.max_val_examples)
    train_items, train_counts = encode_all(tok, train_ex, seq_len, report, progress=True)
    val_items, val_counts = encode_all(tok, val_ex, seq_len, report)
    val_records = {e.record for e in val_items}
    sample_ex = [e for e in val_ex if e.record in val_records][: cfg.num_samples]
    pad_id = tok.pad_token_id
    val_batches = (D.make_batches(val_items, cfg.batch_size, pad_id, packing=False, seq_len=seq_len)
                   if kind == "causal" else S.make_batches(val_items, cfg.batch_size, pad_id))  # type: ignore[arg-type]  # seq2seq items
    log(f"finetune[{cfg.method}]: {report.records} records ({report.bad} bad), {len(train_items)} train / "
        f"{len(val_items)} validation examples, {train_counts.get('truncated', 0) + val_counts.get('truncated', 0)} "
        f"truncated to {seq_len} tokens, chat template: {template}")

    # -- memory: the estimate per device, printed and kept; a run that cannot fit stops here
    from refinery.tasks.train.plan import plan_finetune, plan_or_note

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
        # live while training: <workdir>/checkpoints/<fingerprint>/metrics (a rerun starts it afresh)
        metrics_dir = checkpoint_dir(b) / METRICS_DIR
        if cfg.launches():   # torchrun workers train; their weights come back into this model
            run = _train_on_processes(cfg, model, checkpoint_dir(b), metrics_dir, log)
        else:
            metrics = MetricsLog(metrics_dir, total_steps=cfg.max_steps, desc=f"finetune[{cfg.method}]", bar=True,
                                 report_to=cfg.report_to, run_config=cfg.model_dump(mode="json"), fresh=True)
            try:
                run = train_loop(cfg, model, train_items, val_batches, pad_id, device, compute_dtype, log, seq_len,
                                 metrics=metrics)
            finally:
                metrics.close()
            metrics.plot(f"finetune {cfg.method}")
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
        M.save_adapter(model, tok, adapter)
        b.put_dir(adapter, "adapter")
        extra["adapter"] = "adapter"
    del model
    _free(device)
    if cfg.method != "full" and M.is_mergeable(cfg.method):   # the merge loads the base model afresh
        merged = os.path.join(tmp, "merged")
        M.merge_adapter(cfg, source, adapter, tok, merged)
        b.put_dir(merged, "merged")
        extra["merged"] = "merged"
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
        "train_label_tokens": run["train_label_tokens"],
        "data": report.as_dict(), "train_encoding": train_counts, "val_encoding": val_counts,
        "samples_before": samples_before, "samples_after": samples_after,
    }
    _report_artifact(cfg, counts, stats)
    return StageOutput(counts=counts, stats=stats, extra=extra)


def _train_on_processes(cfg: FinetuneConfig, model, ckpt_dir, metrics_dir, log) -> dict:
    """Train on ``cfg.devices`` torchrun processes (refinery.tasks.finetune.worker: DDP or FSDP),
    then load the trained weights they gathered into ``model``."""
    from refinery.tasks.train.distributed import launch, load_trainable

    nproc = cfg.processes()
    log(f"finetune[{cfg.method}]: launching {cfg.strategy if cfg.strategy != 'auto' else 'ddp'} on "
        f"{nproc} processes (torchrun)")
    spec = {"config": cfg.model_dump(mode="json"), "metrics_dir": str(metrics_dir)}
    run = launch(spec, nproc, ckpt_dir, module="refinery.tasks.finetune.worker")
    load_trainable(model, ckpt_dir / "trained.pt")
    return run


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
