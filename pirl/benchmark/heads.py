"""Linear-eval heads: VISSL's `eval_mlp` (BatchNorm2d over the pooled map, then Linear) and
`mlp` (Linear on the flattened feature), all trained together on one pass of the trunk.

Initialised as VISSL's benchmark configs build them: PyTorch's default Linear init (uniform,
kaiming a=sqrt(5)), weights and biases scaled by HEAD.PARAMS_MULTIPLIER (1.0), every head
built under the same seed SEED_VALUE (VISSL's _MODEL_INIT_SEED for single-module heads)."""

from __future__ import annotations

import torch
from torch import nn


def _linear(in_dim: int, out_dim: int, params_multiplier: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        layer.weight.mul_(params_multiplier)
        layer.bias.mul_(params_multiplier)
    return layer


class EvalMLP(nn.Module):
    """BN over the channels of an N x C x h x w feature, flatten, Linear(C*h*w -> classes)."""

    def __init__(self, in_channels: int, in_dim: int, num_classes: int, multiplier: float = 1.0):
        super().__init__()
        self.channel_bn = nn.BatchNorm2d(in_channels)
        self.clf = _linear(in_dim, num_classes, multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x[:, :, None, None]
        return self.clf(torch.flatten(self.channel_bn(x), 1))


class LinearHead(nn.Module):
    """Linear on the flattened feature (no BN)."""

    def __init__(self, in_dim: int, num_classes: int, multiplier: float = 1.0):
        super().__init__()
        self.clf = _linear(in_dim, num_classes, multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf(torch.flatten(x, 1))


class Heads(nn.Module):
    """One classifier per pooled feature; forward([f_0, ..., f_n]) -> [logits_0, ..., logits_n]."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f) for head, f in zip(self.heads, features, strict=True)]


def build_heads(
    params: list,
    shapes: list[torch.Size],
    num_classes: int,
    seed: int,
    params_multiplier: float = 1.0,
) -> tuple[Heads, list[str]]:
    """Heads for the pooled feature shapes (C, h, w) found at run time, and notes where the
    config's in_channels/dims differ from them (they follow the feature, as VISSL asks you to
    set by hand). Each built under `seed`, so every rank starts identical."""
    notes: list[str] = []
    heads: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        for i, ((kind, kwargs), shape) in enumerate(zip(params, shapes, strict=True)):
            torch.manual_seed(seed)
            channels, in_dim = shape[0], int(torch.Size(shape).numel())
            given = (kwargs.get("in_channels", channels), *kwargs["dims"])
            if kind == "eval_mlp":
                heads.append(EvalMLP(channels, in_dim, num_classes, params_multiplier))
                want = (channels, in_dim, num_classes)
            else:
                heads.append(LinearHead(in_dim, num_classes, params_multiplier))
                want = (channels, in_dim, num_classes)
            if tuple(given) != want:
                notes.append(
                    f"MODEL.HEAD.PARAMS[{i}] {kind} (in_channels, in, out) {tuple(given)} -> {want} "
                    f"(follows the pooled feature {tuple(shape)} and {num_classes} classes)"
                )
    return Heads(heads), notes
