"""Image folders for the prep and loader tests: real encoded images, with every bad-input case."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def picture(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    """A small RGB image that differs per seed (smooth, so JPEG keeps it recognisable)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, 3)
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(-100, 100, 3)
    arr = np.clip(base + grad + np.zeros((h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims width x height grey pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_clean_folder(root: Path, per_class: dict[str, int], size=(24, 20)) -> list[str]:
    """root/<class>/<n>.jpg, good RGB JPEGs only; returns the relative paths in index order."""
    rels, seed = [], 0
    for cls in sorted(per_class):
        for n in range(per_class[cls]):
            rel = f"{cls}/{n:04d}.jpg"
            write(root, rel, encode(picture(seed, size), "JPEG", quality=90))
            rels.append(rel)
            seed += 1
    return rels


def make_messy_folder(root: Path) -> dict[str, set[str]]:
    """root/{train,val}/<class>/... with good images and every bad-input case.

    Returns {"good": ..., "skipped": ..., "converted": ...} as sets of paths relative to root;
    "good" includes the converted ones (they are usable after conversion)."""
    good, skipped, converted = set(), set(), set()
    seed = 100

    def add_good(rel: str, fmt: str = "JPEG") -> None:
        nonlocal seed
        write(root, rel, encode(picture(seed), fmt))
        seed += 1
        good.add(rel)

    for cls in ("cat", "dog", "eel"):
        for n in range(5):
            add_good(f"train/{cls}/{n:02d}.jpg")
    add_good("train/dog/lossless.png", "PNG")
    add_good("train/eel/deep/nested.jpg")

    jpeg = encode(picture(1), "JPEG", quality=95)
    bad = {
        "train/cat/truncated.jpg": jpeg[: len(jpeg) // 2],
        "train/cat/corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "train/dog/notes.txt": b"this is not an image\n",
        "train/dog/empty.jpg": b"",
        "train/eel/bomb.png": png_bomb(),
        "train/README.txt": b"a file outside any class folder\n",
        "val/cat/broken.png": encode(picture(2), "PNG")[:60],
        "val/fox/unknown_class.jpg": jpeg,
    }
    for rel, data in bad.items():
        write(root, rel, data)
        skipped.add(rel)

    rgb = picture(3, (30, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    grey16 = Image.fromarray((np.arange(16 * 12).reshape(12, 16) * 300).astype(np.uint16))
    palette_t = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t.info["transparency"] = 0
    odd = {
        "train/cat/cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "train/cat/grey.png": encode(rgb.convert("L"), "PNG"),
        "train/dog/palette.png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "train/dog/palette_alpha.gif": encode(palette_t, "GIF", transparency=0),
        "train/eel/sixteen_bit.png": encode(grey16, "PNG"),
        "train/eel/alpha.png": encode(rgb.convert("RGBA"), "PNG"),
        "train/eel/rotated.jpg": encode(rgb, "JPEG", exif=exif.tobytes()),
        "val/dog/grey.jpg": encode(rgb.convert("L"), "JPEG"),
    }
    for rel, data in odd.items():
        write(root, rel, data)
        converted.add(rel)
        good.add(rel)

    for cls in ("cat", "dog"):
        for n in range(2):
            add_good(f"val/{cls}/{n:02d}.jpg")
    return {"good": good, "skipped": skipped, "converted": converted}
