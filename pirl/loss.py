"""`nce_loss_with_memory`: NCE (NPID's binary form) or InfoNCE against the memory bank.

For each model output l (PIRL: 0 = patches, 1 = image) with embedding v (normalised):
    column 0 is the positive, the bank row of the sample's own image; columns 1..K are negatives
    scores s = <m, v> / T                                             B x (K+1)
    cross_entropy: CE(s, target 0)
    nce:          x = exp(s) / Z,  P(pos) = x0 / (x0 + K/N + eps),  P(neg) = (K/N) / (xj + K/N + eps)
                  loss = -(sum log P(pos) + sum log P(neg)) / B
    total = sum_l loss_weights[l] * loss_l
Z (norm_constant < 0) is estimated once from the first scored batch as N * mean(exp(s)),
averaged over ranks, and then kept (it is saved in checkpoints). The bank is updated inside
the term that owns the update, after that term is scored, with all-gathered pairs (docs/vissl-notes.md#updating-the-memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pirl import dist
from pirl.health import HealthMeter, chance_loss
from pirl.memory import MemoryBank
from pirl.schema import NceLossWithMemory

EPS = torch.finfo(torch.float32).eps


def nce_loss(scores: torch.Tensor, z: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Binary NCE with uniform noise 1/N: scores are s/T, column 0 the positive."""
    x = torch.exp(scores) / z
    k_pn = (scores.shape[1] - 1) / num_samples
    log_pos = torch.log(x[:, 0] / (x[:, 0] + k_pn + EPS))
    log_neg = torch.log(k_pn / (x[:, 1:] + k_pn + EPS))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


class NCELossWithMemory(nn.Module):
    z: torch.Tensor  # a registered buffer: the NCE normalisation constant Z

    def __init__(
        self, cfg: NceLossWithMemory, num_train_samples: int, seed: int = 0, rank: int = 0
    ):
        super().__init__()
        mem = cfg.memory_params
        self.cfg = cfg
        self.num_samples = num_train_samples
        self.memory = MemoryBank(
            num_train_samples,
            mem.embedding_dim,
            mem.momentum,
            mem.norm_init,
            mem.dtype,
            mem.duplicate_update,
            # VISSL seeds each rank with SEED_VALUE + rank, so the banks it averages differ
            seed + rank if mem.init_sync == "average" else seed,
        )
        # Z: < 0 means "not estimated yet"; saved with the bank so a resumed run keeps it.
        self.register_buffer("z", torch.tensor(float(cfg.norm_constant)))
        # Each rank draws its own negatives (docs/vissl-notes.md#negatives-across-ranks); the
        # state is saved for exact resume.
        self.generator = torch.Generator().manual_seed(seed * 1000003 + rank)
        self.meter: HealthMeter | None = None  # set by the trainer to record health statistics

    def chance(self) -> float:
        """The total loss when every score is equal (see `pirl.health.chance_loss`)."""
        per_term = chance_loss(self.cfg.loss_type, self.cfg.negative_sampling_params.num_negatives)
        return per_term * sum(self.cfg.loss_weights)

    def sample_negatives(self, index: torch.Tensor, k: int) -> torch.Tensor:
        """B x (K+1) bank indices: column 0 the positive, then K uniform draws with replacement
        (per sample for `random`; excluding the positive itself if exclude_positive)."""
        b, n = index.shape[0], self.num_samples
        params = self.cfg.negative_sampling_params
        if params.exclude_positive:
            neg = torch.randint(0, n - 1, (b, k), generator=self.generator)
            neg += (
                neg >= index.cpu()[:, None]
            ).long()  # skip the positive: uniform over the other N-1
        else:
            neg = torch.randint(0, n, (b, k), generator=self.generator)
        return torch.cat([index.cpu()[:, None], neg], dim=1).to(index.device)

    def scores(self, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """B x (K+1) scores s/T of v against [positive, negatives]."""
        k = self.cfg.negative_sampling_params.num_negatives
        t = self.cfg.temperature
        if self.cfg.negative_sampling_params.type == "shared":
            neg = torch.randint(0, self.num_samples, (k,), generator=self.generator).to(v.device)
            pos = (self.memory.rows(index) * v).sum(dim=1, keepdim=True)
            return torch.cat([pos, v @ self.memory.rows(neg).t()], dim=1) / t
        return self.memory.scores(v, self.sample_negatives(index, k)) / t

    def forward(self, outputs: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        self.memory.begin_step()
        keep = index != cfg.ignore_index
        index = index[keep]
        total = torch.zeros((), device=index.device)
        for term, v in enumerate(outputs.values()):
            v = v[keep].float()
            if cfg.norm_embedding:
                v = F.normalize(v, dim=1)
            if self.meter is not None and self.training:
                self.meter.add(v.detach(), self.memory.rows(index))
            s = self.scores(v, index)
            if cfg.loss_type == "cross_entropy":
                term_loss = F.cross_entropy(
                    s, torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
                )
            else:
                if self.z.item() < 0:
                    self.estimate_z(s)
                term_loss = nce_loss(s, self.z, self.num_samples)
            total = total + cfg.loss_weights[term] * term_loss
            updates = (
                cfg.memory_params.update_mem_on_forward or term == cfg.update_mem_with_emb_index
            )
            if updates and self.training:
                self.memory.update(v, index)
        return total

    @torch.no_grad()
    def estimate_z(self, scores: torch.Tensor) -> None:
        z = torch.exp(scores).mean() * self.num_samples
        self.z.fill_(dist.all_reduce_mean(z.detach().clone()).item())
