"""Align a (fine-tuned) model: DPO on preference pairs, PPO against a reward model, or GRPO or
RLOO on prompts with verifiable rewards, online DPO (pairs sampled from the policy, ranked by reward
functions or a reward model), KTO on unpaired labelled replies, or ORPO, CPO or SimPO (reference-free) on pairs.

    refinery run align --set input=MODEL --set data=PAIRS.jsonl.gz --set method=ppo --set ppo.max_steps=20 --json
    refinery run align --set input=MODEL --set data=gsm8k.jsonl --set method=grpo --set grpo.max_steps=10 --json

``input`` is a Hugging Face model folder or the finetune flow's output dataset (its manifest names
the ``merged``/``model`` folder). With ``method=ppo`` and no ``reward_model``, a reward model is
trained on the same pairs first (``reward.*`` settings). Each trainer's settings live in its nested
config, spelled as everywhere (``dpo.max_steps``, ``dpo.beta``, ``ppo.kl_coef``, ``ppo.lora.enabled``
...); there are no flat shortcuts.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from refinery.flows.common import (FlowParams, emit_completed, gpu_slot, print_table, refinery_flow, result,
                                   stage_seconds)
from refinery.tasks.config import StrictModel
from refinery.tasks.align.common import is_dataset_dir
from refinery.tasks.align.data import MIN_VALID_FRACTION
from refinery.tasks.align.cpo import CPOConfig, SimPOConfig
from refinery.tasks.align.dpo import DPOConfig
from refinery.tasks.align.grpo import GRPOConfig
from refinery.tasks.align.kto import KTOConfig
from refinery.tasks.align.orpo import ORPOConfig
from refinery.tasks.align.ppo import PPOConfig
from refinery.tasks.align.reward import RewardConfig
from refinery.tasks.align.rloo import RLOOConfig
from refinery.tasks.align.stage import RLOOStageConfig, rloo_stage
from refinery.tasks.align.online_dpo import OnlineDPOConfig
from refinery.tasks.align.stage import OnlineDPOStageConfig, online_dpo_stage
from refinery.tasks.align.stage import (CPOStageConfig, DPOStageConfig, GRPOStageConfig, KTOStageConfig,
                                        ORPOStageConfig, PPOStageConfig, RewardStageConfig, SimPOStageConfig,
                                        cpo_stage, dpo_stage, grpo_stage, kto_stage, orpo_stage, ppo_stage,
                                        reward_stage, simpo_stage)
from refinery.tasks.report import table_artifact


class AlignSettings(StrictModel):
    """Every alignment setting except the two inputs (the model and the pairs file): the align
    flow's parameters and the pipeline's ``align`` section. Each trainer's knobs live in its own
    nested config, spelled as in pretrain and finetune (``dpo.max_steps``, ``ppo.lr``,
    ``reward.batch_size``, ``ppo.lora.enabled`` ...)."""

    method: Literal["ppo", "dpo", "grpo", "rloo", "online_dpo", "kto", "orpo", "cpo", "simpo"] = Field("dpo", description=(
        "ppo: RL against a reward model; dpo: direct preference optimisation; grpo: group-relative RL on prompts "
        "with reward functions (data: prompts, e.g. GSM8K question/answer); rloo: REINFORCE with a leave-one-out "
        "baseline over k samples per prompt (data and rewards as grpo); online_dpo: DPO on 2 completions per prompt "
        "sampled from the policy each step, ranked by the reward functions or reward_model (data as grpo); kto: unpaired replies labelled "
        "desirable/undesirable; orpo: reference-free SFT + odds-ratio preference loss on pairs; cpo: reference-free "
        "preference loss + NLL of the chosen reply; simpo: reference-free, length-normalised reward margin."))
    reward_model: str | None = Field(None, description="Reward model for PPO (HF folder or `reward` dataset); trained on `data` (with the `reward` settings) when empty. GRPO/RLOO/online DPO: optional, added to their reward functions.")
    max_pairs: int | None = Field(None, ge=1, description="Use only the first N valid pairs (grpo, rloo, online_dpo: prompt records; kto: examples).")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of pairs held out for evaluation.")
    seed: int = Field(0, description="Seed of the split, initialisation, shuffling and sampling.")
    min_valid_fraction: float = Field(MIN_VALID_FRACTION, ge=0, le=1, description=(
        "Fail when fewer than this share of the data file's records are usable (bad JSON, empty prompt or reply, "
        "unknown format ...); the error gives the counts by reason. 0 turns the check off."))
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward-model training (method=ppo without reward_model).")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO settings (method=ppo).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO settings (method=dpo).")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO settings (method=grpo).")
    rloo: RLOOConfig = Field(default_factory=RLOOConfig, description="RLOO settings (method=rloo).")
    online_dpo: OnlineDPOConfig = Field(default_factory=OnlineDPOConfig, description="Online DPO settings (method=online_dpo).")
    kto: KTOConfig = Field(default_factory=KTOConfig, description="KTO settings (method=kto).")
    orpo: ORPOConfig = Field(default_factory=ORPOConfig, description="ORPO settings (method=orpo).")
    cpo: CPOConfig = Field(default_factory=CPOConfig, description="CPO settings (method=cpo).")
    simpo: SimPOConfig = Field(default_factory=SimPOConfig, description="SimPO settings (method=simpo).")


class _Inputs(FlowParams):
    """The storage root and the two inputs: first in the help and the Prefect form."""

    input: str = Field(description="Model to align: a HF model folder or a refinery dataset naming one (e.g. the finetune flow's output).")
    data: str = Field(description="Preference pairs file: .json, .jsonl or .jsonl.gz (HH-RLHF transcripts, ShareGPT conversations+chosen+rejected, or prompt/chosen/rejected); grpo, rloo, online_dpo: prompt records (question/prompt/messages, plus columns such as answer); kto: {messages, label} or {prompt, completion, label}.")


class AlignParams(AlignSettings, _Inputs):
    """Flow parameters: the storage root, the two inputs, then the alignment settings."""

    flow_name: ClassVar[str] = "align"

    def memory_plan(self):
        """The memory estimate per device of this run's training stage (``refinery plan align``)."""
        from refinery.tasks.train.plan import plan_align

        if self.method == "ppo":   # without reward_model the reward model is trained from the policy first
            return plan_align("ppo", ppo_config(self, self.reward_model or self.input))
        stage_config = {"dpo": dpo_config, "orpo": orpo_config, "kto": kto_config, "grpo": grpo_config,
                        "rloo": rloo_config, "online_dpo": online_dpo_config,
                        "cpo": cpo_config, "simpo": simpo_config}[self.method]
        return plan_align(self.method, stage_config(self))


def _common(p: AlignParams) -> dict:
    return dict(model=p.input, data=p.data, max_pairs=p.max_pairs, val_fraction=p.val_fraction, seed=p.seed,
                min_valid_fraction=p.min_valid_fraction)


def dpo_config(p: AlignParams) -> DPOStageConfig:
    """The dpo stage config of a run."""
    return DPOStageConfig(**_common(p), train=p.dpo)


def reward_config(p: AlignParams) -> RewardStageConfig:
    """The reward stage config of a run."""
    return RewardStageConfig(**_common(p), train=p.reward)


def ppo_config(p: AlignParams, reward_model: str) -> PPOStageConfig:
    """The ppo stage config of a run against ``reward_model``."""
    return PPOStageConfig(**_common(p), reward_model=reward_model, train=p.ppo)


def grpo_config(p: AlignParams) -> GRPOStageConfig:
    """The grpo stage config of a run."""
    return GRPOStageConfig(model=p.input, data=p.data, max_prompts=p.max_pairs, val_fraction=p.val_fraction,
                           seed=p.seed, min_valid_fraction=p.min_valid_fraction, reward_model=p.reward_model,
                           train=p.grpo)


def rloo_config(p: AlignParams) -> RLOOStageConfig:
    """The rloo stage config of a run (GRPO's inputs, RLOO's settings)."""
    return RLOOStageConfig(model=p.input, data=p.data, max_prompts=p.max_pairs, val_fraction=p.val_fraction,
                           seed=p.seed, min_valid_fraction=p.min_valid_fraction, reward_model=p.reward_model,
                           train=p.rloo)


def online_dpo_config(p: AlignParams) -> OnlineDPOStageConfig:
    """The online_dpo stage config of a run (GRPO's inputs, online DPO's settings)."""
    return OnlineDPOStageConfig(model=p.input, data=p.data, max_prompts=p.max_pairs, val_fraction=p.val_fraction,
                                seed=p.seed, min_valid_fraction=p.min_valid_fraction, reward_model=p.reward_model,
                                train=p.online_dpo)


def orpo_config(p: AlignParams) -> ORPOStageConfig:
    """The orpo stage config of a run."""
    return ORPOStageConfig(**_common(p), train=p.orpo)


def cpo_config(p: AlignParams) -> CPOStageConfig:
    """The cpo stage config of a run."""
    return CPOStageConfig(**_common(p), train=p.cpo)


def simpo_config(p: AlignParams) -> SimPOStageConfig:
    """The simpo stage config of a run."""
    return SimPOStageConfig(**_common(p), train=p.simpo)


def kto_config(p: AlignParams) -> KTOStageConfig:
    """The kto stage config of a run."""
    return KTOStageConfig(model=p.input, data=p.data, max_examples=p.max_pairs, val_fraction=p.val_fraction,
                          seed=p.seed, min_valid_fraction=p.min_valid_fraction, train=p.kto)


def _lineage(*paths: str | None) -> list[str]:
    return [x for x in paths if x and is_dataset_dir(x)]


@refinery_flow("align", AlignParams)
def align_flow(p: AlignParams) -> dict:
    """Align a model: DPO, ORPO, CPO or SimPO on preference pairs, KTO on labelled replies, PPO against a reward model, GRPO, RLOO or online DPO with reward functions."""
    stages = {}
    with gpu_slot():
        if p.method == "dpo":
            stages["dpo"] = dpo_stage.call(p.workdir, _lineage(p.input), dpo_config(p))
        elif p.method == "orpo":
            stages["orpo"] = orpo_stage.call(p.workdir, _lineage(p.input), orpo_config(p))
        elif p.method == "cpo":
            stages["cpo"] = cpo_stage.call(p.workdir, _lineage(p.input), cpo_config(p))
        elif p.method == "simpo":
            stages["simpo"] = simpo_stage.call(p.workdir, _lineage(p.input), simpo_config(p))
        elif p.method == "kto":
            stages["kto"] = kto_stage.call(p.workdir, _lineage(p.input), kto_config(p))
        elif p.method == "grpo":
            stages["grpo"] = grpo_stage.call(p.workdir, _lineage(p.input, p.reward_model), grpo_config(p))
        elif p.method == "rloo":
            stages["rloo"] = rloo_stage.call(p.workdir, _lineage(p.input, p.reward_model), rloo_config(p))
        elif p.method == "online_dpo":
            stages["online_dpo"] = online_dpo_stage.call(p.workdir, _lineage(p.input, p.reward_model),
                                                         online_dpo_config(p))
        else:
            reward_model = p.reward_model
            if reward_model is None:
                stages["reward"] = reward_stage.call(p.workdir, _lineage(p.input), reward_config(p))
                reward_model = stages["reward"].path
            stages["ppo"] = ppo_stage.call(p.workdir, _lineage(p.input, reward_model), ppo_config(p, reward_model))
    metrics = {name: ds.manifest.get("metrics", {}) for name, ds in stages.items()}
    rows = [{"stage": name, **m, "seconds": stage_seconds(ds), "fingerprint": ds.fingerprint}
            for (name, ds), m in zip(stages.items(), metrics.values())]
    print_table(rows, title="== align")
    table_artifact("align-metrics", rows, description="align: held-out preference accuracy / PPO reward and KL")
    final = stages[p.method]
    # per stage: the per-step table and the PNGs kept in the dataset's metrics/ folder
    from refinery.tasks.train.metrics import report_metrics

    for name, ds in stages.items():
        report_metrics(ds, f"align-{name}", description=f"{name}: per-step figures")
    model_dir = final.file(final.manifest.get("merged") or final.manifest["model"])
    out = result(stages, metrics=metrics, model=model_dir)
    emit_completed("align", out, primary=final.path)
    return out
