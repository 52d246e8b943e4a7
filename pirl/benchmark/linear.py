"""Linear evaluation: train every head together on frozen features, one pass per epoch.

The loss is the sum of the heads' cross-entropies (VISSL's multiple-output loss); SGD with the
configured momentum/nesterov/weight decay and the derived (auto-scaled) LR schedule. Before each
epoch the protocol is checked (moco's main_lincls sanity checks): the trunk is in eval mode with
no trainable parameter, and the optimizer holds exactly the heads' parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pirl import config as base
from pirl import dist
from pirl.benchmark.features import frozen_violations
from pirl.optim import build_optimizer, set_lr
from pirl.schema import Optimizer

log = logging.getLogger("pirl")

Batches = Iterable[tuple[list[torch.Tensor], torch.Tensor]]


class ProtocolError(RuntimeError):
    """The frozen-trunk protocol was broken (a bug, not a user error)."""


def check_protocol(trunk: nn.Module, heads: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    bad = frozen_violations(trunk)
    trunk_ids = {id(p) for p in trunk.parameters()}
    head_ids = {id(p) for p in heads.parameters()}
    opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if opt_ids & trunk_ids:
        bad.append(f"the optimizer holds {len(opt_ids & trunk_ids)} trunk parameter(s)")
    if opt_ids != head_ids:
        bad.append("the optimizer's parameters are not exactly the heads' parameters")
    if bad:
        raise ProtocolError("linear-eval protocol broken: " + "; ".join(bad[:5]))


class CachedTrainFeatures:
    """Train features computed once, re-batched each epoch: this rank's samples in a (seed, epoch,
    rank) order, padded by wrapping to ceil(N / world) so every rank runs the same steps."""

    def __init__(
        self,
        pooled: list[torch.Tensor],
        labels: torch.Tensor,
        batch_size: int,
        per_rank: int,
        seed: int,
        rank: int,
        drop_last: bool = False,
    ):
        self.pooled, self.labels = pooled, labels
        self.batch_size, self.per_rank, self.seed, self.rank = batch_size, per_rank, seed, rank
        self.drop_last = drop_last

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def batches(self, epoch: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        n = self.labels.shape[0]
        if n == 0:
            return
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + self.rank)
        order = torch.randperm(n, generator=g)
        order = order.repeat(math.ceil(self.per_rank / n))[: self.per_rank].to(self.labels.device)
        for step in range(self.steps_per_epoch):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield [p[idx] for p in self.pooled], self.labels[idx]


def train_heads(
    heads: nn.Module,
    trunk: nn.Module,
    batches: Callable[[int], Batches],
    steps_per_epoch: int,
    optimizer_cfg: Optimizer,
    lr_schedule: dict,
    names: list[str],
    log_every: int = 100,
    ddp_heads: nn.Module | None = None,
    test: Callable[[int], dict] | None = None,
    test_every: int = 1,
) -> list[dict]:
    """Train `heads` (wrapped as `ddp_heads` when distributed) for optimizer_cfg.num_epochs;
    `batches(epoch)` yields (pooled features per head, labels). After every `test_every`-th
    epoch and after the last, `test(epoch)` scores the heads ({head: {top1, top5}}). Returns
    per-epoch records {epoch, lr, loss: {head: mean loss}, test (tested epochs)}."""
    model = ddp_heads if ddp_heads is not None else heads
    num_epochs = optimizer_cfg.num_epochs
    optimizer = build_optimizer(heads, optimizer_cfg, lr=base.lr_at(lr_schedule, 0, num_epochs))
    history = []
    device = next(heads.parameters()).device
    for epoch in range(num_epochs):
        heads.train()
        check_protocol(trunk, heads, optimizer)
        sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        seen = 0
        lr = base.lr_at(lr_schedule, epoch, num_epochs)
        for step, (pooled, labels) in enumerate(batches(epoch)):
            lr = base.lr_at(lr_schedule, epoch + step / max(steps_per_epoch, 1), num_epochs)
            set_lr(optimizer, lr)
            if labels.shape[0] < 2:  # BN needs two samples; every rank has the same batch sizes
                continue
            losses = [F.cross_entropy(logits, labels) for logits in model(pooled)]
            loss = torch.stack(losses).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack(losses).detach().double()
            seen += 1
            if (step + 1) % log_every == 0:
                log.info(
                    "linear epoch %d step %d/%d loss %.4f lr %.6f",
                    epoch,
                    step + 1,
                    steps_per_epoch,
                    loss.item(),
                    lr,
                )
        mean = dist.all_reduce_mean(sums / max(seen, 1)).tolist()
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "loss": dict(zip(names, mean, strict=True)),
        }
        if test is not None and ((epoch + 1) % test_every == 0 or epoch + 1 == num_epochs):
            record["test"] = test(epoch)
        history.append(record)
        log.info(
            "linear epoch %d/%d lr %.6f loss %s%s",
            epoch + 1,
            num_epochs,
            lr,
            " ".join(f"{n}={v:.3f}" for n, v in record["loss"].items()),
            "".join(f" | {n} top-1 {v['top1']:.2f}" for n, v in record.get("test", {}).items()),
        )
    check_protocol(trunk, heads, optimizer)
    return history
