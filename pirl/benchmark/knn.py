"""Weighted kNN classification on frozen features (NPID, Wu et al. 2018; DINO's eval_knn).

Features are L2-normalised; each test sample takes its k most cosine-similar train samples, and
each neighbour votes for its class with weight exp(similarity / T). Distributed: the train bank is
gathered from every rank, each rank classifies its own test samples, and the counts are summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pirl import dist
from pirl.benchmark.features import gather_varlen


def knn_votes(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    ks: list[int],
    temperature: float,
    num_classes: int,
    chunk: int = 256,
) -> dict[int, torch.Tensor]:
    """{k: class scores (len(queries) x num_classes)}. `bank` and `queries` are L2-normalised
    rows; k larger than the bank is clamped to the bank's size."""
    kmax = min(max(ks), bank.shape[0])
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk].to(bank.dtype)
        sims, idx = (q @ bank.T).float().topk(kmax, dim=1)  # sorted, most similar first
        labels = bank_labels[idx]
        weights = (sims / temperature).exp()
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(q.shape[0], num_classes, device=q.device)
            votes.scatter_add_(1, labels[:, :kk], weights[:, :kk])
            out[k].append(votes)
    empty = torch.zeros(0, num_classes, device=queries.device)
    return {k: torch.cat(v) if v else empty for k, v in out.items()}


def topk_correct(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[int]:
    """Number of samples whose label is among the top-k scores, for each k (clamped to classes)."""
    if scores.shape[0] == 0:
        return [0 for _ in ks]
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, : min(k, top.shape[1])].any(dim=1).sum()) for k in ks]


def knn_evaluate(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: list[int],
    temperature: float,
    num_classes: int,
) -> dict[str, dict[str, float]]:
    """{"k": {"top1": %, "top5": %}} over all ranks' test samples (each rank passes its own
    train and test shards; the train bank is gathered from all ranks)."""
    device = train_feats.device
    local = F.normalize(train_feats.float(), dim=1)
    if device.type == "cuda":
        local = local.half()  # halves the gathered bank (ImageNet, ResNet-50: 5 GB, not 10)
    bank = gather_varlen(local)
    del local
    bank_labels = gather_varlen(train_labels)
    queries = F.normalize(test_feats.float(), dim=1)
    scores = knn_votes(bank, bank_labels, queries, ks, temperature, num_classes)
    results = {}
    for k in ks:
        counts = torch.tensor(
            [*topk_correct(scores[k], test_labels), test_labels.shape[0]],
            dtype=torch.long,
            device=device,
        )
        top1, top5, n = dist.all_reduce_sum(counts).tolist()
        results[str(k)] = {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1)}
    return results
