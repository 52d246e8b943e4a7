"""The demo's image sets, made with no network, as ImageFolder trees `<root>/{train,val}/<class>/`.

- `shapes` (the default, pirl.data.shapes): 1,000 train / 500 val generated images of ten shapes
  under colour, position, scale, rotation and background nuisances. A random-init trunk's kNN
  gets about a third of them right; pretraining has to learn the shapes to do better.
- `digits`: scikit-learn's 1,797 8x8 grey handwritten digits 0-9, upscaled (bicubic) to `size`
  px RGB, split 5:1 per class in a fixed order. Easy for a random trunk (about 96% kNN): it
  shows that the pipeline runs, not that pretraining helps.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def write_digits_folder(root: str, size: int = 64, val_every: int = 6) -> tuple[str, str]:
    """Write the digits as ImageFolder trees; returns (train_dir, val_dir). Idempotent."""
    from pirl.extras import need

    digits = need("sklearn.datasets", "demo", "the digits demo set").load_digits()
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split_dir = val_dir if i % val_every == val_every - 1 else train_dir
        path = os.path.join(split_dir, str(label), f"{i:04d}.png")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grey = Image.fromarray((np.asarray(img) * (255.0 / 16.0)).astype(np.uint8), mode="L")
        grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(path)
    return train_dir, val_dir


DEMO_DATASETS = ("shapes", "digits")


def write_demo_folder(name: str, root: str, size: int = 64) -> tuple[str, str]:
    """Write demo set `name` (one of DEMO_DATASETS) under `root`; returns (train_dir, val_dir)."""
    if name == "shapes":
        from pirl.data.shapes import write_shapes_folder

        return write_shapes_folder(root, train=1000, val=500, size=size)
    if name == "digits":
        return write_digits_folder(root, size=size)
    raise ValueError(f"unknown demo dataset {name!r}; choose one of {DEMO_DATASETS}")
