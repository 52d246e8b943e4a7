"""A sample's augmentation depends only on (seed, epoch, sample index): never on the rank, the
DataLoader worker or the resume point. Shared by every source and by the on-device transforms."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch


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
