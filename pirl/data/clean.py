"""Turn one input file into the RGB JPEG a shard stores, or say why it cannot be used.

Why re-encode at all: the loader then decodes one format and one mode, whatever the source held.
Inputs that are already upright RGB JPEGs (most of ImageNet) are stored byte for byte, so prep
costs one decode to validate them and loses nothing; everything else (PNG, GIF, TIFF, WebP, CMYK,
grey, palette, 16-bit, alpha, EXIF-rotated, or resized) is converted to RGB and encoded as JPEG
at quality `JPEG_QUALITY`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb limit: an image with more pixels than this is skipped (Pillow's own default
# only warns at 89.5 Mpx). 2**27 = 134 Mpx, e.g. 16384 x 8192: far above any photo in ImageNet
# (the largest is under 40 Mpx) yet a bounded ~400 MB of RGB per prep worker.
MAX_PIXELS = 1 << 27
JPEG_QUALITY = 95
EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """The input cannot be used; the message is the reason written to the report."""


@dataclass(frozen=True)
class CleanParams:
    resize: int | None = None  # shorter side at most this many pixels (None: keep the size)
    max_pixels: int = MAX_PIXELS
    quality: int = JPEG_QUALITY


@dataclass(frozen=True)
class Cleaned:
    data: bytes  # RGB JPEG
    changes: tuple[str, ...]  # what was converted to make it usable ("" when none)
    passed_through: bool  # the input bytes are stored unchanged


def check_pixels(img: Image.Image, source: str) -> None:
    """Refuse, from its header alone, an image with more than MAX_PIXELS pixels (the loaders
    apply prep's decompression-bomb limit too: a small file can decode to gigabytes)."""
    if img.width * img.height > MAX_PIXELS:
        raise BadImage(
            f"{source}: {img.width}x{img.height} pixels, more than the limit of {MAX_PIXELS} "
            "(a decompression bomb?)"
        )


def clean(raw: bytes, params: CleanParams) -> Cleaned:
    """Validate by decoding fully; convert to upright RGB; maybe shrink; encode. Raises BadImage."""
    if not raw:
        raise BadImage("empty file")
    img, stored_size = _decode(raw, params)
    changes: list[str] = []
    img = _upright(img, changes)
    img = _to_rgb(img, changes)
    resized = params.resize is not None and 0 < params.resize < min(stored_size)
    if params.resize and min(img.size) > params.resize:
        scale = params.resize / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    if img.format == "JPEG" and not changes and not resized:
        return Cleaned(raw, (), True)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=params.quality)
    return Cleaned(out.getvalue(), tuple(changes), False)


def _decode(raw: bytes, params: CleanParams) -> tuple[Image.Image, tuple[int, int]]:
    """The fully decoded image (maybe at a reduced JPEG draft scale) and its stored size."""
    Image.MAX_IMAGE_PIXELS = params.max_pixels
    with warnings.catch_warnings():
        # Pillow only warns between the limit and twice the limit: make both an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw))
        except UnidentifiedImageError:
            raise BadImage("not an image (unrecognised format)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage(f"decompression bomb: {exc}") from None
        except Exception as exc:
            raise BadImage(f"corrupt header: {type(exc).__name__}: {exc}") from None
        stored_size = img.size
        if params.resize and img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still leaves >= resize px.
            scale = params.resize / max(1, min(img.size))
            if scale < 1:
                img.draft(None, (int(img.width * scale) + 1, int(img.height * scale) + 1))
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage(f"decompression bomb: {exc}") from None
        except Exception as exc:  # truncated data, bad Huffman tables, zlib errors, ...
            raise BadImage(f"corrupt or truncated: {type(exc).__name__}: {exc}") from None
    if img.width < 1 or img.height < 1:
        raise BadImage(f"empty image ({img.width}x{img.height})")
    return img, stored_size


def _upright(img: Image.Image, changes: list[str]) -> Image.Image:
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: the pixels are still fine, leave them as stored
        return img
    if orientation in (None, 1) or orientation not in range(2, 9):
        return img
    fmt = img.format
    img = ImageOps.exif_transpose(img)
    img.format = fmt
    changes.append(f"EXIF orientation {orientation} applied")
    return img


def _to_rgb(img: Image.Image, changes: list[str]) -> Image.Image:
    mode, fmt = img.mode, img.format
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grey
        img = Image.fromarray(_to_uint8(img), mode="L").convert("RGB")
        changes.append(f"{mode} (high bit depth) -> 8-bit RGB")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
        changes.append(f"{mode} -> RGB (alpha composited on white)")
    else:  # L, 1, P, CMYK, YCbCr, LAB, HSV
        img = img.convert("RGB")
        changes.append(f"{mode} -> RGB")
    img.format = fmt
    return img


def _to_uint8(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if arr.max(initial=0) <= 1.0 else arr.max()
    elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        top = 65535.0 if arr.max(initial=0) <= 65535 else arr.max()
    else:
        top = 255.0
    return np.clip(arr * (255.0 / max(top, 1e-12)), 0, 255).round().astype(np.uint8)
