"""Frozen-trunk features: the trunk's stages, pooled per head as LINEAR_EVAL_FEAT_POOL_OPS_MAP says.

The trunk is never trained and never wrapped in DDP: `freeze` puts it in eval mode (BN uses its
running statistics) with every parameter's requires_grad off, and features are computed under
no_grad. `frozen_violations` and `state_digest` are the protocol's sanity checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn

from pirl import dist, precision
from pirl.models import ResNetTrunk

M = TypeVar("M", bound=nn.Module)

INPUT_KEY = "data"


def freeze(trunk: M) -> M:
    trunk.eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk


def frozen_violations(trunk: nn.Module) -> list[str]:
    """What breaks the frozen-trunk protocol: modules in train mode, trainable parameters."""
    bad = [
        f"module {n or '<trunk>'} is in train mode" for n, m in trunk.named_modules() if m.training
    ]
    bad += [f"parameter {n} requires grad" for n, p in trunk.named_parameters() if p.requires_grad]
    return bad


def pool_op(op: str, args: list) -> nn.Module:
    if op == "AvgPool2d":
        kernel = tuple(args[0]) if isinstance(args[0], list) else args[0]
        return nn.AvgPool2d(kernel, *args[1:])
    if op == "AdaptiveAvgPool2d":
        size = tuple(args[0]) if isinstance(args[0], list) else args[0]
        return nn.AdaptiveAvgPool2d(size)
    return nn.Identity()


class FeatureExtractor(nn.Module):
    """trunk(x) -> [pooled feature map per head (N x C x h x w)], plus the flattened kNN feature."""

    def __init__(self, trunk: ResNetTrunk, ops_map: list, knn_feature: str | None = None):
        super().__init__()
        self.trunk = freeze(trunk)
        self.features = [feature for feature, _ in ops_map]
        self.pools = nn.ModuleList(pool_op(op, args) for _, (op, args) in ops_map)
        self.knn_feature = knn_feature

    def train(self, mode: bool = True) -> FeatureExtractor:  # the trunk stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        maps = self.trunk.stages(x)
        maps["res5avg"] = self.trunk.avgpool(maps["res5"])
        pooled = [pool(maps[f]).float() for f, pool in zip(self.features, self.pools, strict=True)]
        knn = maps[self.knn_feature].flatten(1).float() if self.knn_feature else None
        return pooled, knn


def run_batches(
    extractor: FeatureExtractor,
    batches: Iterable[dict],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]]:
    """(pooled per head, kNN feature, labels) for each batch, on `device`; the trunk under
    autocast in `amp_dtype` (pirl.precision) unless None, the features float32."""
    for batch in batches:
        x = batch[INPUT_KEY].to(device, non_blocking=True)
        with precision.autocast(device, amp_dtype):
            pooled, knn = extractor(x)
        yield pooled, knn, batch["label"].to(device, non_blocking=True)


def extract(
    extractor: FeatureExtractor,
    batches: Iterable[dict],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    keep_pooled: bool = True,
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None, torch.Tensor]:
    """Concatenate a whole pass: (pooled per head or None, kNN features or None, labels)."""
    pooled_parts: list[list[torch.Tensor]] = []
    knn_parts: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for pooled, knn, y in run_batches(extractor, batches, device, amp_dtype):
        if keep_pooled:
            pooled_parts.append(pooled)
        if knn is not None:
            knn_parts.append(knn)
        labels.append(y)
    n_heads = len(extractor.features)
    if not labels:  # a rank with no samples (more ranks than samples)
        empty = torch.empty(0, dtype=torch.long, device=device)
        return ([None] * n_heads if keep_pooled else None), None, empty  # type: ignore[list-item]
    pooled_all = (
        [torch.cat([p[i] for p in pooled_parts]) for i in range(n_heads)] if keep_pooled else None
    )
    knn_all = torch.cat(knn_parts) if knn_parts else None
    return pooled_all, knn_all, torch.cat(labels)


def gather_varlen(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 when the ranks hold different counts."""
    if dist.get_world_size() == 1:
        return tensor
    n = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts = dist.all_gather_cat(n).tolist()
    longest = max(counts)
    pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
    gathered = dist.all_gather_cat(torch.cat([tensor, pad]))
    return torch.cat([gathered[r * longest : r * longest + c] for r, c in enumerate(counts)])
