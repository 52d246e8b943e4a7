"""Which samples each rank and each DataLoader worker reads in an epoch, and in what order.

Pure arithmetic on the manifest's shard sizes, no I/O, so every process computes the same plan
and a test can check it without images. For epoch e with seed s:

1. The shards are shuffled by (s, e) and laid end to end: the epoch's *stream* of N samples.
2. The stream is padded by wrapping to world * samples_per_rank positions (ceil(N / world), one
   more when that would leave a last batch of a single sample) and cut into `world` contiguous
   runs: rank r reads only the shards overlapping its run (plus the wrapped head for the last
   ranks), and every rank gets the same number of samples.
3. A rank's run is cut into its batches (steps_per_epoch of them; the last may be short, or the
   tail is dropped with drop_last). Batch b belongs to logical worker b mod W, and each logical
   worker's batches are again one contiguous piece of the run, so workers read disjoint shards.
4. Within a worker, up to `interleave` of its shard pieces are read round-robin (prep writes
   samples in a random order, but older datasets are in class order: reading several shards at
   once still mixes their classes within a batch), and a shuffle buffer of
   `buffer` samples, seeded by (s, e, rank, worker), reorders them. The buffer is simulated on
   positions here, so the worker knows its exact output order before reading a byte: resuming
   at step k skips whole shard pieces instead of reading them.
The DataLoader takes one batch from each worker in turn, so the rank's batch sequence is
b = 0, 1, 2, ... whatever the workers' speed (see pirl.data.shards).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Piece:
    """Samples [begin, end) (offsets within the shard) of shard number `shard`."""

    shard: int
    begin: int
    end: int

    def __len__(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class WorkerPlan:
    pieces: list[Piece]  # what this worker reads, in reading order before interleaving
    reads: list[tuple[int, int]]  # the read sequence: (piece number, offset within the shard)
    batches: list[list[int]]  # each batch as positions in `reads`, in output order
    batch_ids: list[int]  # the rank-level step number of each batch


def samples_per_rank(n: int, world: int, batch_size: int) -> int:
    """ceil(n / world), plus one when that would leave a last batch of a single sample (BatchNorm
    cannot train on one sample). Every rank of every source runs the same number of steps."""
    per_rank = math.ceil(n / world)
    if per_rank > 1 and per_rank % batch_size == 1:
        per_rank += 1
    return per_rank


def rank_indices(
    n: int, rank: int, world: int, seed: int, epoch: int, batch_size: int = 0
) -> list[int]:
    """A map-style source's indices for `rank` in `epoch`: a (seed, epoch) permutation, padded by
    wrapping to `samples_per_rank` x `world`, dealt round-robin (rank r takes r, r + world, ...)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = samples_per_rank(n, world, batch_size) if batch_size else math.ceil(n / world)
    while len(order) < per_rank * world:
        order += order[: per_rank * world - len(order)]
    return order[rank::world]


def steps_per_epoch(per_rank: int, batch_size: int, drop_last: bool) -> int:
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def batch_sizes(per_rank: int, batch_size: int, drop_last: bool) -> list[int]:
    steps = steps_per_epoch(per_rank, batch_size, drop_last)
    if steps == 0:
        return []
    last = batch_size if drop_last else per_rank - (steps - 1) * batch_size
    return [batch_size] * (steps - 1) + [last]


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(f"pirl-shards/{seed}/{epoch}").shuffle(order)
    return order


def cut(stream: list[tuple[int, int]], start: int, length: int) -> list[Piece]:
    """Positions [start, start+length) of the stream of (shard, count), wrapping past its end."""
    total = sum(n for _, n in stream)
    if total == 0:
        return []
    pieces: list[Piece] = []
    pos, remaining = start % total, length
    while remaining > 0:
        acc = 0
        for shard, n in stream:  # find the shard holding `pos`
            if pos < acc + n:
                begin = pos - acc
                take = min(n - begin, remaining)
                pieces.append(Piece(shard, begin, begin + take))
                remaining -= take
                pos = (pos + take) % total
                break
            acc += n
    return pieces


def interleave(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """Round-robin over up to `width` open pieces; a finished piece is replaced by the next one.
    Returns (piece number, ordinal within the piece) in reading order."""
    out: list[tuple[int, int]] = []
    nxt = 0
    active: list[list[int]] = []  # [piece, ordinal]
    while nxt < len(lengths) or active:
        while len(active) < max(1, width) and nxt < len(lengths):
            if lengths[nxt] > 0:
                active.append([nxt, 0])
            nxt += 1
        still = []
        for item in active:
            out.append((item[0], item[1]))
            item[1] += 1
            if item[1] < lengths[item[0]]:
                still.append(item)
        active = still
    return out


def buffer_shuffle(n: int, size: int, rng: random.Random, initial: int = 100) -> list[int]:
    """The output order of a shuffle buffer of `size` over inputs 0..n-1: WebDataset's `shuffle`,
    which starts emitting once `initial` items are in, reading two per emitted item until the
    buffer is full (a short wait for the first batch), then emits a random buffered item per
    input. An item leaves at most `size` items after it entered, so a reader following this
    order holds at most `size` samples."""
    if size <= 1:
        return list(range(n))
    initial = min(initial, size)
    buf: list[int] = []
    out: list[int] = []
    i = 0
    while i < n:
        buf.append(i)
        i += 1
        if len(buf) < size and i < n:
            buf.append(i)
            i += 1
        if len(buf) >= initial:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())
    return out


def plan_worker(
    stream: list[tuple[int, int]],
    start: int,
    sizes: list[int],
    *,
    workers: int,
    worker: int,
    interleave_width: int,
    buffer: int,
    rng: random.Random | None,
) -> WorkerPlan:
    """The plan of logical worker `worker` of a rank whose run starts at stream position `start`
    and whose batches have `sizes`. rng None: no shuffle buffer (evaluation order)."""
    ids = list(range(worker, len(sizes), workers))
    offset = start + sum(
        sum(sizes[b] for b in range(w, len(sizes), workers)) for w in range(worker)
    )
    length = sum(sizes[b] for b in ids)
    pieces = cut(stream, offset, length) if length else []
    ordinals = interleave([len(p) for p in pieces], interleave_width)
    reads = [(k, pieces[k].begin + i) for k, i in ordinals]
    order = buffer_shuffle(len(reads), buffer, rng) if rng is not None else list(range(len(reads)))
    batches, at = [], 0
    for b in ids:
        batches.append(order[at : at + sizes[b]])
        at += sizes[b]
    return WorkerPlan(pieces=pieces, reads=reads, batches=batches, batch_ids=ids)


def train_plan(
    counts: list[int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    batch_size: int,
    drop_last: bool,
    workers: int,
    worker: int,
    interleave_width: int,
    buffer: int,
) -> WorkerPlan:
    """Steps 1-4 of the module docstring for one (rank, logical worker)."""
    per_rank = samples_per_rank(sum(counts), world, batch_size)
    stream = [(k, counts[k]) for k in shard_order(len(counts), seed, epoch) if counts[k] > 0]
    rng = random.Random(f"pirl-buffer/{seed}/{epoch}/{rank}/{worker}")
    return plan_worker(
        stream,
        rank * per_rank,
        batch_sizes(per_rank, batch_size, drop_last),
        workers=workers,
        worker=worker,
        interleave_width=interleave_width,
        buffer=buffer,
        rng=rng,
    )


def eval_plan(
    counts: list[int], *, rank: int, world: int, batch_size: int, workers: int, worker: int
) -> WorkerPlan:
    """Every sample once over all ranks, no padding: rank r takes the contiguous index range
    [r*N//world, (r+1)*N//world) (sizes differ by at most one), unshuffled."""
    n = sum(counts)
    begin, end = rank * n // world, (rank + 1) * n // world
    sizes = batch_sizes(end - begin, batch_size, False)
    stream = [(k, c) for k, c in enumerate(counts) if c > 0]
    return plan_worker(
        stream,
        begin,
        sizes,
        workers=workers,
        worker=worker,
        interleave_width=1,
        buffer=1,
        rng=None,
    )
