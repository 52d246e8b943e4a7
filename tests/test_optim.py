"""Weight-decay exclusions: PIRL decays only conv and linear weights."""

from __future__ import annotations

from torch import nn

from pirl import config
from pirl.models import build_model
from pirl.optim import build_optimizer, param_groups


def test_no_decay_on_bn_and_biases_for_pirl():
    cfg, _ = config.load(["config=pretrain/pirl/pirl_demo_resnet18"])
    model = build_model(cfg)
    decay, no_decay = param_groups(
        model, regularize_bn=False, regularize_bias=False, weight_decay=1e-4
    )
    decayed = {id(p) for p in decay["params"]}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            expect = isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight"
            assert (id(p) in decayed) == expect, (type(module).__name__, name)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, cfg.OPTIMIZER, lr=0.1)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is False


def test_npid_decays_biases_but_not_bn():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    decay, no_decay = param_groups(
        model, regularize_bn=False, regularize_bias=True, weight_decay=1e-4
    )
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[0].bias)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias)}
