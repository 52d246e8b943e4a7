"""A generated image set whose class is a shape and whose nuisances are what augmentations remove.

Each image shows one of ten shapes (circle, square, triangle, star, cross, ring, semicircle, L,
arrow, T) drawn at a random position, scale and rotation, in a colour of random hue on a dark or
light grey background with pixel noise. The class is the shape; colour, position, size,
orientation and brightness are nuisances. Colour dominates a randomly initialised network's
features, so its nearest neighbours mostly share a colour, not a shape; training with crops,
a full hue shift and grayscale has to learn what stays: the shape and its pose.

Images are a pure function of (seed, split, index): with the pinned numpy and Pillow the same
call writes the same bytes on every machine, no network needed.
"""

from __future__ import annotations

import colorsys
import math
import os

import numpy as np
from PIL import Image, ImageDraw

SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "semicircle",
    "ell",
    "arrow",
    "tee",
)
SUPERSAMPLE = 4  # drawn at 4x and downsampled: smooth edges at 64 px


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Vertices of the polygonal shapes, centred at (cx, cy) with outer radius r."""
    if kind == "square":
        unit = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif kind == "triangle":
        unit = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif kind == "star":
        unit = [
            (
                (1.0 if i % 2 == 0 else 0.42) * math.cos(a),
                (1.0 if i % 2 == 0 else 0.42) * math.sin(a),
            )
            for i, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)
        ]
    elif kind == "cross":
        t = 0.33
        unit = [(t, 1), (t, t), (1, t), (1, -t), (t, -t), (t, -1), (-t, -1), (-t, -t), (-1, -t)]
        unit += [(-1, t), (-t, t), (-t, 1)]
    elif kind == "ell":
        unit = [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)]
    elif kind == "arrow":
        unit = [(-1, -0.25), (0.1, -0.25), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.25), (-1, 0.25)]
    elif kind == "tee":
        unit = [(-1, -1), (1, -1), (1, -0.45), (0.28, -0.45), (0.28, 1), (-0.28, 1)]
        unit += [(-0.28, -0.45), (-1, -0.45)]
    elif kind == "semicircle":
        unit = [(math.cos(a), math.sin(a) + 0.4) for a in np.linspace(math.pi, 2 * math.pi, 24)]
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in unit]


def render(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of shape `kind`, every nuisance drawn from `rng`.

    The background is grey (dark or light, with pixel noise), the shape a colour of random hue
    and saturation on the other side of the luminance range: hue identifies no image once colour
    jitter has shifted it, so telling images apart (the pretext task) needs the shape and its pose.
    """
    big = size * SUPERSAMPLE
    dark = rng.random() < 0.5
    grey = rng.uniform(20, 90) if dark else rng.uniform(165, 235)
    background = grey + rng.normal(0, 10, (size, size, 1)).repeat(3, axis=2)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8)).resize(
        (big, big), Image.Resampling.BILINEAR
    )
    value = rng.uniform(0.75, 1.0) if dark else rng.uniform(0.15, 0.45)
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), value)
    fill = tuple(int(255 * c) for c in rgb)
    r = rng.uniform(0.2, 0.36) * big
    cx, cy = rng.uniform(r, big - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=int(0.42 * r))
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def sample(seed: int, split: str, index: int, size: int = 64) -> tuple[Image.Image, int]:
    """(image, label) number `index` of `split`; labels cycle through the shapes."""
    label = index % len(SHAPES)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    return render(SHAPES[label], rng, size), label


def write_shapes_folder(
    root: str, train: int = 2000, val: int = 800, size: int = 64, seed: int = 0
) -> tuple[str, str]:
    """Write `<root>/{train,val}/<shape>/<n>.png`; returns (train_dir, val_dir). Idempotent."""
    dirs = []
    for split, count in (("train", train), ("val", val)):
        split_dir = os.path.join(root, split)
        for i in range(count):
            path = os.path.join(split_dir, SHAPES[i % len(SHAPES)], f"{i:05d}.png")
            if os.path.exists(path):
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image, _ = sample(seed, split, i, size)
            tmp = path + ".tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
        dirs.append(split_dir)
    return dirs[0], dirs[1]
