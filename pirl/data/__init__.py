"""Training data: a source of (PIL image, class label) by sample index, split over ranks.

Sources (config DATA.TRAIN.DATA_SOURCES):
- `disk_folder`: an ImageFolder tree on local disk (class sub-folders), VISSL's default;
- `disk_filelist`: VISSL's .npy lists of image paths and labels (pirl/data/filelist.py);
- `shards`: a dataset written by `pirl prep` (tar shards + manifest), on any fsspec URL;
- `synthetic`: deterministic random images, for benchmarks and smoke tests.

Every source yields each sample index 0..N-1 once per epoch across all ranks (the last ranks pad
by wrapping, so every rank runs the same number of steps) in an order fixed by (seed, epoch), and
the augmentation of a sample depends only on (seed, epoch, index): a run resumed mid-epoch sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pirl.data.clean import BadImage, check_pixels
from pirl.errors import DataError
from pirl.schema import DataSplit


class SyntheticImages(Dataset):
    """`n` random RGB images of side `size`, the same for a given index on every call."""

    def __init__(self, n: int, size: int, num_classes: int = 10):
        self.n, self.size, self.num_classes = n, size, num_classes
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        g = torch.Generator().manual_seed(i)
        arr = torch.randint(
            0, 256, (self.size, self.size, 3), generator=g, dtype=torch.uint8
        ).numpy()
        return Image.fromarray(arr), i % self.num_classes

    def encoded(self, i: int) -> tuple[torch.Tensor, int]:
        """Already decoded: the image as a uint8 CHW tensor (for TRANSFORMS_ON_DEVICE)."""
        image, label = self[i]
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(), label


class FolderImages(Dataset):
    """A local ImageFolder tree (root/<class>/<image>), in torchvision's sorted order."""

    def __init__(self, root: str):
        from torchvision.datasets import ImageFolder

        if root.startswith("file://"):
            root = root[len("file://") :]
        if "://" in root:
            raise DataError(
                f"DATA_SOURCES=[disk_folder] reads a local folder, got the URL {root!r}; "
                "make a sharded dataset with `pirl prep` and use DATA_SOURCES=[shards] for object stores"
            )
        try:
            self.folder = ImageFolder(root)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"cannot read the image folder {root!r}: {exc}") from None
        self.classes = self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def encoded(self, i: int) -> tuple[torch.Tensor, int]:
        """The file's bytes, undecoded (for TRANSFORMS_ON_DEVICE: decoded on the device)."""
        path, label = self.folder.samples[i]
        try:
            with open(path, "rb") as f:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), label
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc}") from None

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.folder.samples[i]
        try:
            with Image.open(path) as img:
                check_pixels(img, path)
                return img.convert("RGB"), label
        except (OSError, ValueError, Image.DecompressionBombError, BadImage) as exc:
            # A folder is read as is (no prep report): name the file and stop; `pirl prep`
            # skips and lists such files instead.
            raise DataError(
                f"cannot decode {path}: {exc}; fix or remove it, or use `pirl prep`"
            ) from None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def seeded_transform(transform: Callable, image, seed: int, epoch: int, index: int):
    """transform(image) with Python's and torch's CPU RNGs seeded by (seed, epoch, index) and
    restored afterwards: the views depend on the sample, never on the worker or the resume point.
    (`torch.manual_seed` would also seed every accelerator backend, ~1 ms per sample.)"""
    s = sample_seed(seed, epoch, index)
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(s)
        torch.default_generator.manual_seed(s)
        views = transform(image)
    random.setstate(py_state)
    return views


class AugmentedSamples(Dataset):
    """(transform(image), sample index, label), with the augmentation seeded by (seed, epoch, index);
    or, `encoded`, (the image undecoded, index, label) for augmentation on the training device."""

    def __init__(
        self,
        images: Dataset,
        transform: Callable | None,
        seed: int,
        limit: int = -1,
        encoded: bool = False,
        limit_seed: int = 0,
    ):
        self.images, self.transform, self.seed, self.epoch = images, transform, seed, 0
        self.chosen = limited_subset(len(images), limit, limit_seed)
        self.n = len(self.chosen)
        self.encoded = encoded

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        """Sample i (the memory-bank row) is image `chosen[i]` of the source."""
        if self.encoded:
            data, label = self.images.encoded(self.chosen[i])
            return data, i, label
        image, label = self.images[self.chosen[i]]
        return seeded_transform(self.transform, image, self.seed, self.epoch, i), i, label


def limited_subset(total: int, limit: int, seed: int) -> list[int]:
    """DATA_LIMIT: `limit` of the `total` images drawn at random (seeded by DATA_LIMIT_SAMPLING.SEED),
    in source order; all of them when limit < 0. Never the first `limit` (a class-ordered source
    would give the first classes only)."""
    if limit < 0 or limit >= total:
        return list(range(total))
    return sorted(random.Random(f"pirl-data-limit:{seed}").sample(range(total), limit))


def samples_per_rank(n: int, world: int, batch_size: int) -> int:
    """ceil(n / world), plus one when that would leave a last batch of a single sample (BatchNorm
    cannot train on one sample). Every rank runs the same number of steps."""
    per_rank = math.ceil(n / world)
    if per_rank > 1 and per_rank % batch_size == 1:
        per_rank += 1
    return per_rank


def rank_indices(
    n: int, rank: int, world: int, seed: int, epoch: int, batch_size: int = 0
) -> list[int]:
    """This rank's sample indices for `epoch`: a (seed, epoch) permutation, padded by wrapping to
    `samples_per_rank` x `world`, dealt round-robin (rank r takes r, r + world, ...)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = samples_per_rank(n, world, batch_size) if batch_size else math.ceil(n / world)
    while len(order) < per_rank * world:
        order += order[: per_rank * world - len(order)]
    return order[rank::world]


@dataclass
class TrainData:
    """A training source split over ranks; `batches(epoch, start_step)` iterates collated batches."""

    samples: AugmentedSamples
    rank: int
    world: int
    batch_size: int
    drop_last: bool
    num_workers: int
    collate: Callable
    seed: int
    pin_memory: bool = False

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.samples.images, "classes", []))

    @property
    def steps_per_epoch(self) -> int:
        per_rank = samples_per_rank(self.num_samples, self.world, self.batch_size)
        return (
            per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)
        )

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Shuffled by (seed, epoch), padded: every rank yields `steps_per_epoch` batches."""
        self.samples.epoch = epoch
        indices = rank_indices(
            self.num_samples, self.rank, self.world, self.seed, epoch, self.batch_size
        )
        indices = indices[: self.steps_per_epoch * self.batch_size][start_step * self.batch_size :]
        return self._loader(indices)

    def eval_batches(self) -> Iterator[dict]:
        """Every sample exactly once over all ranks (rank r takes r, r+world, ...), in index order,
        no padding: rank counts differ by at most one."""
        return self._loader(list(range(self.rank, self.num_samples, self.world)))

    def _loader(self, indices: list[int]) -> Iterator[dict]:
        if not indices:
            return iter(())
        loader = DataLoader(
            self.samples,
            batch_size=self.batch_size,
            sampler=indices,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=self.pin_memory,
            drop_last=False,
            persistent_workers=False,
            multiprocessing_context="fork" if self.num_workers > 0 else None,
        )
        return iter(loader)


def open_images(split: DataSplit) -> Dataset:
    """A map-style image source (disk_folder, disk_filelist or synthetic); raises DataError when
    unusable."""
    source = split.DATA_SOURCES[0]
    if source == "synthetic":
        return SyntheticImages(split.SYNTHETIC_NUM_SAMPLES, split.SYNTHETIC_IMAGE_SIZE)
    path = _data_path(split)
    if source == "disk_filelist":
        from pirl.data.filelist import FileListImages

        images = FileListImages(
            path,
            split.LABEL_PATHS[0] if split.LABEL_PATHS else "",
            mmap=split.MMAP_MODE,
            remove_prefix=split.REMOVE_IMG_PATH_PREFIX,
            new_prefix=split.NEW_IMG_PATH_PREFIX,
        )
        if len(images) == 0:
            raise DataError(f"the image list {path!r} is empty")
        return images
    images = FolderImages(path)
    if len(images) == 0:
        raise DataError(f"the image folder {path!r} has no images")
    return images


def _data_path(split: DataSplit) -> str:
    if not split.DATA_PATHS:
        raise DataError(
            f"DATA_PATHS is empty: give the dataset location, e.g. "
            "config.DATA.TRAIN.DATA_PATHS=[/data/imagenet/train] (disk_folder) or "
            f"[s3://bucket/imagenet] (shards), or a dataset catalog that maps DATASET_NAMES "
            f"{split.DATASET_NAMES} to paths (config.DATA.DATASET_CATALOG or "
            "$PIRL_DATASET_CATALOG: VISSL's dataset_catalog.json format)"
        )
    return split.DATA_PATHS[0]


def open_train_data(
    split: DataSplit,
    transform: Callable,
    collate: Callable,
    *,
    rank: int,
    world: int,
    seed: int,
    num_workers: int,
    pin_memory: bool = False,
    encoded: bool = False,
):
    """The training data for this rank: `.num_samples`, `.steps_per_epoch`, `.classes`,
    `.batches(epoch, start_step)`; the same contract for every source. `encoded`: samples are
    the undecoded images (transform unused), for decoding and augmenting on the device."""
    if split.DATA_SOURCES[0] == "shards":
        from pirl.data.shards import ShardTrainData

        return ShardTrainData(
            _data_path(split),
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
    return TrainData(
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
