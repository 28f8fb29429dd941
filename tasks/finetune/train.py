"""SFT on the training engine (refinery.tasks.engine): :class:`SFTMethod` gives the response-only
token loss of one micro-batch (normalised by the response tokens of the step's whole window, so
accumulation and processes equal one bigger batch) and the validation loss; the engine does the
rest (schedule, clipping, mixed precision, early stopping and the best weights, metrics,
checkpoints and resume). The data position (:class:`BatchStream`: epoch and index of seeded
per-epoch batches) is part of every checkpoint. Also: the token loss, evaluation and sample
generations the stage uses. Device, dtype, seeding and peak memory come from
:mod:`refinery.tasks.train.common`. Heavy imports inside functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, cast

from refinery.tasks.engine.trainer import Method, Micro
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


# --------------------------------------------------------------------------- data
@dataclass
class SFTData:
    """The encoded examples of a run, as the stage and every worker process build them."""

    template: str
    seq_len: int
    pad_id: int
    report: Any
    train_items: Sequence
    val_items: list
    train_counts: dict
    val_counts: dict
    val_batches: Sequence
    sample_ex: list


def prepare_data(cfg: FinetuneConfig, source: str, tok, kind: str, log: Callable[[str], Any] | None = None,
                 progress: bool = False) -> SFTData:
    """Read, split and encode ``cfg.data`` for a causal LM (chat template, response-only labels) or
    an encoder-decoder (``kind`` seq2seq: source and answer); the validation batches and the
    held-out examples the samples are generated from."""
    from refinery.tasks.finetune import data as D
    from refinery.tasks.finetune import methods as M
    from refinery.tasks.finetune import seq2seq as S

    template = D.ensure_chat_template(tok) if kind == "causal" else "none (text-to-text)"
    seq_len = M.effective_seq_len(cfg, source)
    if kind == "causal":   # streaming: the training examples wait on disk, encoded; memory stays bounded
        split = D.read_split_encode(tok, cfg.data, seq_len, fmt=cfg.data_format, max_records=cfg.max_records,
                                    val_fraction=cfg.val_fraction, seed=cfg.seed, max_val=cfg.max_val_examples,
                                    log=log, progress=progress)
        report, val_ex = split.report, split.val_examples
        train_items: Sequence = split.train_items
        val_items: list = split.val_items
        train_counts, val_counts = split.train_counts, split.val_counts
    else:   # text-to-text: in memory
        examples, report = D.read_examples(cfg.data, cfg.data_format, cfg.max_records, log=log)
        train_ex, val_ex = D.split_examples(examples, cfg.val_fraction, cfg.seed, cfg.max_val_examples)
        train_items, train_counts = S.encode_all(tok, train_ex, seq_len, report, progress=progress)
        val_items, val_counts = S.encode_all(tok, val_ex, seq_len, report)
    if not report.examples:
        raise ValueError(f"{cfg.data}: no valid records ({report.bad} bad: {dict(report.bad_by_reason)})")
    val_records = {e.record for e in val_items}
    sample_ex = [e for e in val_ex if e.record in val_records][: cfg.num_samples]
    pad_id = tok.pad_token_id
    val_batches = (D.make_batches(val_items, cfg.batch_size, pad_id, packing=False, seq_len=seq_len)
                   if kind == "causal" else S.make_batches(cast(list[S.S2SEncoded], val_items), cfg.batch_size, pad_id))
    return SFTData(template, seq_len, pad_id, report, train_items, val_items, train_counts, val_counts,
                   val_batches, sample_ex)


# --------------------------------------------------------------------------- training
class BatchStream:
    """The training micro-batches, epoch after epoch, whose position is part of a checkpoint.

    ``build(epoch)`` makes an epoch's batches in its seeded order (the same list for the same
    epoch), so ``(epoch, index)`` rebuilds any position; ``totals`` are running counts kept with it
    (response tokens seen)."""

    def __init__(self, build: Callable[[int], Sequence]):
        self.build = build
        self.epoch, self.index = 0, 0
        self.totals: dict[str, int] = {}
        self._batches: Sequence | None = None

    def _current(self) -> Sequence:
        if self._batches is None:
            self._batches = self.build(self.epoch)
            if not self._batches:
                raise ValueError("no training batches")
        return self._batches

    def next(self) -> tuple[int, Any]:
        """(epoch, batch): the next micro-batch, running on into the next epoch."""
        if self.index >= len(self._current()):
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
        batch = self._current()[self.index]
        self.index += 1
        return self.epoch, batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._batches = int(state["epoch"]), int(state["index"]), None
        self.totals = {k: int(v) for k, v in (state.get("totals") or {}).items()}


class Window:
    """One step's global window of ``accum * world`` micro-batches (every process draws all of it
    from the same seeded stream) and this process's micro-batches of it, ``window[rank::world]``."""

    def __init__(self, stream: BatchStream, accum: int, rank: int, world: int):
        drawn = [stream.next() for _ in range(accum * world)]
        self.epoch = drawn[-1][0]
        self.all = [b for _, b in drawn]
        self.mine = self.all[rank::world]


def sft_batches(cfg: FinetuneConfig, train_items: Sequence[Encoded], pad_id: int, seq_len: int) -> BatchStream:
    """The SFT stream: each epoch reshuffled with its own seed (``seed * 1000 + epoch``)."""
    from refinery.tasks.finetune import seq2seq as S

    def build(epoch: int) -> Sequence[Batch]:
        seed = cfg.seed * 1000 + epoch
        if train_items and isinstance(train_items[0], S.S2SEncoded):
            return S.make_batches(cast(Sequence[S.S2SEncoded], train_items), cfg.batch_size, pad_id, seed=seed)
        return make_batches(train_items, cfg.batch_size, pad_id, cfg.packing, seq_len, seed=seed)

    return BatchStream(build)


class SFTMethod(Method):
    """Supervised fine-tuning on the engine: the response-token loss of one micro-batch.

    Each step draws the global window of ``grad_accum * world`` micro-batches; this process takes
    ``window[rank::world]``. A micro-batch's loss is its summed token loss over the response tokens
    of the *whole* window, times the world size (DDP and FSDP average gradients over processes), so
    accumulation and processes equal one bigger batch and the logged ``loss`` is the window's token
    mean."""

    def __init__(self, cfg: FinetuneConfig, model, train_items: Sequence[Encoded], val_batches: Sequence[Batch],
                 pad_id: int, device, compute_dtype, seq_len: int | None = None):
        if not train_items:
            raise ValueError("no training examples left after validation split and encoding")
        if not any(p.requires_grad for p in model.parameters()):
            raise RuntimeError(f"method {cfg.method}: the model has no trainable parameters")
        self.desc = f"finetune[{cfg.method}]"
        self.cfg, self.model, self.val_batches = cfg, model, val_batches
        self.device, self.compute_dtype = device, compute_dtype
        self.stream = sft_batches(cfg, train_items, pad_id, seq_len or cfg.seq_len)
        self.window: Window | None = None
        self.n_window = 0

    def micro_step(self, micro: int) -> Micro:
        par = self.engine.par
        if micro == 0:
            self.window = Window(self.stream, self.accum(), par.rank, par.world)
            self.n_window = sum(b.n_labels for b in self.window.all)
            self.stream.totals["label_tokens"] = self.stream.totals.get("label_tokens", 0) + self.n_window
        assert self.window is not None
        b = self.window.mine[micro].to(self.device)
        loss_sum, _ = token_loss_sum(self.engine.train_model, b)
        return Micro(loss_sum / max(self.n_window, 1) * par.world, {"tokens": b.n_tokens}, weight=1.0)

    def after_step(self, figures: dict) -> None:
        assert self.window is not None
        figures["epoch"] = self.window.epoch
        figures["label_tokens"] = self.stream.totals.get("label_tokens", 0)

    def validate(self) -> dict | None:
        v = evaluate(self.model, self.val_batches, self.device, self.compute_dtype)
        return None if v is None else {"loss": v}

    def stateful(self) -> dict[str, Any]:
        return {"data": self.stream}


def train_sft(cfg: FinetuneConfig, model, train_items: Sequence[Encoded], val_batches: Sequence[Batch], pad_id: int,
              device, compute_dtype, *, seq_len: int | None = None, ckpt_dir: str | Path | None = None,
              metrics_dir: str | Path | None = None, log: Callable[[str], Any] = print, progress: bool = False,
              stop_after: int | None = None, title: str | None = None):
    """Train ``model`` in place on the engine for ``cfg.max_steps`` steps (or until early stopping),
    checkpointing into ``ckpt_dir`` and resuming from it. Returns ``(engine, result)``: the engine
    holds the (possibly wrapped) training model, :func:`run_summary` the stage's figures."""
    from refinery.tasks.engine.optim import build_optimizer
    from refinery.tasks.engine.trainer import Engine
    from refinery.tasks.finetune.methods import optimizer_kind

    method = SFTMethod(cfg, model, train_items, val_batches, pad_id, device, compute_dtype, seq_len)
    kind = optimizer_kind(cfg, device)
    engine = Engine(method, cfg, total=cfg.max_steps, device=device, dtype=compute_dtype, ckpt_dir=ckpt_dir,
                    metrics_dir=metrics_dir, log=log, progress=progress, stop_after=stop_after,
                    keep_best=cfg.load_best, restore_best=cfg.load_best, compute_dtype_fsdp=compute_dtype,
                    optimizer=lambda m: build_optimizer(m, cfg, device, lr=cfg.resolved_lr(), kind=kind),
                    title=title or f"finetune {cfg.method}")
    return engine, engine.fit()


def run_summary(cfg: FinetuneConfig, engine, result) -> dict:
    """The figures the stage publishes, from the engine's result and history (JSON-serialisable:
    a multi-process run's rank 0 writes them)."""
    from refinery.tasks.finetune.methods import optimizer_kind

    train = result.train_rows()
    stream = getattr(engine.method, "stream", None)
    stopper = result.stopper
    return {
        "status": result.status, "steps": result.steps,
        "epochs": (stream.epoch + 1) if stream is not None else None,
        "optimizer": optimizer_kind(cfg, engine.device), "lr": cfg.resolved_lr(),
        "train_losses": [r["loss"] for r in train], "lrs": [r.get("lr") for r in train],
        "val_history": [{"step": r["step"], "val_loss": r.get("val_loss")} for r in result.val_rows() if r["step"] > 0],
        "best_val_loss": stopper.best, "best_step": stopper.best_step,
        "stopped_early": result.status == "early_stopped", "restored_best": result.restored_step is not None,
        "train_tokens": result.tokens,
        "train_label_tokens": stream.totals.get("label_tokens", 0) if stream is not None else None,
        "train_seconds": round(result.seconds, 3),
        "tokens_per_sec": round(result.tokens / result.seconds, 1) if result.seconds > 0 else None,
        "resumed_from": result.resumed_from,
    }
