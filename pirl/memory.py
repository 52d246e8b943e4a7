"""The memory bank: one unit vector per training image, identical on every rank.

Initialised uniform in [-s, s] with s = 1/sqrt(D/3) then row-normalised (spec §2.1), made
identical across ranks by an explicit broadcast from rank 0 (or VISSL's averaging, on request),
and updated with the all-gathered (embedding, index) pairs of every rank:
    m_y <- normalise(momentum * m_y + (1 - momentum) * v)        (momentum weights the OLD row)
A repeated index in one gathered update (the padded sampler can produce one at an epoch end) is
resolved deterministically: `last` keeps the last occurrence in rank order, `mean` averages them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pirl import dist

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MemoryBank(nn.Module):
    def __init__(
        self,
        size: int,
        dim: int,
        momentum: float = 0.5,
        norm_init: bool = True,
        dtype: str = "float32",
        duplicate_update: str = "last",
        seed: int = 0,
    ):
        super().__init__()
        self.size, self.dim, self.momentum = size, dim, momentum
        self.duplicate_update = duplicate_update
        g = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(dim / 3)
        memory = torch.rand(size, dim, generator=g).mul_(2 * stdv).add_(-stdv)
        if norm_init:
            memory = F.normalize(memory, dim=1)
        self.register_buffer("memory", memory.to(DTYPES[dtype]))

    def sync(self, mode: str = "broadcast") -> None:
        """Make every rank's replica identical: rank 0's bank, or VISSL's all-reduce average
        (whose rows are no longer unit-norm until first updated: spec §2.1)."""
        if mode == "broadcast":
            dist.broadcast_(self.memory, src=0)
        else:
            m = self.memory.float()
            dist.all_reduce_mean(m)
            self.memory.copy_(m)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Bank rows for `index` (any shape), as float32 (the bank is never differentiated)."""
        return (
            self.memory.index_select(0, index.reshape(-1)).reshape(*index.shape, self.dim).float()
        )

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, index: torch.Tensor) -> None:
        """All-gather (embeddings BxD, index B) from every rank and apply the EMA update to the bank."""
        v = dist.all_gather_cat(embeddings.detach().float())
        y = dist.all_gather_cat(index)
        uniq, inverse = torch.unique(y, return_inverse=True)
        if uniq.numel() != y.numel():
            if self.duplicate_update == "mean":
                summed = torch.zeros(uniq.numel(), v.shape[1], device=v.device).index_add_(
                    0, inverse, v
                )
                counts = torch.zeros(uniq.numel(), device=v.device).index_add_(
                    0, inverse, torch.ones_like(y, dtype=torch.float)
                )
                v = summed / counts[:, None]
            else:  # last occurrence wins
                pos = torch.arange(y.numel(), device=y.device)
                last = torch.full(
                    (uniq.numel(),), -1, dtype=torch.long, device=y.device
                ).scatter_reduce(0, inverse, pos, reduce="amax")
                v = v[last]
            y = uniq
        old = self.memory.index_select(0, y).float()
        new = F.normalize(old.mul_(self.momentum).add_(v, alpha=1 - self.momentum), dim=1)
        self.memory.index_copy_(0, y, new.to(self.memory.dtype))
