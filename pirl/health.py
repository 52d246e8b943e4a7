"""Is the representation healthy? Statistics that tell learning from a falling loss.

A falling InfoNCE loss is not learning: it sits at ln(K+1) when every score is equal, which is
what a collapsed bank (all rows pointing one way) gives. Per epoch the trainer records:
- `loss_vs_chance`: the epoch's mean loss over its chance value (`chance_loss`); learning takes
  it well below 1;
- `bank_mean_cosine`: the mean cosine over all pairs of memory-bank rows (exact, from the rows'
  mean vector); near 0 is healthy, near 1 is collapse;
- `alignment` and `uniformity` (Wang & Isola, 2020) of the embeddings: alignment is
  E||v - m||^2 between an embedding and its own bank row (the positive the loss pulls it to,
  0 = identical, 4 = opposite); uniformity is log E exp(-2||v_i - v_j||^2) over the pairs of a
  batch (0 when all embeddings coincide, about -3.9 for well-spread 128-d embeddings);
- `positive_cosine`: the mean cosine between an embedding and its own bank row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pirl import dist

# Thresholds of `collapse_warning` (an epoch's mean loss, a bank's mean cosine).
NEAR_CHANCE = 0.97
COLLAPSED_BANK_COSINE = 0.8


def chance_loss(loss_type: str, num_negatives: int) -> float:
    """The loss when every score is equal. InfoNCE: ln(K+1). Binary NCE with x = 1/N for all
    (Z estimated on such scores): -log(1/(K+1)) - K log(K/(K+1))."""
    k = num_negatives
    if loss_type == "cross_entropy":
        return math.log(k + 1)
    return math.log(k + 1) - k * math.log(k / (k + 1))


@torch.no_grad()
def mean_pairwise_cosine(rows: torch.Tensor) -> float:
    """Mean cosine over all pairs i != j of the rows, exactly, in O(N D): for unit rows,
    sum_{i != j} <r_i, r_j> = |sum r|^2 - N."""
    n = rows.shape[0]
    if n < 2:
        return 0.0
    unit = F.normalize(rows.float(), dim=1)
    total = unit.sum(dim=0)
    return ((total @ total - n) / (n * (n - 1))).item()


@torch.no_grad()
def uniformity(v: torch.Tensor, t: float = 2.0) -> float:
    """log E_{i<j} exp(-t ||v_i - v_j||^2) for unit rows v."""
    return _uniformity(v, t).item()


def _uniformity(v: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """`uniformity` as a 0-d tensor on v's device (no host sync)."""
    if v.shape[0] < 2:
        return v.new_zeros((), dtype=torch.float32)
    sq = torch.pdist(v.float()).pow(2)
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())


class HealthMeter:
    """Sums over an epoch's steps (every term of every step), kept on the embeddings' device so
    a step never waits for the host; reduced over ranks on `summary`."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: torch.Tensor | None = None  # [positive cosine, uniformity, count]

    @torch.no_grad()
    def add(self, v: torch.Tensor, positives: torch.Tensor) -> None:
        """v: B x D embeddings of one loss term; positives: their B x D bank rows."""
        unit = F.normalize(v.float(), dim=1)
        positive = (unit * F.normalize(positives.float(), dim=1)).sum(1).mean()
        step = torch.stack([positive, _uniformity(unit), positive.new_ones(())])
        self.sums = step if self.sums is None else self.sums + step

    def summary(self, bank: torch.Tensor, epoch_loss: float, chance: float) -> dict:
        sums = torch.zeros(3, device=bank.device) if self.sums is None else self.sums.clone()
        dist.all_reduce_sum(sums)
        positive_sum, uniform_sum, count = sums.tolist()
        count = max(count, 1.0)
        positive, uniform = positive_sum / count, uniform_sum / count
        return {
            "loss_vs_chance": epoch_loss / chance,
            "bank_mean_cosine": mean_pairwise_cosine(bank),
            "positive_cosine": positive,
            "alignment": 2.0 - 2.0 * positive,
            "uniformity": uniform,
        }


def collapse_warning(health: dict, epoch: int) -> str | None:
    """A one-line diagnosis when an epoch looks collapsed, naming what to try; None if healthy.
    The first two epochs are exempt (a new bank is still random)."""
    if epoch < 2:
        return None
    signs = []
    if health["loss_vs_chance"] > NEAR_CHANCE:
        signs.append(f"the loss is {health['loss_vs_chance']:.2f}x its chance value")
    if health["bank_mean_cosine"] > COLLAPSED_BANK_COSINE:
        signs.append(f"the memory bank's mean cosine is {health['bank_mean_cosine']:.2f}")
    if not signs:
        return None
    return (
        "the representation looks collapsed: "
        + " and ".join(signs)
        + " (healthy: well below 1x, near 0). Try a head that centres its embeddings "
        "(an mlp with use_bn and skip_last_layer_relu_bn: false), augmentations that keep what "
        "identifies an image's class, or more epochs"
    )
