"""The SFT training loop: response-only token loss, gradient accumulation (loss normalised by the
response tokens of the whole accumulated batch), warm-up + cosine/linear/constant schedule,
validation with early stopping (restoring the best trainable weights), sample generations, and
throughput measurement. :func:`train_loop` is a short sequence of named phases over a
:class:`LoopState`; per-step rows go through the common :class:`refinery.tasks.train.metrics.MetricsLog`.
Device, dtype, seeding and peak memory come from :mod:`refinery.tasks.train.common`. Heavy imports
inside functions.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, cast

from refinery.tasks.finetune.config import FinetuneConfig
from refinery.tasks.finetune.data import IGNORE, Batch, Encoded, make_batches, prompt_and_reference, render
# one copy of device / dtype / memory helpers for every trainer (bench/finetune imports them from here)
from refinery.tasks.train.common import PeakMemory, rss_mb  # noqa: F401
from refinery.tasks.train.common import autocast as autocast_ctx


# --------------------------------------------------------------------------- loss
def token_loss_sum(model, batch: Batch):
    """Sum of next-token cross-entropy over the response tokens, and their count. The last
    ``L`` logits are the real tokens' (prompt tuning prepends virtual tokens). Encoder-decoder
    models: the answer tokens of the decoder (refinery.tasks.finetune.seq2seq)."""
    import torch.nn.functional as F

    from refinery.tasks.finetune import seq2seq as S

    if S.is_encoder_decoder(model):
        return S.loss_sum(model, batch)

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
    """Greedy completions of held-out conversations (their last assistant turn removed);
    encoder-decoder models answer the source text (refinery.tasks.finetune.seq2seq)."""
    import torch

    from refinery.tasks.finetune import seq2seq as S

    if S.is_encoder_decoder(model):
        return S.generate_samples(model, tokenizer, examples, device, max_new_tokens, max_prompt_tokens)

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
@dataclass
class LoopState:
    """What the SFT loop carries from step to step."""

    step: int = 0
    epoch: int = 0
    tokens: int = 0
    label_tokens: int = 0
    seconds: float = 0.0                 # time in optimizer steps (validation excluded)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    best_loss: float = math.inf
    best_step: int = 0
    best_snapshot: dict | None = None    # the trainable weights at the best validation loss
    bad_evals: int = 0
    stopped_early: bool = False


def _snapshot(model) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, snap: dict) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in snap:
                p.copy_(snap[n].to(p.device))


def _micro_batches(cfg: FinetuneConfig, train_items: Sequence[Encoded], pad_id: int, seq_len: int):
    """(epoch, batch) forever: each epoch reshuffles with its own seed, so a run is reproducible."""
    from refinery.tasks.finetune import seq2seq as S

    epoch = 0
    while True:
        seed = cfg.seed * 1000 + epoch
        batches = (S.make_batches(cast(Sequence[S.S2SEncoded], train_items), cfg.batch_size, pad_id, seed=seed)
                   if train_items and isinstance(train_items[0], S.S2SEncoded)
                   else make_batches(train_items, cfg.batch_size, pad_id, cfg.packing, seq_len, seed=seed))
        for b in batches:
            yield epoch, b
        epoch += 1


def _optimizer_step(cfg: FinetuneConfig, model, window: list[Batch], st: LoopState, opt, device,
                    compute_dtype) -> float | None:
    """Backward over the ``grad_accum`` micro-batches of one step, each loss divided by the response
    tokens of the *whole* window (so accumulation equals one bigger batch), then clip and step.
    Returns the gradient norm (None without clipping)."""
    import torch

    import contextlib

    from refinery.tasks.train import distributed as dist
    from refinery.tasks.train.fsdp import is_sharded, to_float

    optimizer, scheduler, scaler, params = opt
    rank, world, _ = dist.env()
    n_window = sum(b.n_labels for b in window)      # the *global* window: every rank sees all of it
    mine = window[rank::world]                       # this rank's micro-batches
    sharded = world > 1 and is_sharded(model)
    step_loss = 0.0
    for i, b in enumerate(mine):
        b = b.to(device)
        last = i == len(mine) - 1
        if sharded:
            model.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if last or world == 1 or sharded else model.no_sync()
        with sync:
            with autocast_ctx(device, compute_dtype):
                loss_sum, _ = token_loss_sum(model, b)
            # DDP and FSDP average gradients over ranks: times world makes it the window's token mean
            loss = loss_sum / max(n_window, 1) * world
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss += float(loss_sum.detach())
    if world > 1:   # the window's loss: every rank's share summed
        step_loss = float(dist.mean(torch.tensor(step_loss, dtype=torch.float64))) * world
    st.tokens += sum(b.n_tokens for b in window)
    st.label_tokens += n_window
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = to_float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if cfg.grad_clip > 0 else None
    st.lrs.append(optimizer.param_groups[0]["lr"])
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    st.losses.append(step_loss / max(n_window, 1))
    return grad_norm


def _validate(cfg: FinetuneConfig, model, val_batches, st: LoopState, device, compute_dtype, metrics,
              log: Callable[[str], Any]) -> None:
    """Validation loss; a new best keeps a snapshot (``load_best``), ``early_stopping_patience``
    validations without one stop the run."""
    v = evaluate(model, val_batches, device, compute_dtype)
    st.val_history.append({"step": st.step, "val_loss": v})
    metrics.val(st.step, tokens=st.tokens, loss=v)
    if v is not None and v < st.best_loss - cfg.early_stopping_min_delta:
        st.best_loss, st.best_step, st.bad_evals = v, st.step, 0
        if cfg.load_best:
            st.best_snapshot = _snapshot(model)
        return
    st.bad_evals += 1
    if cfg.early_stopping_patience and st.bad_evals >= cfg.early_stopping_patience:
        st.stopped_early = True
        log(f"early stopping at step {st.step}: no validation improvement in {st.bad_evals} evaluations "
            f"(best {st.best_loss:.4f} at step {st.best_step})")


def train_loop(cfg: FinetuneConfig, model, train_items: Sequence[Encoded], val_batches: Sequence[Batch],
               pad_id: int, device, compute_dtype, log: Callable[[str], Any] = print,
               seq_len: int | None = None, metrics=None) -> dict:
    """Train ``model`` in place for ``cfg.max_steps`` optimizer steps (or until early stopping).

    Every step's row goes to ``metrics`` (a :class:`refinery.tasks.train.metrics.MetricsLog`; an
    in-memory one with a progress bar when None). Returns the loss curve, validation history,
    throughput and early-stopping facts."""
    import torch

    from refinery.tasks.finetune.methods import lr_lambda, make_optimizer
    from refinery.tasks.train.metrics import MetricsLog

    if not train_items:
        raise ValueError("no training examples left after validation split and encoding")
    lr = cfg.resolved_lr()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"method {cfg.method}: the model has no trainable parameters")
    optimizer, opt_name = make_optimizer(cfg, params, device, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # float16 needs loss scaling; bfloat16 and float32 do not
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and compute_dtype == torch.float16 else None
    opt = (optimizer, scheduler, scaler, params)
    eval_every = cfg.resolved_eval_every()
    stream = _micro_batches(cfg, train_items, pad_id, seq_len or cfg.seq_len)
    if metrics is None:
        metrics = MetricsLog(None, total_steps=cfg.max_steps, desc=f"finetune[{cfg.method}]", bar=True)
    from refinery.tasks.train import distributed as dist

    world = dist.env()[1]
    st = LoopState()
    model.train()
    for st.step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        window = [next(stream) for _ in range(cfg.grad_accum * world)]   # the global window
        st.epoch = window[-1][0]
        grad_norm = _optimizer_step(cfg, model, [b for _, b in window], st, opt, device, compute_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        st.seconds += time.perf_counter() - t0
        metrics.train(st.step, tokens=st.tokens, loss=st.losses[-1], lr=st.lrs[-1], grad_norm=grad_norm,
                      epoch=st.epoch, label_tokens=st.label_tokens)
        if val_batches and (st.step % eval_every == 0 or st.step == cfg.max_steps):
            _validate(cfg, model, val_batches, st, device, compute_dtype, metrics, log)
            if st.stopped_early:
                break
    # the best weights back, unless the last step was the best
    restored = False
    if cfg.load_best and st.best_snapshot is not None and st.best_step != st.step:
        _restore(model, st.best_snapshot)
        restored = True
    del optimizer, opt
    return {
        "steps": st.step, "epochs": st.epoch + 1, "optimizer": opt_name, "lr": lr,
        "train_losses": st.losses, "lrs": st.lrs, "val_history": st.val_history,
        "best_val_loss": None if st.best_loss == math.inf else st.best_loss, "best_step": st.best_step,
        "stopped_early": st.stopped_early, "restored_best": restored,
        "train_tokens": st.tokens, "train_label_tokens": st.label_tokens, "train_seconds": round(st.seconds, 3),
        "tokens_per_sec": round(st.tokens / st.seconds, 1) if st.seconds > 0 else None,
    }
