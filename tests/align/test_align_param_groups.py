"""Parameter groups: the pretrained backbone and newly added heads take separate learning rates."""
from __future__ import annotations

import torch

from refinery.tasks.train.common import is_head_param, param_groups
from refinery.tasks.train.config import TrainingParams


class _TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.score = torch.nn.Linear(4, 1)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_head_params_are_found_by_whole_path_segment():
    assert is_head_param("score.weight", ["score"])
    assert is_head_param("base_model.model.score.modules_to_save.default.weight", ["score"])
    assert is_head_param("v_head.summary.bias", ["v_head"])
    assert not is_head_param("model.scores_table.weight", ["score"])   # a segment, not a substring
    assert not is_head_param("model.layers.0.mlp.weight", ["score", "v_head"])
    assert not is_head_param("score.weight", [])


def test_param_groups_split_backbone_and_head_rates_and_decay():
    model = _TinyClassifier()
    groups = {g["name"]: g for g in param_groups(model, lr=2e-5, head_lr=1e-4, head_prefixes=["score"],
                                                   weight_decay=0.1)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert groups["backbone"]["params"] == [model.embed.weight]
    assert groups["backbone_no_decay"]["params"] == [model.norm.weight, model.norm.bias]
    assert groups["head"]["params"] == [model.score.weight] and groups["head_no_decay"]["params"] == [model.score.bias]
    assert groups["backbone"]["lr"] == groups["backbone_no_decay"]["lr"] == 2e-5
    assert groups["head"]["lr"] == groups["head_no_decay"]["lr"] == 1e-4
    assert groups["backbone"]["weight_decay"] == groups["head"]["weight_decay"] == 0.1
    assert groups["backbone_no_decay"]["weight_decay"] == groups["head_no_decay"]["weight_decay"] == 0.0
    frozen = {id(p) for p in model.frozen.parameters()}
    assert not any(id(p) in frozen for g in groups.values() for p in g["params"])
    # torch keeps the names and rates; a LambdaLR schedule scales each group from its own base
    opt = torch.optim.AdamW(list(groups.values()), lr=2e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["head"] == 0.5e-4
    del sched


def test_param_groups_without_head_lr_use_one_rate_and_skip_empty_groups():
    model = torch.nn.Linear(3, 3)
    model.weight = torch.nn.Parameter(model.weight.detach())
    groups = param_groups(model, lr=1e-3)
    assert [g["name"] for g in groups] == ["backbone", "backbone_no_decay"]
    assert all(g["lr"] == 1e-3 for g in groups)


def test_tied_weights_appear_once():
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False))
    model[1].weight = model[0].weight
    groups = param_groups(model, lr=1e-3)
    assert sum(len(g["params"]) for g in groups) == 1


def test_head_lr_field_defaults_to_lr():
    assert TrainingParams().head_lr is None and TrainingParams(lr=3e-5).resolved_head_lr() == 3e-5
    assert TrainingParams(lr=3e-5, head_lr=1e-4).resolved_head_lr() == 1e-4
    assert "1e-4" in TrainingParams.model_fields["head_lr"].description
