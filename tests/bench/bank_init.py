"""The memory bank's start on several ranks: broadcast (rank 0's bank) vs VISSL's average of the
ranks' own random banks. Run under torchrun (gloo, CPU), it prints one JSON line per mode (rank 0):
the mean row norm after the sync, NCE's Z estimated from the first batch and the first-step NCE loss, all on
the same random unit embeddings:

    torchrun --nproc-per-node=2 -m tests.bench.bank_init
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from pirl import dist
from pirl.loss import NCELossWithMemory
from pirl.schema import NceLossWithMemory

NUM_SAMPLES, DIM, NEGATIVES, BATCH, TEMPERATURE = 1000, 128, 512, 64, 0.07


def measure(init_sync: str, rank: int) -> dict:
    cfg = NceLossWithMemory(loss_type="nce", temperature=TEMPERATURE)
    cfg.negative_sampling_params.num_negatives = NEGATIVES
    cfg.memory_params.embedding_dim = DIM
    cfg.memory_params.init_sync = init_sync
    loss = NCELossWithMemory(cfg, NUM_SAMPLES, seed=0, rank=rank)
    loss.memory.sync(init_sync)
    row_norm = loss.memory.memory.norm(dim=1).mean().item()
    g = torch.Generator().manual_seed(100 + rank)  # the same embeddings under both modes
    v = F.normalize(torch.randn(BATCH, DIM, generator=g), dim=1)
    index = torch.randperm(NUM_SAMPLES, generator=g)[:BATCH]
    first = dist.all_reduce_mean(loss({"data": v}, index).detach().reshape(1)).item()
    return {
        "init_sync": init_sync,
        "world_size": dist.get_world_size(),
        "mean_row_norm": row_norm,
        "z": loss.z.item(),
        "first_loss": first,
    }


def main() -> None:
    env = dist.init("cpu")
    try:
        for mode in ("broadcast", "average"):
            result = measure(mode, env.rank)
            if env.is_main:
                print(json.dumps(result), flush=True)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
