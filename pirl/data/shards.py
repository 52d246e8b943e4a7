"""The trainer's streaming loader over a `pirl prep` dataset (tar shards + manifest, any fsspec URL).

The `pirl.data.TrainSource` contract: each rank yields `steps_per_epoch` batches
per epoch, every sample index at least once per epoch over all ranks and at most once apart from
the wrap-around padding, in an order fixed by (seed, epoch), and `batches(epoch, k)` yields exactly
the batches k.. of `batches(epoch, 0)`. How the work is split is in pirl.data.plan: a rank reads only
the shards it needs, each DataLoader worker a disjoint part of them, and each worker yields whole
batches that the DataLoader takes from the workers in turn, so the sequence does not depend on
which worker is faster. (It does depend on the number of workers: resume with the same
NUM_DATALOADER_WORKERS for an exact replay; another count still yields the right number of
batches.) A sample's augmentation is seeded by (seed, epoch, index) as in AugmentedSamples.

A damaged sample (unreadable member, image that does not decode, missing from its shard) is
dropped from its batch with a warning; a worker that finds more than `max_bad_fraction` of its
samples damaged raises DataError, and so does a shard whose indices disagree with the manifest.
Every shard read is read to its end and checked against the manifest's size and sha256; one
that does not match counts as one more damaged sample (damage that still decodes, e.g. flipped
bytes inside a JPEG, is found only this way), with a warning naming it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pirl import storage
from pirl.data import manifest as mf
from pirl.data import plan
from pirl.data.clean import check_pixels
from pirl.data.seeding import seeded_transform
from pirl.data.shardio import ShardStream
from pirl.data.tarshard import Damaged, Record, unpack
from pirl.errors import DataError, PirlError

log = logging.getLogger("pirl")

DEFAULT_CACHE_BYTES = 64 << 30
DEFAULT_INTERLEAVE = 4
MAX_WARNINGS = 5


@dataclass(frozen=True)
class _Reader:
    """What a worker needs to turn a WorkerPlan into collated batches (picklable, no I/O state)."""

    root: str
    shards: list[mf.Shard]
    transform: Callable | None  # None: `encoded` samples
    collate: Callable
    seed: int
    max_bad_fraction: float
    cache_dir: str | None
    cache_bytes: int
    encoded: bool = False  # samples are the image bytes, decoded later on the device

    def produce(self, wp: plan.WorkerPlan, first: int, epoch: int) -> Iterator:
        batches = wp.batches[first:]
        needed = {p for b in batches for p in b}
        if not needed:
            return
        last: dict[int, int] = {}  # piece -> last offset needed from it
        for p in needed:
            k, off = wp.reads[p]
            last[k] = max(last.get(k, -1), off)
        pieces = _Pieces(self, wp.pieces, last)
        held: dict[int, Record | None] = {}
        damaged, cursor = 0, 0
        try:
            for p, (k, off) in enumerate(wp.reads):
                if off > last.get(k, -1):
                    continue  # nothing from this piece is needed any more
                rec = pieces.get(k, off)
                if pieces.mismatched:
                    damaged += len(pieces.mismatched)
                    self._check_mismatch(damaged, len(needed), pieces.mismatched.pop())
                    pieces.mismatched.clear()
                if p in needed:
                    held[p] = rec
                while cursor < len(batches) and all(q in held for q in batches[cursor]):
                    samples = []
                    for q in batches[cursor]:
                        sample = self._sample(held.pop(q), epoch)
                        if sample is None:
                            damaged += 1
                            self._check_damage(damaged, len(needed), wp, q)
                        else:
                            samples.append(sample)
                    if not samples:
                        raise DataError(
                            f"every sample of a batch is damaged (shards under {self.root})"
                        )
                    yield self.collate(samples)
                    cursor += 1
        finally:
            pieces.close()
        if damaged:
            log.warning("%d damaged sample(s) skipped in this worker's part of the epoch", damaged)

    def _sample(self, rec: Record | None, epoch: int):
        if rec is None:
            return None
        if self.encoded:
            return torch.frombuffer(bytearray(rec.image), dtype=torch.uint8), rec.index, rec.label
        try:
            with Image.open(io.BytesIO(rec.image)) as img:
                check_pixels(img, f"sample {rec.index}")
                image = img.convert("RGB")
        except Exception:
            return None
        assert self.transform is not None, "a transform is needed unless the samples are encoded"
        return (
            seeded_transform(self.transform, image, self.seed, epoch, rec.index),
            rec.index,
            rec.label,
        )

    def _check_mismatch(self, damaged: int, planned: int, shard: mf.Shard) -> None:
        if damaged > self.max_bad_fraction * planned:
            raise DataError(
                f"{storage.join(self.root, shard.name)} does not match the size and sha256 of "
                f"the manifest: {damaged} damaged sample(s) or shard(s) among the {planned} "
                f"samples this worker reads (more than the {self.max_bad_fraction:.2%} allowed); "
                "re-run `pirl prep`"
            )

    def _check_damage(self, damaged: int, planned: int, wp: plan.WorkerPlan, p: int) -> None:
        k, off = wp.reads[p]
        shard = self.shards[wp.pieces[k].shard]
        if damaged <= MAX_WARNINGS:
            log.warning("damaged sample %d in %s skipped", shard.first_index + off, shard.name)
        if damaged > self.max_bad_fraction * planned:
            raise DataError(
                f"{damaged} damaged sample(s) among the {planned} this worker reads (more than "
                f"the {self.max_bad_fraction:.2%} allowed), e.g. sample {shard.first_index + off} "
                f"in {storage.join(self.root, shard.name)}"
            )


class _Pieces:
    """The open shard streams of a worker, read forward by offset; the next one is opened early."""

    def __init__(self, reader: _Reader, pieces: list[plan.Piece], last: dict[int, int]):
        self.reader, self.pieces, self.last = reader, pieces, last
        self.open: dict[int, _PieceReader] = {}
        self.mismatched: list[mf.Shard] = []  # finished shards that did not match the manifest
        self.order = sorted(last)  # pieces in first-read order (interleave opens them in order)

    def get(self, k: int, off: int) -> Record | None:
        if k not in self.open:
            self._open(k)
            later = [j for j in self.order if j > k and j not in self.open]
            if later:
                self._open(later[0])  # prefetch: its first chunks download meanwhile
        rec = self.open[k].get(off)
        if off >= self.last[k]:  # read the shard to its end: its checksum covers what was read
            piece = self.open.pop(k)
            if not piece.finish():
                self.mismatched.append(piece.shard)
        return rec

    def _open(self, k: int) -> None:
        r = self.reader
        self.open[k] = _PieceReader(
            ShardStream(
                r.root,
                r.shards[self.pieces[k].shard],
                cache_dir=r.cache_dir,
                cache_bytes=r.cache_bytes,
            ),
            r.shards[self.pieces[k].shard],
            r.root,
        )

    def close(self) -> None:
        for s in self.open.values():
            s.close()
        self.open.clear()


class _PieceReader:
    """Samples of one shard by increasing offset; a missing or damaged one reads as None."""

    def __init__(self, stream: ShardStream, shard: mf.Shard, root: str):
        self.stream, self.shard, self.root = stream, shard, root
        self.items = unpack(stream)  # type: ignore[arg-type]  # file-like: what tarfile reads
        self.pending: tuple[int, Record | None] | None = None
        self.last_offset = -1

    def get(self, off: int) -> Record | None:
        while self.pending is None or self.pending[0] < off:
            item = next(self.items, None)
            if item is None:
                return None  # the shard ended early
            if isinstance(item, Damaged) and item.index is None:
                continue  # the gap it leaves is found from the next sample's index
            assert item.index is not None
            o = item.index - self.shard.first_index
            if not 0 <= o < self.shard.num_samples or o <= self.last_offset:
                raise DataError(
                    f"{storage.join(self.root, self.shard.name)} holds sample {item.index} where the "
                    f"manifest says it has samples {self.shard.first_index}.."
                    f"{self.shard.first_index + self.shard.num_samples - 1} in order: the manifest "
                    "and the shards disagree (re-run `pirl prep`)"
                )
            self.last_offset = o
            self.pending = (o, item if isinstance(item, Record) else None)
        o, rec = self.pending
        if o == off:
            self.pending = None
            return rec
        return None  # `off` is missing from the shard

    def finish(self) -> bool:
        self.items.close()
        return self.stream.finish()

    def close(self) -> None:
        self.items.close()
        self.stream.close()


class _EpochStream(IterableDataset):
    """One pass (a training epoch from `start_step`, or the evaluation pass) as batches."""

    def __init__(
        self,
        reader: _Reader,
        counts: list[int],
        *,
        mode: str,
        epoch: int,
        start_step: int,
        rank: int,
        world: int,
        batch_size: int,
        drop_last: bool,
        workers: int,
        interleave: int,
        buffer: int,
    ):
        super().__init__()
        self.reader, self.counts, self.mode = reader, counts, mode
        self.epoch, self.start_step = epoch, start_step
        self.rank, self.world, self.batch_size, self.drop_last = rank, world, batch_size, drop_last
        self.workers, self.interleave, self.buffer = workers, interleave, buffer

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        # DataLoader worker i plays logical worker (i + start_step) mod W, so that its round-robin,
        # which starts at worker 0, starts at batch start_step.
        worker = ((info.id if info else 0) + self.start_step) % self.workers
        if self.mode == "train":
            wp = plan.train_plan(
                self.counts,
                seed=self.reader.seed,
                epoch=self.epoch,
                rank=self.rank,
                world=self.world,
                batch_size=self.batch_size,
                drop_last=self.drop_last,
                workers=self.workers,
                worker=worker,
                interleave_width=self.interleave,
                buffer=self.buffer,
            )
        else:
            wp = plan.eval_plan(
                self.counts,
                rank=self.rank,
                world=self.world,
                batch_size=self.batch_size,
                workers=self.workers,
                worker=worker,
            )
        first = sum(1 for b in wp.batch_ids if b < self.start_step)
        return self.reader.produce(wp, first, self.epoch)


class ShardTrainData:
    """A `pirl prep` dataset split over ranks: the `pirl.data.TrainSource` contract."""

    def __init__(
        self,
        url: str,
        *,
        split: str = "train",
        transform: Callable | None,
        collate: Callable,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        batch_size: int,
        drop_last: bool = False,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        cache_dir: str | None = None,
        limit: int = -1,
        pin_memory: bool = False,
        encoded: bool = False,
        max_bad_fraction: float = 0.01,
        interleave: int = DEFAULT_INTERLEAVE,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise DataError(f"bad loader geometry: rank {rank} of {world}, batch {batch_size}")
        root, manifest = mf.load(url)
        if split not in manifest.splits:
            raise DataError(
                f"the dataset {root!r} has no {split!r} split (it has {sorted(manifest.splits)})"
            )
        s = manifest.splits[split]
        if manifest.class_ordered:
            if limit >= 0:
                raise DataError(
                    f"DATA_LIMIT={limit} on {root!r} would keep the first classes only: the "
                    "dataset was made by an older `pirl prep` that sorted samples by class; "
                    "re-run `pirl prep` (it now writes them in a seeded random order)"
                )
            log.warning(
                "%s was made by an older `pirl prep`: its samples are sorted by class, so a batch "
                "mixes few classes; re-run `pirl prep` for a random order",
                root,
            )
        n = s.num_samples if limit < 0 else min(limit, s.num_samples)
        if n == 0:
            raise DataError(f"the {split!r} split of {root!r} is empty (DATA_LIMIT={limit})")
        shards = [sh for sh in s.shards if sh.first_index < n]
        self.root, self.split, self._classes = root, split, list(s.classes)
        self.counts = [min(sh.num_samples, n - sh.first_index) for sh in shards]
        self.rank, self.world, self.batch_size, self.drop_last = rank, world, batch_size, drop_last
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.shuffle_buffer, self.interleave = shuffle_buffer, interleave
        self.reader = _Reader(
            root=root,
            shards=shards,
            transform=transform,
            collate=collate,
            seed=seed,
            max_bad_fraction=max_bad_fraction,
            cache_dir=cache_dir or None,
            cache_bytes=cache_bytes,
            encoded=encoded,
        )

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @property
    def steps_per_epoch(self) -> int:
        per_rank = plan.samples_per_rank(self.num_samples, self.world, self.batch_size)
        return plan.steps_per_epoch(per_rank, self.batch_size, self.drop_last)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """This rank's batches start_step.. of `epoch` (steps_per_epoch in all)."""
        return self._loader("train", epoch, max(0, start_step))

    def eval_batches(self) -> Iterator[dict]:
        """Every sample exactly once over all ranks, in index order per worker, no padding."""
        return self._loader("eval", 0, 0)

    def _loader(self, mode: str, epoch: int, start_step: int) -> Iterator[dict]:
        workers = max(1, self.num_workers)
        stream = _EpochStream(
            self.reader,
            self.counts,
            mode=mode,
            epoch=epoch,
            start_step=start_step,
            rank=self.rank,
            world=self.world,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            workers=workers,
            interleave=self.interleave,
            buffer=self.shuffle_buffer,
        )
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            multiprocessing_context="fork" if self.num_workers > 0 else None,
        )
        return _plain_errors(iter(loader))


def _plain_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """Re-raise a worker's DataError with its own message, not the worker's traceback dump.

    The workers are shut down here, before raising: torch's re-raised exception sits in a
    reference cycle with the DataLoader iterator, so the iterator would only be collected by a
    later garbage collection, which can finalise its queues first and then wait 5 s per worker."""
    try:
        yield from batches
    except PirlError as exc:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        msg, marker = str(exc), f"{type(exc).__name__}: "
        if "Original Traceback" in msg and marker in msg:
            raise type(exc)(msg.rsplit(marker, 1)[1].strip()) from None
        raise
