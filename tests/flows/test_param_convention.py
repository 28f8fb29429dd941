"""One parameter convention: every training knob has one name (declared once, in
refinery.tasks.train.config) across pretrain, finetune and align; method settings are nested; no
flat field shadows a nested one; the pipeline's sections are the flows' own models, validated
before anything runs."""
from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel, ValidationError

from refinery.flows.align import AlignParams
from refinery.flows.demo import DemoParams
from refinery.flows.finetune import FinetuneParams
from refinery.flows.pipeline import ORDER, PARAMS, SECTIONS, SUPPLIED, PipelineParams, run_chain
from refinery.flows.pretrain import PretrainParams
from refinery.tasks.align.dpo import DPOConfig
from refinery.tasks.align.ppo import PPOConfig
from refinery.tasks.align.reward import RewardConfig
from refinery.tasks.finetune.config import FinetuneConfig
from refinery.tasks.train.config import LMTrainingParams, LoraParams, TrainConfig, TrainingParams

FLOW_PARAMS = {"pretrain": PretrainParams, "finetune": FinetuneParams, "align": AlignParams,
               "pipeline": PipelineParams, "demo": DemoParams}
TRAINERS = [TrainConfig, FinetuneConfig, RewardConfig, DPOConfig, PPOConfig]
# spellings that drifted before there was one vocabulary; none may come back
OLD_NAMES = {"patience", "min_delta", "steps", "lora_r", "lora_alpha", "lora_dropout", "compute_dtype",
             "gradient_checkpointing", "rollout_batch_size", "eval_fraction", "eval_max", "reward_max_steps",
             "options", "learning_rate", "bf16", "fp32"}


def _nested_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field's dotted path, nested models expanded."""
    out = []
    for name, f in cls.model_fields.items():
        sub = _nested_model(f.annotation)
        out += paths(sub, f"{prefix}{name}.") if sub is not None else [prefix + name]
    return out


@pytest.mark.parametrize("flow", sorted(FLOW_PARAMS))
def test_no_flat_field_shadows_a_nested_one(flow):
    """A knob lives in one place: no top-level field also appears inside one of the nested configs
    (the old align shortcuts ``max_steps``/``kl_coef``/``lora`` overrode ``ppo.*``/``dpo.*``)."""
    cls = FLOW_PARAMS[flow]
    flat = {n for n, f in cls.model_fields.items() if _nested_model(f.annotation) is None}
    nested = {p.rsplit(".", 1)[-1] for p in paths(cls) if "." in p}
    # the demo's seed seeds its crawl and is only the *default* of its sections' seeds; the
    # pipeline's data is the fine-tune's instruction file (finetune's section has no data), while
    # evaluate.data is the evaluate flow's own documents input: two inputs, not one knob twice
    allowed = {"demo": {"seed"}, "pipeline": {"data"}}.get(flow, set())
    assert flat & nested <= allowed, f"{flow}: {sorted(flat & nested - allowed)} both flat and nested"
    assert len(paths(cls)) == len(set(paths(cls)))


@pytest.mark.parametrize("flow", sorted(FLOW_PARAMS))
def test_no_old_spelling(flow):
    leaves = {p.rsplit(".", 1)[-1] for p in paths(FLOW_PARAMS[flow])}
    assert not leaves & OLD_NAMES, sorted(leaves & OLD_NAMES)


@pytest.mark.parametrize("cls", TRAINERS, ids=lambda c: c.__name__)
def test_shared_knobs_declared_once(cls):
    """Every trainer's config takes the shared knobs from TrainingParams: same name, type, bounds and
    description (a subclass may only change the default)."""
    assert issubclass(cls, TrainingParams)
    for base in (TrainingParams, LMTrainingParams):
        if not issubclass(cls, base):
            continue
        for name, f in base.model_fields.items():
            mine = cls.model_fields[name]
            assert (mine.annotation, mine.description, mine.metadata) == (f.annotation, f.description, f.metadata), name
    dtype = cls.model_fields["dtype"].annotation
    assert set(typing.get_args(dtype)) == {"auto", "float32", "bfloat16", "float16"}


def test_same_concept_same_name_across_flows():
    """The common knobs have one path per flow: top level in pretrain and finetune, inside each
    trainer's section in align; LoRA's under ``lora.``."""
    common = ["max_steps", "lr", "batch_size", "weight_decay", "grad_clip", "device", "dtype"]
    lm = ["grad_accum", "warmup_steps", "scheduler", "eval_every", "early_stopping_patience", "seed", "seq_len"]
    assert set(common + lm) <= set(paths(PretrainParams)) and set(common + lm) <= set(paths(FinetuneParams))
    align = set(paths(AlignParams))
    for trainer in ("reward", "dpo", "ppo"):
        assert {f"{trainer}.{k}" for k in common} <= align
        assert {f"{trainer}.lora.{k}" for k in ("enabled", "r", "alpha", "dropout", "target_modules")} <= align
    assert {"lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.use_dora"} <= set(paths(FinetuneParams))
    assert issubclass(FinetuneParams.model_fields["lora"].annotation, LoraParams)


def test_subclass_defaults_keep_the_field():
    assert (TrainConfig().lr, TrainConfig().weight_decay, PPOConfig().max_steps, DPOConfig().dtype) == (3e-3, 0.1, 20, "float32")
    assert TrainingParams().lr == 1e-4  # the base is untouched
    assert TrainConfig.model_fields["lr"].description == TrainingParams.model_fields["lr"].description
    with pytest.raises(ValidationError):
        TrainConfig(lr=0)  # bounds still apply
    with pytest.raises(ValidationError):
        TrainConfig(max_steps=0)  # 0 (no cap) only where epochs end the run
    assert DPOConfig(max_steps=0).max_steps == 0
    with pytest.raises(TypeError, match="nope"):
        type("Bad", (TrainingParams,), {"__annotations__": {}, "field_defaults": {"nope": 1}})


def test_pretrain_warmup_defaults_to_a_fraction_of_max_steps():
    from refinery.tasks.engine.schedule import WarmupCosine

    assert TrainConfig(max_steps=20).resolved_warmup() == 1  # not all warm-up
    assert TrainConfig(max_steps=300).resolved_warmup() == 15
    assert TrainConfig(max_steps=20, warmup_steps=50).resolved_warmup() == 20
    assert TrainConfig(max_steps=100, warmup_ratio=0.1).resolved_warmup() == 10
    for dtype in ("bf16", "fp32", "float16"):
        with pytest.raises(ValidationError):
            TrainConfig(dtype=dtype)
    f = {k: WarmupCosine(2, 12, 0.1, k) for k in ("cosine", "linear", "constant")}
    assert [round(f["linear"](s), 3) for s in (2, 7, 12)] == [1.0, 0.55, 0.1]
    assert f["constant"](11) == 1.0 and f["cosine"](12) == pytest.approx(0.1) and f["cosine"](0) == 1 / 3


def test_pipeline_sections_are_the_flows_models():
    """Each section is its flow's params less what the pipeline supplies, field for field."""
    for name in ORDER:
        full = set(PARAMS[name].model_fields) - SUPPLIED[name]
        assert set(SECTIONS[name].model_fields) == full, name
        assert PipelineParams.model_fields[name].annotation is SECTIONS[name]
        assert DemoParams.model_fields[name].annotation is SECTIONS[name]


@pytest.mark.parametrize("bad", [{"pretrain": {"lerning_rate": 1e-3}}, {"align": {"ppo": {"kl_coeff": 0.5}}},
                                 {"finetune": {"lora": {"rr": 4}}}, {"curate": {"dedup": {"bandz": 3}}},
                                 {"tokenize": {"tokenizer": {"vocab": 10}}}, {"pretrain": {"dtype": "bf16"}}])
def test_pipeline_typo_fails_at_validation(bad):
    with pytest.raises(ValidationError):
        PipelineParams(input="crawl", data="sft.json", **bad)
    with pytest.raises(ValidationError):
        DemoParams(**bad)


def test_pipeline_checks_every_flow_before_the_first_runs(monkeypatch):
    """A late flow whose full parameters do not validate stops the chain before curate loads."""
    import refinery.flows.cli as cli

    loaded = []
    monkeypatch.setattr(cli, "load_flow", lambda name: loaded.append(name) or pytest.fail(f"{name} ran"))
    p = PipelineParams(input="crawl", data="sft.json", preferences="pairs.jsonl")
    sections = {name: getattr(p, name) for name in ORDER}
    sections["align"] = sections["align"].model_construct(**{**dict(sections["align"]), "val_fraction": 2.0})
    with pytest.raises(ValidationError, match="val_fraction"):
        run_chain(p, p.input, p.data, p.preferences, sections)
    assert loaded == []


def test_cli_pipeline_typo_fails_before_anything_runs(tmp_path, capsys):
    from refinery.flows.cli import main

    work = tmp_path / "w"
    with pytest.raises(SystemExit) as e:
        main(["run", "pipeline", "--workdir", str(work), "--set", "input=crawl/*.warc.gz", "--set", "data=sft.json",
              "--set", "pretrain.lerning_rate=1e-3"])
    assert "lerning_rate" in f"{e.value}{capsys.readouterr().err}"
    assert not work.exists()


def test_demo_sections_merge_over_demo_defaults():
    p = DemoParams(seed=3, pretrain={"max_steps": 100}, align={"dpo": {"beta": 0.2}})
    assert (p.pretrain.max_steps, p.pretrain.seq_len, p.pretrain.preset) == (100, 128, "tiny")
    assert (p.align.dpo.beta, p.align.dpo.max_steps, p.finetune.max_steps) == (0.2, 30, 60)
    assert p.pretrain.seed == p.finetune.seed == p.align.seed == 3  # the demo's seed is their default
    assert DemoParams(seed=3, finetune={"seed": 7}).finetune.seed == 7
    again = DemoParams.model_validate({k: getattr(p, k) for k in DemoParams.model_fields})  # what run_params passes
    assert again == p
