"""The alignment stages: ``reward``, ``dpo``, ``kto``, ``orpo``, ``cpo``, ``simpo``, ``ppo``, ``grpo``, ``rloo`` and
``online_dpo``.

Each takes model folders and a preference file named in its config (their identities, a refinery
dataset's fingerprint or a folder's file sizes and mtimes, and the data file's path, size and
mtime, are computed fields of the config, so the fingerprint covers them) and publishes a dataset
holding the trained model in Hugging Face format with its tokenizer (``model/``; with LoRA
``adapter/`` and ``merged/``), the per-step metrics (``metrics/``: metrics.jsonl, loss.png,
curves.png, tensorboard/, the common schema of :mod:`refinery.tasks.train.metrics`; a copy in each
model folder) and the figures in the manifest (``stats``, and a short ``metrics`` summary). The manifest keys ``model``/``merged``
name the folders, so :func:`refinery.tasks.align.common.resolve_model_dir` (and the next stage) finds
them. Light at import: torch and transformers load inside the bodies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import Field, computed_field
from refinery.tasks.config import StrictModel

from refinery.tasks.align.common import model_identity
from refinery.tasks.align.data import MIN_VALID_FRACTION
from refinery.tasks.align.cpo import CPOConfig, SimPOConfig
from refinery.tasks.align.dpo import DPOConfig
from refinery.tasks.align.grpo import GRPOConfig
from refinery.tasks.align.kto import KTOConfig
from refinery.tasks.align.orpo import ORPOConfig
from refinery.tasks.align.ppo import PPOConfig
from refinery.tasks.align.reward import RewardConfig
from refinery.tasks.align.rloo import RLOOConfig
from refinery.tasks.align.online_dpo import OnlineDPOConfig
from refinery.tasks.records import identity as data_identity
from refinery.tasks.export.card import with_model_cards   # each stage's model cards, written before publish
from refinery.tasks.runtime import StageOutput, stage
from refinery.tasks.train.multinode import MultiNodeStage


class _ModelAndData(StrictModel):
    model: str = Field(description="Starting model: a HF model folder (or hub id) or a refinery dataset naming one.")
    data: str = Field(description="Preference pairs (HH-RLHF, ShareGPT or prompt/chosen/rejected): JSON, JSONL (gzipped too), "
                      "Parquet, a dataset folder or an fsspec URL.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of pairs held out for evaluation.")
    max_val_examples: int | None = Field(256, ge=1, description="At most this many held-out pairs.")
    seed: int = Field(0, description="Seed of the split, initialisation, shuffling and sampling.")
    min_valid_fraction: float = Field(MIN_VALID_FRACTION, ge=0, le=1, description=(
        "Fail when fewer than this share of the data file's records are usable (bad JSON, empty prompt or reply, "
        "unknown format ...); the error gives the counts by reason. 0 turns the check off."))

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented computed_field pattern
    @property
    def model_id(self) -> str | None:
        return model_identity(self.model)

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented computed_field pattern
    @property
    def data_id(self) -> str:
        try:
            return data_identity(self.data, required=True)
        except OSError as e:
            raise FileNotFoundError(f"data {self.data}: {e.strerror or e}") from e


class _AlignInputs(_ModelAndData):
    max_pairs: int | None = Field(None, ge=1, description="Use only the first N valid pairs.")


class RewardStageConfig(_AlignInputs):
    train: RewardConfig = RewardConfig()


class DPOStageConfig(_AlignInputs):
    train: DPOConfig = DPOConfig()


class ORPOStageConfig(_AlignInputs):
    train: ORPOConfig = ORPOConfig()


class CPOStageConfig(_AlignInputs):
    train: CPOConfig = CPOConfig()


class SimPOStageConfig(_AlignInputs):
    train: SimPOConfig = SimPOConfig()


class _RewardModelLengths(StrictModel):
    """How much of a prompt and reply the reward model of an RL stage (PPO, GRPO) sees."""

    reward_max_prompt_len: int = Field(64, ge=1, description="Prompt tokens the reward model sees.")
    reward_max_len: int = Field(160, ge=2, description="Prompt + reply tokens the reward model sees.")


class PPOStageConfig(_RewardModelLengths, _AlignInputs):
    reward_model: str = Field(description="Reward model: a HF sequence-classification folder or a `reward` dataset.")
    max_prompts: int | None = Field(None, ge=1, description="Use at most N distinct training prompts.")
    train: PPOConfig = PPOConfig()

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented computed_field pattern
    @property
    def reward_model_id(self) -> str | None:
        return model_identity(self.reward_model)


class KTOStageConfig(_ModelAndData):
    data: str = Field(description="Unpaired labelled replies (JSON/JSONL/Parquet file, dataset folder or URL): records {messages: [..., assistant reply], "
                      "label: true|false} or {prompt, completion, label}.")
    max_examples: int | None = Field(None, ge=1, description="Use only the first N valid examples.")
    train: KTOConfig = KTOConfig()


class GRPOStageConfig(_RewardModelLengths, _ModelAndData):
    data: str = Field(description="Prompts (JSON/JSONL/Parquet file, dataset folder or URL): records with question (GSM8K: and answer '... #### N'), "
                      "prompt or messages; other keys are passed to the reward functions.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N valid prompt records.")
    reward_model: str | None = Field(None, description="A reward model (HF sequence-classification folder or `reward` "
                                     "dataset) whose score is added to the reward functions as 'reward_model'.")
    train: GRPOConfig = GRPOConfig()

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented computed_field pattern
    @property
    def reward_model_id(self) -> str | None:
        return model_identity(self.reward_model) if self.reward_model else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def reward_funcs_id(self) -> dict[str, str]:
        """The source of each ``module:function`` reward function, so editing it re-runs the stage."""
        from refinery.tasks.align.rewards import function_identity

        return {n: function_identity(n) for n in self.train.reward_funcs}


class RLOOStageConfig(GRPOStageConfig):
    """RLOO on prompts: GRPO's inputs (prompt records, reward functions, optional reward model)."""

    train: RLOOConfig = RLOOConfig()  # type: ignore[assignment]  # RLOO's settings in place of GRPO's


class OnlineDPOStageConfig(GRPOStageConfig):
    """Online DPO on prompts: GRPO's inputs (prompt records, or the prompts of prompt/chosen/rejected
    records; reward functions and the optional reward model rank the sampled pairs)."""

    train: OnlineDPOConfig = OnlineDPOConfig()  # type: ignore[assignment]  # online DPO's settings in place of GRPO's


# Held-out prompts sampled at each validation of an RL run (PPO, GRPO): enough for a mean reward,
# few enough that validating costs about one training step.
HELD_OUT_PROMPTS = 32


# --------------------------------------------------------------------------- helpers
def _load_split(cfg: _AlignInputs):
    from refinery.tasks.align.data import load_pairs, split_pairs

    pairs, counts = load_pairs(cfg.data, cfg.max_pairs, min_valid_fraction=cfg.min_valid_fraction)
    if not pairs:
        raise ValueError(f"{cfg.data}: no valid preference pairs (skipped: {counts['skipped']})")
    train, held_out = split_pairs(pairs, cfg.val_fraction, cfg.seed, cfg.max_val_examples)
    counts = {"records": counts["records"], "pairs": counts["pairs"], "pairs_train": len(train),
              "pairs_held_out": len(held_out), "skipped": counts["skipped"]}
    return train, held_out, counts


def _metrics_dir(b):
    """Where a trainer writes its metrics while it runs: ``<workdir>/checkpoints/<fingerprint>/metrics``."""
    from refinery.tasks.train.metrics import METRICS_DIR
    from refinery.tasks.train.stage import checkpoint_dir

    return checkpoint_dir(b) / METRICS_DIR


def _write_metrics(b, keys: dict) -> None:
    """The run's metrics folder into ``metrics/`` and into each saved model folder."""
    from refinery.tasks.train.metrics import publish_metrics

    publish_metrics(b, _metrics_dir(b), list(dict.fromkeys(keys.values())))


def _save(b, model, tokenizer, lora: bool) -> dict:
    from refinery.tasks.align.common import save_model

    tmp = b.tmpdir()
    keys = save_model(model, tokenizer, tmp, lora)
    b.put_dir(tmp)
    return keys


def _memory_plan(method: str, cfg) -> dict | None:
    """The run's memory estimate per device, printed before training and kept in the manifest; a
    run that cannot fit stops here (MemoryError with the table and what to change)."""
    import sys

    from refinery.tasks.train.plan import plan_align, plan_or_note

    return plan_or_note(lambda: plan_align(method, cfg), log=lambda m: print(m, file=sys.stderr))


def _threads():
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------- training, in one process or several
# Each run trains from the stage config in this process, and is what every torchrun process of a
# multi-process run executes (refinery.tasks.align.worker): run(cfg, ckpt_dir, progress) ->
# (result, counts, base model folder). ``ckpt_dir`` (every process gets it) is the stage's
# checkpoint folder: the engine's checkpoints, resume from them, the metrics in its ``metrics/``.
def _run_on_pairs(module: str, train_fn_name: str):
    """The run of a trainer on preference pairs (reward, DPO, ORPO): the base model, the pairs split
    into training and held-out, ``refinery.tasks.align.<module>.<train_fn_name>`` over them."""
    def run(cfg, ckpt_dir, progress: bool):
        import importlib

        from refinery.tasks.align.common import resolve_model_dir

        train_fn = getattr(importlib.import_module(f"refinery.tasks.align.{module}"), train_fn_name)
        model_dir = resolve_model_dir(cfg.model)
        train, held_out, counts = _load_split(cfg)
        res = train_fn(model_dir, train, held_out, cfg.train, seed=cfg.seed, progress=progress, ckpt_dir=ckpt_dir)
        return res, counts, model_dir

    return run


def _run_kto(cfg: KTOStageConfig, ckpt_dir, progress: bool):
    from refinery.tasks.align.common import resolve_model_dir
    from refinery.tasks.align.data import load_unpaired, split_pairs
    from refinery.tasks.align.kto import train_kto

    model_dir = resolve_model_dir(cfg.model)
    examples, counts = load_unpaired(cfg.data, cfg.max_examples, min_valid_fraction=cfg.min_valid_fraction)
    if len(examples) < 2:
        raise ValueError(f"{cfg.data}: fewer than 2 valid labelled examples (skipped: {counts['skipped']})")
    train, held_out = split_pairs(examples, cfg.val_fraction, cfg.seed, cfg.max_val_examples)
    res = train_kto(model_dir, train, held_out, cfg.train, seed=cfg.seed, progress=progress, ckpt_dir=ckpt_dir)
    return res, {**counts, "examples_train": len(train), "examples_held_out": len(held_out)}, model_dir


def _run_ppo(cfg: PPOStageConfig, ckpt_dir, progress: bool):
    from refinery.tasks.align.common import load_tokenizer, resolve_model_dir
    from refinery.tasks.align.data import render_prompt
    from refinery.tasks.align.ppo import train_ppo
    from refinery.tasks.align.reward import RewardScorer

    model_dir = resolve_model_dir(cfg.model)
    reward_dir = resolve_model_dir(cfg.reward_model)
    train, held_out, counts = _load_split(cfg)
    tok = load_tokenizer(model_dir)
    prompts = list(dict.fromkeys(render_prompt(p.prompt, tok) for p in train))  # distinct, in order
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    scorer = RewardScorer(reward_dir, cfg.reward_max_prompt_len, cfg.reward_max_len, device=cfg.train.device,
                          dtype=cfg.train.dtype)
    # held-out prompts (not among the training ones) for validation and early stopping
    seen = set(prompts)
    held = [p for p in dict.fromkeys(render_prompt(p.prompt, tok) for p in held_out) if p not in seen]
    held = held[:HELD_OUT_PROMPTS]
    res = train_ppo(model_dir, prompts, lambda ps, rs, ids: scorer(ps, rs), cfg.train, seed=cfg.seed,
                    progress=progress, ckpt_dir=ckpt_dir, held_out=held)
    res.stats["reward_model"] = reward_dir
    return res, {**counts, "prompts": len(prompts)}, model_dir


def _run_grpo(cfg: GRPOStageConfig, ckpt_dir, progress: bool, train_fn: Callable | None = None):
    """GRPO (or ``train_fn``: RLOO) on the prompt records, rewarded by the reward functions and
    the optional reward model."""
    from refinery.tasks.align.common import load_tokenizer, resolve_model_dir
    from refinery.tasks.align.data import load_prompts, render_prompt, split_pairs
    from refinery.tasks.align.grpo import train_grpo
    from refinery.tasks.align.rewards import resolve_reward_func

    model_dir = resolve_model_dir(cfg.model)
    records, counts = load_prompts(cfg.data, cfg.max_prompts, min_valid_fraction=cfg.min_valid_fraction)
    if not records:
        raise ValueError(f"{cfg.data}: no valid prompt records (skipped: {counts['skipped']})")
    train, held_out = split_pairs(records, cfg.val_fraction, cfg.seed, min(cfg.max_val_examples or HELD_OUT_PROMPTS,
                                                                          HELD_OUT_PROMPTS))
    funcs = {n: resolve_reward_func(n) for n in cfg.train.reward_funcs}
    reward_dir = None
    if cfg.reward_model:
        from refinery.tasks.align.reward import RewardScorer

        reward_dir = resolve_model_dir(cfg.reward_model)
        scorer = RewardScorer(reward_dir, cfg.reward_max_prompt_len, cfg.reward_max_len, device=cfg.train.device,
                              dtype=cfg.train.dtype)
        funcs["reward_model"] = lambda prompts, completions, **_: scorer(prompts, completions).tolist()
    train_cfg = cfg.train
    if cfg.reward_model and train_cfg.reward_weights is not None:   # the model's score weighs 1
        train_cfg = train_cfg.model_copy(update={"reward_weights": [*train_cfg.reward_weights, 1.0]})
    elif cfg.reward_model:
        train_cfg = train_cfg.model_copy(update={"reward_weights": [1.0] * len(funcs)})
    tok = load_tokenizer(model_dir)
    texts = lambda rs: [render_prompt(r.prompt, tok) for r in rs]  # noqa: E731
    res = (train_fn or train_grpo)(model_dir, texts(train), [r.column_dict() for r in train], funcs, train_cfg,
                                   seed=cfg.seed, held_out=(texts(held_out), [r.column_dict() for r in held_out]),
                                   progress=progress, ckpt_dir=ckpt_dir)
    res.stats["reward_model"] = reward_dir
    counts = {"records": counts["records"], "prompts": counts["prompts"], "prompts_train": len(train),
              "prompts_held_out": len(held_out), "skipped": counts["skipped"]}
    return res, counts, model_dir


def _run_rloo(cfg: RLOOStageConfig, ckpt_dir, progress: bool):
    from refinery.tasks.align.rloo import train_rloo

    return _run_grpo(cfg, ckpt_dir, progress, train_rloo)


def _run_online_dpo(cfg: OnlineDPOStageConfig, ckpt_dir, progress: bool):
    from refinery.tasks.align.online_dpo import train_online_dpo

    return _run_grpo(cfg, ckpt_dir, progress, train_online_dpo)


def _rebuild_reward(cfg: RewardStageConfig, model_dir: str):
    from refinery.tasks.align.reward import load_reward_model

    model, tok = load_reward_model(model_dir, cfg.train.lora, cfg.train.dtype)
    return model, tok


def _rebuild_policy(cfg: DPOStageConfig, model_dir: str):
    from refinery.tasks.align.common import policy_model

    tok, model = policy_model(model_dir, cfg.train)
    return model, tok


def _rebuild_ppo(cfg: PPOStageConfig, model_dir: str):
    from refinery.tasks.align.ppo import load_ppo_policy

    tok, policy, _ = load_ppo_policy(model_dir, cfg.train)
    return policy, tok


@dataclass(frozen=True)
class _Trainer:
    """A method that trains in one process or several: its stage config, the run every process
    executes (``run(cfg, ckpt_dir, progress)``), and the rebuild of the untrained model that the
    workers' trained tensors go into."""

    config: type[StrictModel]
    run: Callable[..., tuple]
    rebuild: Callable[..., tuple]


RUNS = {"reward": _Trainer(RewardStageConfig, _run_on_pairs("reward", "train_reward_model"), _rebuild_reward),
        "dpo": _Trainer(DPOStageConfig, _run_on_pairs("dpo", "train_dpo"), _rebuild_policy),
        "kto": _Trainer(KTOStageConfig, _run_kto, _rebuild_policy),
        "orpo": _Trainer(ORPOStageConfig, _run_on_pairs("orpo", "train_orpo"), _rebuild_policy),
        "cpo": _Trainer(CPOStageConfig, _run_on_pairs("cpo", "train_cpo"), _rebuild_policy),
        "simpo": _Trainer(SimPOStageConfig, _run_on_pairs("cpo", "train_simpo"), _rebuild_policy),
        "ppo": _Trainer(PPOStageConfig, _run_ppo, _rebuild_ppo),
        "grpo": _Trainer(GRPOStageConfig, _run_grpo, _rebuild_policy),
        "rloo": _Trainer(RLOOStageConfig, _run_rloo, _rebuild_policy),
        "online_dpo": _Trainer(OnlineDPOStageConfig, _run_online_dpo, _rebuild_policy)}


def config_json(cfg) -> dict:
    """A stage config as JSON that validates again (its computed identities left out)."""
    return cfg.model_dump(mode="json", exclude=set(type(cfg).model_computed_fields))


def _train(b, cfg, method: str):
    """Train in this process, or on ``cfg.train.devices`` torchrun processes: then rank 0 leaves the
    metrics in this stage's metrics folder and the trained tensors beside the launch spec, and they
    go into a fresh copy of the starting model here. Either way the run checkpoints into the stage's
    checkpoint folder and resumes from it when the same command runs again; a run that stopped early
    (SIGTERM) raises :class:`refinery.tasks.engine.trainer.TrainingInterrupted` instead of being
    published. Returns (result, counts, base model folder)."""
    from refinery.tasks.align.common import TrainResult, raise_if_interrupted, resolve_model_dir
    from refinery.tasks.align.ppo import PPOResult
    from refinery.tasks.train.distributed import launch, load_trainable, num_nodes
    from refinery.tasks.train.stage import checkpoint_dir

    run, rebuild = RUNS[method].run, RUNS[method].rebuild
    folder = checkpoint_dir(b)
    nproc = cfg.train.processes()
    if not cfg.train.launches():
        res, counts, model_dir = run(cfg, folder, True)
        raise_if_interrupted(res.stats, folder)
        return res, counts, model_dir
    strategy = "fsdp" if cfg.train.strategy == "fsdp" else "ddp"
    world = cfg.train.world_size()
    print(f"{method}: launching {strategy} on {nproc} processes"
          + (f" on each of {num_nodes()} nodes" if num_nodes() > 1 else ""), flush=True)
    spec = {"method": method, "config": config_json(cfg), "ckpt_dir": str(folder)}
    out = launch(spec, nproc, folder, module="refinery.tasks.align.worker")
    raise_if_interrupted(out["stats"], folder)
    model_dir = resolve_model_dir(cfg.model)
    model, tok = rebuild(cfg, model_dir)
    load_trainable(model, folder / "trained.pt")
    stats = {**out["stats"], "world_size": world, "strategy": strategy}
    res = PPOResult(policy=model, tokenizer=tok, stats=stats) if method == "ppo" else \
        TrainResult(model=model, tokenizer=tok, stats=stats)
    return res, out["counts"], model_dir


# --------------------------------------------------------------------------- stages
@stage("reward", version="1", kind=MultiNodeStage)
@with_model_cards
def reward_stage(b, inputs, cfg: RewardStageConfig) -> StageOutput:
    """Train a reward model (scalar head on the starting model) on preference pairs."""
    memory_plan = _memory_plan("reward", cfg)
    res, counts, model_dir = _train(b, cfg, "reward")
    keys = _save(b, res.model, res.tokenizer, cfg.train.lora.enabled)
    _write_metrics(b, keys)
    after = res.stats["held_out_after"]
    metrics = {"held_out_accuracy": after.get("accuracy"), "held_out_margin": after.get("margin"),
               "held_out_accuracy_before": res.stats["held_out_before"].get("accuracy"),
               "final_loss": res.stats["final_loss"]}
    return StageOutput(counts={**counts, "steps": res.stats["steps"]},
                       stats={**res.stats, "base_model": model_dir, "threads": _threads()},
                       extra={**keys, "memory_plan": memory_plan,
                              "kind": "reward_model", "metrics": metrics})


@stage("dpo", version="1", kind=MultiNodeStage)
@with_model_cards
def dpo_stage(b, inputs, cfg: DPOStageConfig) -> StageOutput:
    """Direct preference optimisation of the starting model on preference pairs."""
    memory_plan = _memory_plan("dpo", cfg)
    res, counts, model_dir = _train(b, cfg, "dpo")
    keys = _save(b, res.model, res.tokenizer, cfg.train.lora.enabled)
    _write_metrics(b, keys)
    before, after = res.stats["held_out_before"], res.stats["held_out_after"]
    metrics = {"held_out_accuracy_before": before.get("accuracy"), "held_out_accuracy": after.get("accuracy"),
               "held_out_margin_before": before.get("margin"), "held_out_margin": after.get("margin"),
               "held_out_logp_accuracy_before": before.get("logp_accuracy"),
               "held_out_logp_accuracy": after.get("logp_accuracy"),
               "final_loss": res.stats["final_loss"]}
    return StageOutput(counts={**counts, "steps": res.stats["steps"]},
                       stats={**res.stats, "base_model": model_dir, "threads": _threads()},
                       extra={**keys, "memory_plan": memory_plan,
                              "kind": "policy", "method": "dpo", "metrics": metrics})


@stage("orpo", version="1", kind=MultiNodeStage)
@with_model_cards
def orpo_stage(b, inputs, cfg: ORPOStageConfig) -> StageOutput:
    """ORPO (reference-free: supervised NLL plus an odds-ratio preference term) on preference pairs."""
    memory_plan = _memory_plan("orpo", cfg)
    res, counts, model_dir = _train(b, cfg, "orpo")
    keys = _save(b, res.model, res.tokenizer, cfg.train.lora.enabled)
    _write_metrics(b, keys)
    before, after = res.stats["held_out_before"], res.stats["held_out_after"]
    metrics = {"held_out_loss_before": before.get("loss"), "held_out_loss": after.get("loss"),
               "held_out_accuracy_before": before.get("accuracy"), "held_out_accuracy": after.get("accuracy"),
               "held_out_margin": after.get("margin"), "final_loss": res.stats["final_loss"]}
    return StageOutput(counts={**counts, "steps": res.stats["steps"]},
                       stats={**res.stats, "base_model": model_dir, "threads": _threads()},
                       extra={**keys, "memory_plan": memory_plan,
                              "kind": "policy", "method": "orpo", "metrics": metrics})


def _ref_free_output(b, cfg, method: str) -> StageOutput:
    """Train CPO or SimPO and publish: the model, metrics, held-out figures before and after."""
    memory_plan = _memory_plan(method, cfg)
    res, counts, model_dir = _train(b, cfg, method)
    keys = _save(b, res.model, res.tokenizer, cfg.train.lora.enabled)
    _write_metrics(b, keys)
    before, after = res.stats["held_out_before"], res.stats["held_out_after"]
    metrics = {"held_out_loss_before": before.get("loss"), "held_out_loss": after.get("loss"),
               "held_out_accuracy_before": before.get("accuracy"), "held_out_accuracy": after.get("accuracy"),
               "held_out_margin_before": before.get("margin"), "held_out_margin": after.get("margin"),
               "final_loss": res.stats["final_loss"]}
    return StageOutput(counts={**counts, "steps": res.stats["steps"]},
                       stats={**res.stats, "base_model": model_dir, "threads": _threads()},
                       extra={**keys, "memory_plan": memory_plan, "kind": "policy", "method": method, "metrics": metrics})


@stage("cpo", version="1", kind=MultiNodeStage)
@with_model_cards
def cpo_stage(b, inputs, cfg: CPOStageConfig) -> StageOutput:
    """CPO (reference-free: a preference loss of the policy's own log-probs plus the chosen reply's NLL) on pairs."""
    return _ref_free_output(b, cfg, "cpo")


@stage("simpo", version="1", kind=MultiNodeStage)
@with_model_cards
def simpo_stage(b, inputs, cfg: SimPOStageConfig) -> StageOutput:
    """SimPO (reference-free, length-normalised rewards with a target margin) on preference pairs."""
    return _ref_free_output(b, cfg, "simpo")


@stage("ppo", version="1", kind=MultiNodeStage)
@with_model_cards
def ppo_stage(b, inputs, cfg: PPOStageConfig) -> StageOutput:
    """PPO of the starting model against a reward model, on the prompts of the preference pairs."""
    memory_plan = _memory_plan("ppo", cfg)
    from refinery.tasks.align.ppo import save_value_head

    res, counts, model_dir = _train(b, cfg, "ppo")
    reward_dir = res.stats["reward_model"]
    keys = _save(b, res.policy.lm, res.tokenizer, cfg.train.lora.enabled)
    tmp = b.tmpdir()
    b.put_file(save_value_head(res.policy, tmp), "value_head.safetensors")
    _write_metrics(b, keys)
    s = res.stats
    metrics = {"reward_first": s["reward_first"], "reward_last": s["reward_last"],
               "reward_start_avg": s["reward_start_avg"], "reward_end_avg": s["reward_end_avg"],
               "kl_last": s["kl_last"], "kl_max": s["kl_max"], "entropy_last": s["entropy_last"],
               "kl_coef_first": s["kl_coef_first"], "kl_coef_last": s["kl_coef_last"]}
    return StageOutput(counts={**counts, "steps": s["steps"], "rollouts": s["steps"] * cfg.train.batch_size},
                       stats={**s, "base_model": model_dir, "reward_model": reward_dir, "threads": _threads()},
                       extra={**keys, "memory_plan": memory_plan,
                              "kind": "policy", "method": "ppo", "value_head": "value_head.safetensors",
                              "metrics": metrics})


@stage("kto", version="1", kind=MultiNodeStage)
@with_model_cards
def kto_stage(b, inputs, cfg: KTOStageConfig) -> StageOutput:
    """KTO of the starting model on unpaired replies labelled desirable or undesirable."""
    memory_plan = _memory_plan("kto", cfg)
    res, counts, model_dir = _train(b, cfg, "kto")
    keys = _save(b, res.model, res.tokenizer, cfg.train.lora.enabled)
    _write_metrics(b, keys)
    before, after = res.stats["held_out_before"], res.stats["held_out_after"]
    metrics = {"held_out_loss_before": before.get("loss"), "held_out_loss": after.get("loss"),
               "held_out_margin": after.get("margin"), "held_out_accuracy": after.get("accuracy"),
               "final_loss": res.stats["final_loss"]}
    counts = {**counts, "steps": res.stats["steps"]}
    return StageOutput(counts=counts, stats={**res.stats, "base_model": model_dir, "threads": _threads()},
                       extra={**keys, "memory_plan": memory_plan,
                              "kind": "policy", "method": "kto", "metrics": metrics})


@stage("grpo", version="1", kind=MultiNodeStage)
@with_model_cards
def grpo_stage(b, inputs, cfg: GRPOStageConfig) -> StageOutput:
    """GRPO of the starting model on prompts, rewarded by Python reward functions (and/or a reward model)."""
    return _prompt_rl_output(b, cfg, "grpo")


@stage("rloo", version="1", kind=MultiNodeStage)
@with_model_cards
def rloo_stage(b, inputs, cfg: RLOOStageConfig) -> StageOutput:
    """RLOO (k samples per prompt, leave-one-out baseline) of the starting model on prompts, rewarded
    by Python reward functions (and/or a reward model)."""
    return _prompt_rl_output(b, cfg, "rloo")


def _prompt_rl_output(b, cfg, method: str, more: tuple[str, ...] = ()) -> StageOutput:
    """Train a trainer that samples from the policy on prompts (GRPO, RLOO, online DPO) and
    publish: the model, metrics, rewards before and after (and the stats ``more`` names)."""
    memory_plan = _memory_plan(method, cfg)
    res, counts, model_dir = _train(b, cfg, method)
    reward_dir = res.stats.get("reward_model")
    keys = _save(b, res.model, res.tokenizer, cfg.train.lora.enabled)
    _write_metrics(b, keys)
    s = res.stats
    metrics = {"reward_start_avg": s["reward_start_avg"], "reward_end_avg": s["reward_end_avg"],
               "held_out_reward_before": s["held_out_reward_before"], "held_out_reward": s["held_out_reward_after"],
               **{k: s[k] for k in more}, "kl_last": s["kl_last"]}
    counts = {**counts, "steps": s["steps"]}
    return StageOutput(counts=counts,
                       stats={**s, "base_model": model_dir, "reward_model": reward_dir, "threads": _threads()},
                       extra={**keys, "memory_plan": memory_plan,
                              "kind": "policy", "method": method, "metrics": metrics})


@stage("online_dpo", version="1", kind=MultiNodeStage)
@with_model_cards
def online_dpo_stage(b, inputs, cfg: OnlineDPOStageConfig) -> StageOutput:
    """Online DPO of the starting model on prompts: pairs sampled from the policy every step, ranked
    by Python reward functions (and/or a reward model), the DPO loss against the starting model."""
    return _prompt_rl_output(b, cfg, "online_dpo", ("reward_margin_last", "margin_last", "accuracy_last"))


__all__ = ["reward_stage", "dpo_stage", "ppo_stage", "grpo_stage", "rloo_stage", "online_dpo_stage", "kto_stage",
           "orpo_stage", "cpo_stage", "simpo_stage", "RewardStageConfig", "DPOStageConfig", "PPOStageConfig",
           "GRPOStageConfig", "RLOOStageConfig", "OnlineDPOStageConfig", "KTOStageConfig", "ORPOStageConfig",
           "CPOStageConfig", "SimPOStageConfig"]
