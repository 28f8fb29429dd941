"""The SFT training loop: response-only token loss, gradient accumulation (loss normalised by the
response tokens of the whole accumulated batch), warm-up + cosine/linear/constant schedule,
validation with early stopping (restoring the best trainable weights), sample generations, and
throughput / peak-memory measurement. Readable top to bottom; heavy imports inside functions.
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from typing import Any, Callable, Sequence

from refinery.tasks.finetune.config import FinetuneConfig
from refinery.tasks.finetune.data import IGNORE, Batch, Encoded, make_batches, prompt_and_reference, render


# --------------------------------------------------------------------------- memory
def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """The process's high-water resident set (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if os.uname().sysname == "Darwin" else r / 1024


class PeakMemory:
    """Peak memory over a stretch of work: CUDA max allocated on a GPU, process peak RSS on CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_start = rss_mb()
        return self

    def stats(self) -> dict:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1),
                    "peak_memory_kind": "cuda_max_allocated"}
        return {"peak_memory_mb": round(peak_rss_mb(), 1), "peak_memory_kind": "process_peak_rss",
                "rss_start_mb": round(self.rss_start, 1)}

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- loss
def autocast_ctx(device, compute_dtype):
    import torch

    if compute_dtype in (torch.bfloat16, torch.float16) and not (device.type == "cpu" and compute_dtype == torch.float16):
        return torch.autocast(device.type, dtype=compute_dtype)
    return contextlib.nullcontext()


def token_loss_sum(model, batch: Batch):
    """Sum of next-token cross-entropy over the response tokens, and their count. The last
    ``L`` logits are the real tokens' (prompt tuning prepends virtual tokens)."""
    import torch.nn.functional as F

    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
    if batch.attention_mask is not None:
        kwargs["attention_mask"] = batch.attention_mask
    if batch.position_ids is not None:
        kwargs["position_ids"] = batch.position_ids
    logits = model(**kwargs).logits
    L = batch.input_ids.shape[1]
    logits = logits[:, -L:, :][:, :-1, :].float()
    labels = batch.labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def per_token_losses(model, batch: Batch):
    """Per-position losses ``[B, L-1]`` (0 where ignored): used by tests to compare packed and unpacked."""
    import torch
    import torch.nn.functional as F

    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
    if batch.attention_mask is not None:
        kwargs["attention_mask"] = batch.attention_mask
    if batch.position_ids is not None:
        kwargs["position_ids"] = batch.position_ids
    with torch.no_grad():
        logits = model(**kwargs).logits
    L = batch.input_ids.shape[1]
    logits = logits[:, -L:, :][:, :-1, :].float()
    labels = batch.labels[:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return loss * (labels != IGNORE)


def evaluate(model, batches: Sequence[Batch], device, compute_dtype) -> float | None:
    """Mean response-token loss over the validation batches (None without any)."""
    import torch

    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), autocast_ctx(device, compute_dtype):
        for b in batches:
            loss, k = token_loss_sum(model, b.to(device))
            total += float(loss)
            n += k
    model.train(was_training)
    return total / n if n else None


# --------------------------------------------------------------------------- generation
def greedy_no_cache(model, ids, max_new_tokens: int, eos_id: int | None):
    """Greedy decoding by full forward passes (no KV cache): slow but exact for any PEFT method.
    Used for prefix tuning, whose learned past key-values ``generate`` drops with this
    transformers / peft pair (both set a cache; transformers keeps its own, empty one)."""
    import torch

    out = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=out, attention_mask=torch.ones_like(out), use_cache=False).logits
            nxt = logits[:, -1, :].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            if eos_id is not None and int(nxt) == eos_id:
                break
    return out[0, ids.shape[1]:]


def generate_samples(model, tokenizer, examples: Sequence, device, max_new_tokens: int,
                     no_cache: bool = False, max_prompt_tokens: int | None = None) -> list[dict]:
    """Greedy completions of held-out conversations (their last assistant turn removed)."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    for ex in examples:
        msgs, reference = prompt_and_reference(ex.messages)
        prompt = render(tokenizer, msgs, add_generation_prompt=True)
        enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        ids = enc["input_ids"].to(device)
        if max_prompt_tokens:
            ids = ids[:, -max_prompt_tokens:]
        if no_cache:
            new = greedy_no_cache(model, ids, max_new_tokens, tokenizer.eos_token_id)
        else:
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, use_cache=True)
            new = gen[0, ids.shape[1]:]
        instruction = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        out.append({"record": ex.record, "instruction": instruction[:500], "reference": reference[:500],
                    "generation": tokenizer.decode(new, skip_special_tokens=True)})
    model.train(was_training)
    return out


# --------------------------------------------------------------------------- training
def _snapshot(model) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, snap: dict) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in snap:
                p.copy_(snap[n].to(p.device))


def train_loop(cfg: FinetuneConfig, model, train_items: Sequence[Encoded], val_batches: Sequence[Batch],
               pad_id: int, device, compute_dtype, log: Callable[[str], Any] = print,
               seq_len: int | None = None) -> dict:
    """Train ``model`` in place for ``cfg.max_steps`` optimizer steps (or until early stopping).
    Returns the loss curve, validation history, throughput and early-stopping facts."""
    import torch

    from refinery.tasks.finetune.methods import lr_lambda, make_optimizer

    if not train_items:
        raise ValueError("no training examples left after validation split and encoding")
    lr = cfg.resolved_lr()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"method {cfg.method}: the model has no trainable parameters")
    optimizer, opt_name = make_optimizer(cfg, params, device, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and compute_dtype == torch.float16 else None
    eval_every = cfg.resolved_eval_every()
    seq_len = seq_len or cfg.seq_len

    def micro_batches():
        epoch = 0
        while True:
            for b in make_batches(train_items, cfg.batch_size, pad_id, cfg.packing, seq_len,
                                  seed=cfg.seed * 1000 + epoch):
                yield epoch, b
            epoch += 1

    stream = micro_batches()
    losses: list[float] = []
    lrs: list[float] = []
    val_history: list[dict] = []
    best = (math.inf, 0)
    best_snap = None
    bad_evals = 0
    stopped_early = False
    tokens = labels_seen = 0
    train_seconds = 0.0
    epoch = 0
    model.train()
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, desc=f"finetune[{cfg.method}]", unit="step", leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    step = 0
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        window = [next(stream) for _ in range(cfg.grad_accum)]
        epoch = window[-1][0]
        n_window = sum(b.n_labels for _, b in window)
        step_loss = 0.0
        for _, b in window:
            b = b.to(device)
            with autocast_ctx(device, compute_dtype):
                loss_sum, _ = token_loss_sum(model, b)
            loss = loss_sum / max(n_window, 1)
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += float(loss_sum.detach())
            tokens += b.n_tokens
            labels_seen += b.n_labels
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lrs.append(optimizer.param_groups[0]["lr"])
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - t0
        losses.append(step_loss / max(n_window, 1))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if val_batches and (step % eval_every == 0 or step == cfg.max_steps):
            v = evaluate(model, val_batches, device, compute_dtype)
            val_history.append({"step": step, "val_loss": v})
            if v is not None and v < best[0] - cfg.early_stopping_min_delta:
                best = (v, step)
                bad_evals = 0
                if cfg.load_best:
                    best_snap = _snapshot(model)
            else:
                bad_evals += 1
                if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                    stopped_early = True
                    log(f"early stopping at step {step}: no validation improvement in {bad_evals} evaluations "
                        f"(best {best[0]:.4f} at step {best[1]})")
                    break
    if bar is not None:
        bar.close()
    restored = False
    if cfg.load_best and best_snap is not None and best[1] != step:
        _restore(model, best_snap)
        restored = True
    del optimizer
    return {
        "steps": step, "epochs": epoch + 1, "optimizer": opt_name, "lr": lr,
        "train_losses": losses, "lrs": lrs, "val_history": val_history,
        "best_val_loss": None if best[0] == math.inf else best[0], "best_step": best[1],
        "stopped_early": stopped_early, "restored_best": restored,
        "train_tokens": tokens, "train_label_tokens": labels_seen, "train_seconds": round(train_seconds, 3),
        "tokens_per_sec": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
    }
