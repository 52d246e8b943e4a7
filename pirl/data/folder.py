"""The map-style sources, read by sample index: `disk_folder` (an ImageFolder tree),
`disk_filelist` (pirl/data/filelist.py) and `synthetic`; `IndexedTrainData` splits any of them
over ranks with pirl.data.plan's per-rank arithmetic and yields collated batches.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pirl.data import plan
from pirl.data.clean import BadImage, check_pixels
from pirl.data.seeding import seeded_transform
from pirl.errors import DataError
from pirl.schema import DataSplit


class ImageSource(Protocol):
    """A map-style image source: (PIL image, label) by index, or the image undecoded."""

    classes: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Image.Image, int]: ...

    def encoded(self, i: int) -> tuple[torch.Tensor, int]: ...


class Samples(Protocol):
    """What IndexedTrainData loads from: (views, sample index, label) by sample index."""

    epoch: int  # set before each epoch: the augmentation is seeded by (seed, epoch, index)

    @property
    def images(self) -> ImageSource: ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple: ...


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


class AugmentedSamples(Dataset):
    """(transform(image), sample index, label), with the augmentation seeded by (seed, epoch, index);
    or, `encoded`, (the image undecoded, index, label) for augmentation on the training device."""

    def __init__(
        self,
        images: ImageSource,
        transform: Callable | None,
        seed: int,
        limit: int = -1,
        encoded: bool = False,
        limit_seed: int = 0,
    ):
        self._images, self.transform, self.seed, self.epoch = images, transform, seed, 0
        self.chosen = limited_subset(len(images), limit, limit_seed)
        self.n = len(self.chosen)
        self.encoded = encoded

    @property
    def images(self) -> ImageSource:
        return self._images

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        """Sample i (the memory-bank row) is image `chosen[i]` of the source."""
        if self.encoded:
            data, label = self.images.encoded(self.chosen[i])
            return data, i, label
        image, label = self.images[self.chosen[i]]
        assert self.transform is not None, "a transform is needed unless the samples are encoded"
        return seeded_transform(self.transform, image, self.seed, self.epoch, i), i, label


def limited_subset(total: int, limit: int, seed: int) -> list[int]:
    """DATA_LIMIT: `limit` of the `total` images drawn at random (seeded by DATA_LIMIT_SAMPLING.SEED),
    in source order; all of them when limit < 0. Never the first `limit` (a class-ordered source
    would give the first classes only)."""
    if limit < 0 or limit >= total:
        return list(range(total))
    return sorted(random.Random(f"pirl-data-limit:{seed}").sample(range(total), limit))


@dataclass
class IndexedTrainData:
    """A map-style source split over ranks: the `pirl.data.TrainSource` contract."""

    samples: Samples
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
        per_rank = plan.samples_per_rank(self.num_samples, self.world, self.batch_size)
        return plan.steps_per_epoch(per_rank, self.batch_size, self.drop_last)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Shuffled by (seed, epoch), padded: every rank yields `steps_per_epoch` batches."""
        self.samples.epoch = epoch
        indices = plan.rank_indices(
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
        loader: DataLoader = DataLoader(
            self.samples,  # type: ignore[arg-type]  # a map-style dataset (Samples)
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


def open_images(split: DataSplit) -> ImageSource:
    """A map-style image source (disk_folder, disk_filelist or synthetic); raises DataError when
    unusable."""
    source = split.DATA_SOURCES[0]
    if source == "synthetic":
        return SyntheticImages(split.SYNTHETIC_NUM_SAMPLES, split.SYNTHETIC_IMAGE_SIZE)
    path = data_path(split)
    if source == "disk_filelist":
        from pirl.data.filelist import FileListImages

        listed = FileListImages(
            path,
            split.LABEL_PATHS[0] if split.LABEL_PATHS else "",
            mmap=split.MMAP_MODE,
            remove_prefix=split.REMOVE_IMG_PATH_PREFIX,
            new_prefix=split.NEW_IMG_PATH_PREFIX,
        )
        if len(listed) == 0:
            raise DataError(f"the image list {path!r} is empty")
        return listed
    images = FolderImages(path)
    if len(images) == 0:
        raise DataError(f"the image folder {path!r} has no images")
    return images


def data_path(split: DataSplit) -> str:
    """The split's dataset location (DATA_PATHS[0]); DataError when none is given."""
    if not split.DATA_PATHS:
        raise DataError(
            "DATA_PATHS is empty: give the dataset location, e.g. "
            "config.DATA.TRAIN.DATA_PATHS=[/data/imagenet/train] (disk_folder) or "
            "[s3://bucket/imagenet] (shards), or a dataset catalog that maps DATASET_NAMES "
            f"{split.DATASET_NAMES} to paths (config.DATA.DATASET_CATALOG or "
            "$PIRL_DATASET_CATALOG: VISSL's dataset_catalog.json format)"
        )
    return split.DATA_PATHS[0]
