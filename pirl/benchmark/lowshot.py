"""Low-shot linear evaluation: train the heads (and build the kNN bank) on a seeded per-class
fraction of the train split, as VISSL's 1% / 10% ImageNet benchmarks do with their subset lists.

`config.LOW_SHOT.FRACTION=0.01` keeps round(1% of each class), at least one image per class,
drawn by a per-class RNG seeded with (LOW_SHOT.SEED, class): the same images on every rank and
every run, whatever the other settings. Validation always uses the whole TEST split. The subset
needs each sample's label before any image is read, which image folders, file lists and the
synthetic source give; for a sharded dataset, make the subset a dataset of its own (`pirl prep`
from a list file of the chosen images, e.g. VISSL's imagenet_1percent.txt).
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from collections.abc import Sequence

from torch.utils.data import Dataset

from pirl.data import AugmentedSamples, IndexedTrainData, TrainSource
from pirl.data.folder import ImageSource
from pirl.errors import ConfigError


def per_class_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted sample indices: round(fraction * n_c) (at least 1) of each class c."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    chosen: list[int] = []
    for label, indices in sorted(by_class.items()):
        k = max(1, round(fraction * len(indices)))
        chosen += random.Random(f"pirl-low-shot/{seed}/{label}").sample(indices, k)
    return sorted(chosen)


def sample_labels(images) -> list[int]:
    """Every sample's label without reading an image (folder, file list, synthetic)."""
    from pirl.data.filelist import FileListImages
    from pirl.data.folder import FolderImages, SyntheticImages

    if isinstance(images, FolderImages):
        return [label for _, label in images.folder.samples]
    if isinstance(images, FileListImages):
        return [images.label(i) for i in range(len(images))]
    if isinstance(images, SyntheticImages):
        return [i % images.num_classes for i in range(len(images))]
    raise ConfigError(f"config.LOW_SHOT needs per-sample labels up front; {type(images).__name__}")


class SubsetSamples(Dataset):
    """The samples `chosen` of an AugmentedSamples, which keep their own index and augmentation."""

    def __init__(self, samples, chosen: list[int]):
        self.base, self.chosen = samples, chosen

    @property
    def images(self) -> ImageSource:
        return self.base.images

    @property
    def epoch(self) -> int:
        return self.base.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.base.epoch = value

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, j: int):
        return self.base[self.chosen[j]]


def low_shot(data: TrainSource, fraction: float, seed: int, source: str) -> TrainSource:
    """`data` (pirl.data's training contract) restricted to the low-shot subset."""
    if not isinstance(data, IndexedTrainData):
        raise ConfigError(
            f"config.LOW_SHOT.FRACTION={fraction} needs each train sample's label before "
            f"reading it, which DATA_SOURCES=[{source}] does not give: use disk_folder or "
            "disk_filelist, or make the subset a dataset of its own with `pirl prep` from a list "
            "file of the chosen images"
        )
    assert isinstance(data.samples, AugmentedSamples)  # not already a subset
    n = len(data.samples)
    every = sample_labels(data.samples.images)
    labels = [every[j] for j in data.samples.chosen]  # DATA_LIMIT's subset, in sample order
    assert len(labels) == n
    chosen = per_class_subset(labels, fraction, seed)
    return dataclasses.replace(data, samples=SubsetSamples(data.samples, chosen))
