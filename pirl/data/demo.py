"""A small real labelled image set that needs no network: scikit-learn's handwritten digits.

1,797 8x8 grey images of the digits 0-9, upscaled (bicubic) to `size` px RGB and written as an
ImageFolder tree `<root>/{train,val}/<digit>/<n>.png`, split 5:1 per class in a fixed order.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def write_digits_folder(root: str, size: int = 64, val_every: int = 6) -> tuple[str, str]:
    """Write the digits as ImageFolder trees; returns (train_dir, val_dir). Idempotent."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split_dir = val_dir if i % val_every == val_every - 1 else train_dir
        path = os.path.join(split_dir, str(label), f"{i:04d}.png")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grey = Image.fromarray((np.asarray(img) * (255.0 / 16.0)).astype(np.uint8), mode="L")
        grey.resize((size, size), Image.BICUBIC).convert("RGB").save(path)
    return train_dir, val_dir
