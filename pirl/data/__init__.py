"""Training data: a source of (image, class label) by sample index, split over ranks.

Sources (config DATA.TRAIN.DATA_SOURCES), each opened by `open_train_data` as a `TrainSource`:
- `disk_folder`: an ImageFolder tree on local disk (class sub-folders), VISSL's default;
- `disk_filelist`: VISSL's .npy lists of image paths and labels (pirl/data/filelist.py);
- `shards`: a dataset written by `pirl prep` (tar shards + manifest), on any fsspec URL;
- `synthetic`: deterministic random images, for benchmarks and smoke tests.

Every source yields each sample index 0..N-1 once per epoch across all ranks (the last ranks pad
by wrapping, so every rank runs the same number of steps, and a rank's last batch never holds a
single sample: pirl.data.plan.samples_per_rank) in an order fixed by (seed, epoch), and the
augmentation of a sample depends only on (seed, epoch, index) (pirl.data.seeding): a run resumed
mid-epoch sees exactly the batches an uninterrupted run would.

The modules, by side:
- read side: folder.py (folder, file list, synthetic: read by index), filelist.py, shards.py
  (streaming over `pirl prep` shards) with shardio.py (shard download and local cache), plan.py
  (which samples each rank and worker reads), seeding.py;
- write side, used by `pirl prep` and the demo: sources.py (listing prep's inputs), demo.py and
  shapes.py (the demo datasets);
- the format both sides share: manifest.py (manifest.json), tarshard.py (pack/unpack a shard),
  clean.py (image checks: `clean` normalises at prep time, `check_pixels` guards every read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from pirl.data.folder import (
    AugmentedSamples,
    FolderImages,
    IndexedTrainData,
    SyntheticImages,
    data_path,
    limited_subset,
    open_images,
)
from pirl.data.plan import rank_indices, samples_per_rank
from pirl.data.seeding import sample_seed, seeded_transform
from pirl.schema import DataSplit

__all__ = [
    "AugmentedSamples",
    "FolderImages",
    "IndexedTrainData",
    "SyntheticImages",
    "TrainSource",
    "limited_subset",
    "open_images",
    "open_train_data",
    "rank_indices",
    "sample_seed",
    "samples_per_rank",
    "seeded_transform",
]


class TrainSource(Protocol):
    """What the trainer and the benchmark read from every source, for one rank."""

    @property
    def num_samples(self) -> int:
        """N: the sample indices are 0..N-1 (the memory bank has one row per sample)."""
        ...

    @property
    def classes(self) -> list[str]:
        """Class names, by label ([] when the source has none)."""
        ...

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, the same on every rank."""
        ...

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """This rank's batches start_step.. of `epoch`, shuffled by (seed, epoch), padded: each a
        collated dict with "index" (sample indices) and "label" beside the views."""
        ...

    def eval_batches(self) -> Iterator[dict]:
        """Every sample exactly once over all ranks, no padding (rank counts differ by <= 1)."""
        ...


def open_train_data(
    split: DataSplit,
    transform: Callable | None,
    collate: Callable,
    *,
    rank: int,
    world: int,
    seed: int,
    num_workers: int,
    pin_memory: bool = False,
    encoded: bool = False,
) -> TrainSource:
    """This rank's training data, the same `TrainSource` contract for every source. `encoded`:
    samples are the undecoded images (transform unused), for decoding and augmenting on the
    device."""
    if split.DATA_SOURCES[0] == "shards":
        from pirl.data.shards import ShardTrainData

        return ShardTrainData(
            data_path(split),
            split=split.SPLIT,
            transform=transform,
            collate=collate,
            rank=rank,
            world=world,
            seed=seed,
            batch_size=split.BATCHSIZE_PER_REPLICA,
            drop_last=split.DROP_LAST,
            num_workers=num_workers,
            shuffle_buffer=split.SHUFFLE_BUFFER,
            cache_dir=split.CACHE_DIR or None,
            limit=split.DATA_LIMIT,
            pin_memory=pin_memory,
            encoded=encoded,
        )
    samples = AugmentedSamples(
        open_images(split),
        transform,
        seed,
        split.DATA_LIMIT,
        encoded,
        limit_seed=split.DATA_LIMIT_SAMPLING.SEED,
    )
    return IndexedTrainData(
        samples,
        rank,
        world,
        split.BATCHSIZE_PER_REPLICA,
        split.DROP_LAST,
        num_workers,
        collate,
        seed,
        pin_memory,
    )
