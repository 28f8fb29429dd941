"""What the alignment trainers share: finding a model folder, loading tokenizers, tokenizing
(prompt, reply) pairs, padding, per-token log-probabilities, LoRA, saving in HF format, the
settings they have in common, and :class:`OfflineMethod`, the base of the trainers that learn from
a fixed set of examples (reward, DPO, KTO, ORPO) on the one training loop,
:class:`refinery.tasks.engine.trainer.Engine` (device, dtype, seeding:
:mod:`refinery.tasks.train.common`).

Heavy imports (torch, transformers, peft) happen inside functions.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from dataclasses import dataclass, field

from pydantic import Field

from refinery.tasks.engine.data import ExampleOrder
from refinery.tasks.engine.trainer import INTERRUPTED, EngineResult, Method, TrainingInterrupted
from refinery.tasks.train.config import LoraParams, ParallelParams, ScheduleParams, _Defaults

from refinery.tasks.export import finalize_model_dir
from refinery.tasks.modelref import MANIFEST, MODEL_KEYS, model_identity, resolve_model  # noqa: F401 (re-exported)
# device, dtype and seeding: one copy for every trainer (re-exported for the reward, DPO and PPO modules)
from refinery.tasks.train.common import pick_device, seed_everything, torch_dtype  # noqa: F401


# --------------------------------------------------------------------------- model folders
def resolve_model_dir(path: str | os.PathLike) -> str:
    """A local HF model folder from a plain folder or a refinery dataset naming one (no hub ids)."""
    return resolve_model(path, allow_hub=False)


def is_dataset_dir(path: str | None) -> bool:
    if not path:
        return False
    return "://" in str(path) or (Path(path) / MANIFEST).is_file()


@dataclass
class TrainResult:
    """What the reward, DPO, KTO and ORPO trainers return: the trained model, its tokenizer, figures,
    history, and the run's ``status`` (``done``, ``early_stopped``; ``preempted`` or ``stopped``: it
    stopped early, its checkpoint is kept and the same call resumes it)."""

    model: object
    tokenizer: object
    stats: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    status: str = "done"

    def raise_if_interrupted(self, where: str | os.PathLike | None) -> None:
        """A stage must not publish a run that stopped early (SIGTERM, ``stop_after``)."""
        raise_if_interrupted(self.stats, where)


def raise_if_interrupted(stats: dict, where: str | os.PathLike | None) -> None:
    """:class:`TrainingInterrupted` when a run's ``stats["status"]`` says it stopped before the end."""
    status = stats.get("status")
    if status in INTERRUPTED:
        raise TrainingInterrupted(f"training stopped at step {stats.get('steps')} ({status}); checkpoint kept in "
                                  f"{where}: run the same command again to resume")


# --------------------------------------------------------------------------- the offline trainers on the engine
def total_steps(n_examples: int, cfg: ScheduleParams, epochs: int = 1) -> int:
    """Optimizer steps of a run over ``n_examples`` for ``epochs`` passes, each step taking
    ``batch_size * grad_accum`` examples; ``max_steps`` (when > 0) caps it."""
    per_epoch = math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))
    total = per_epoch * epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


class OfflineMethod(Method):
    """A trainer that learns from a fixed set of examples (reward, DPO, KTO, ORPO), as the engine
    runs it: every micro-batch is the next ``batch_size`` indices of one seeded order over the
    training examples (:class:`refinery.tasks.engine.data.ExampleOrder`, whose position is in every
    checkpoint, so a resumed run takes the examples the uninterrupted one would have), drawn alike
    on every process and split between them (:meth:`share`).

    A subclass sets ``model`` and gives ``micro_step``; ``setup`` computes what comes from the
    starting weights (the reference's log-probs, the held-out figures ``before``), ``validate`` the
    held-out figures (None without held-out examples). The policies train in eval mode (no
    dropout, so the policy's and the reference's log-probs compare)."""

    train_mode = False
    title = ""                       # the plots' title

    def __init__(self, cfg: ScheduleParams, model, n_train: int, seed: int):
        self.cfg, self.model = cfg, model
        self.order = ExampleOrder(n_train, seed)

    @property
    def net(self):
        """The model to call for forwards (the DDP wrapper, the sharded module, or the model)."""
        return self.engine.train_model

    def share(self):
        """This process's examples of the next micro-batch (all of them in one process)."""
        return self.engine.par.share(self.order.batch(self.cfg.batch_size))

    def untouched(self) -> bool:
        """No optimizer update yet: the weights are the starting ones (validation at step 0 is the
        ``before`` that :meth:`setup` computed)."""
        return self.engine.scheduler is None or self.engine.scheduler.last_epoch == 0

    def stateful(self) -> dict[str, Any]:
        return {"order": self.order}

    def fit(self, total: int, device, *, ckpt_dir=None, log_dir=None, progress: bool = False,
            on_step: Callable[[dict], None] | None = None, stop_after: int | None = None) -> EngineResult:
        """Train for ``total`` steps on the engine (resuming from ``ckpt_dir``'s newest checkpoint;
        metrics in ``log_dir``, default ``ckpt_dir/metrics``)."""
        from refinery.tasks.engine.trainer import Engine

        return Engine(self, self.cfg, total=total, device=device, ckpt_dir=ckpt_dir, metrics_dir=log_dir,
                      progress=progress, on_row=on_step, stop_after=stop_after, title=self.title).fit()


def run_stats(res: EngineResult, total: int, mem, model) -> dict:
    """The figures of an engine run every offline trainer reports."""
    losses = [r["loss"] for r in res.train_rows()]
    return {"steps": res.steps, "status": res.status, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "train_seconds": round(res.seconds, 3),
            "train_tokens": res.tokens, "total_steps": total, "restored_step": res.restored_step,
            "resumed_from": res.resumed_from, **res.stopper.summary(), **mem.stats(), **count_params(model)}


def weights_of(share, like):
    """A share's example weights (1, or 0 for a stand-in) as a tensor beside ``like``."""
    import torch

    return torch.tensor(share.weight, dtype=torch.float32, device=like.device)


# --------------------------------------------------------------------------- settings
class PromptParams(_Defaults):
    """How much of a prompt a trainer keeps (every align trainer)."""

    max_prompt_len: int = Field(64, ge=1, description="Prompt tokens kept (the end of the prompt).")


class OfflineParams(ScheduleParams, ParallelParams, PromptParams):
    """The trainers that learn from a fixed set of pairs or examples (reward, DPO, KTO, ORPO)."""

    epochs: int = Field(1, ge=1, description="Passes over the training examples (max_steps, when > 0, caps the steps).")
    max_len: int = Field(160, ge=2, description="Prompt + reply tokens kept.")
    eval_batch_size: int = Field(16, ge=1, description="Examples (pairs) per forward pass when scoring.")


class SamplingParams(PromptParams):
    """How the online trainers (PPO, GRPO) sample replies from the policy."""

    max_new_tokens: int = Field(32, ge=1, description="Longest sampled reply.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use the same scaling).")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens (0: all).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")


class LoraSettings(LoraParams):
    """LoRA adapters instead of full fine-tuning (``enabled=false``: train all weights)."""

    field_defaults = dict(dropout=0.0, target_modules="all-linear")

    enabled: bool = Field(False, description="Train LoRA adapters (saved with a merged model) instead of all weights.")


def model_device(model):
    return next(model.parameters()).device


def load_tokenizer(model_dir: str):
    """The model's tokenizer with a pad token (falls back to EOS) and right padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"{model_dir}: tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def apply_lora(model, lora: LoraSettings, task_type: str, modules_to_save: list[str] | None = None):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
                     target_modules=lora.target_modules, modules_to_save=modules_to_save)
    return get_peft_model(model, cfg)


def policy_model(model_dir: str, cfg):
    """The tokenizer and the causal LM in ``cfg.dtype`` (LoRA-wrapped when ``cfg.lora.enabled``), on the CPU."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(cfg.dtype))
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, "CAUSAL_LM")
    return tok, model


def load_policy(model_dir: str, cfg, seed: int):
    """The preference trainers' start (DPO, KTO, ORPO): seed, tokenizer, the causal LM in the
    config's dtype (LoRA-wrapped when ``cfg.lora.enabled``) on its device in eval mode (no
    dropout, so reference and policy log-probs compare), and a peak-memory meter started before
    the weights reach the device. Returns ``(tokenizer, model, device, meter)``."""
    from refinery.tasks.train.common import PeakMemory

    seed_everything(seed)
    tok, model = policy_model(model_dir, cfg)
    device = pick_device(cfg.device)
    mem = PeakMemory(device).start()
    model.to(device)
    model.eval()
    return tok, model, device, mem


def save_model(model, tokenizer, out_dir: str, lora: bool) -> dict:
    """Save in HF format: ``model/`` (full weights), or ``adapter/`` + ``merged/`` with LoRA.
    Every folder gets the tokenizer files. Returns the manifest keys naming the folders."""
    out = Path(out_dir)
    if lora:
        model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        merged = model.merge_and_unload()
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
        finalize_model_dir(out / "merged")   # use_cache: true + generation_config.json
        return {"adapter": "adapter", "merged": "merged", "model": "merged"}
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    finalize_model_dir(out / "model")
    return {"model": "model"}


# --------------------------------------------------------------------------- tokens
def encode_reply(tokenizer, prompt_text: str, reply_text: str, max_prompt_len: int, max_len: int,
                 add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (left-truncated to ``max_prompt_len``) and of the reply (truncated so
    the whole fits ``max_len``; EOS appended when it differs from the pad token)."""
    p = tokenizer(prompt_text)["input_ids"][-max_prompt_len:]
    r = tokenizer(reply_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and eos != tokenizer.pad_token_id:
        r = r + [eos]
    r = r[: max(1, max_len - len(p))]
    return p, r


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right"):
    """Lists of ids -> (input_ids, attention_mask) LongTensors."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
    return ids, mask


def position_ids(mask):
    """Positions counting only real tokens (left padding safe)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits, input_ids):
    """log p(input_ids[t+1] | ..t) for t in 0..T-2: shape (B, T-1)."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return torch.gather(logp, 2, input_ids[:, 1:, None]).squeeze(-1)


def count_params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": total, "trainable_params": trainable}
