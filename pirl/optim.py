"""SGD with VISSL's weight-decay exclusions."""

from __future__ import annotations

import torch
from torch import nn

from pirl.schema import Optimizer

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(
    model: nn.Module, regularize_bn: bool, regularize_bias: bool, weight_decay: float
) -> list[dict]:
    """Split parameters into decayed and not decayed: norm-layer weights and biases decay only
    if regularize_bn; other biases only if regularize_bias (PIRL: neither)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, NORM_LAYERS):
                (decay if regularize_bn else no_decay).append(p)
            elif name == "bias":
                (decay if regularize_bias else no_decay).append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module, cfg: Optimizer, lr: float, fused: bool = False
) -> torch.optim.SGD:
    groups = param_groups(model, cfg.regularize_bn, cfg.regularize_bias, cfg.weight_decay)
    return torch.optim.SGD(
        groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused or None
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
