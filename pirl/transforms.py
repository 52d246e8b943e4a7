"""PIRL / NPID augmentations, built from VISSL-style transform lists, and the collators.

`ImgPilToPatchesAndImage` turns one PIL image into 10 views: [image crop, 9 shuffled jigsaw
patches]. Every transform after it runs separately on each view with its own random draw, which
is what VISSL's SSLTransformsWrapper does for "transforms with copies"
(docs/vissl-notes.md#transforms-with-copies).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, ImageFilter, ImageOps
from PIL.ImageEnhance import Sharpness
from torchvision import transforms as T

from pirl.errors import ConfigError


class ImgPilToPatchesAndImage:
    """One image -> [RandomResizedCrop image, num_patches patches in a random order].

    The jigsaw view is an independent RandomResizedCrop(crop_size_patches) of the same image,
    cut into a sqrt(num_patches)^2 grid; each cell of size floor(crop/grid) yields a patch of
    size cell - patch_jitter at an offset drawn uniformly in [0, patch_jitter) per axis. Cells
    are enumerated column by column, then always shuffled (VISSL ignores permute_patches too).
    """

    def __init__(
        self,
        crop_scale_image: Sequence[float] = (0.08, 1.0),
        crop_size_image: int = 224,
        crop_scale_patches: Sequence[float] = (0.6, 1.0),
        crop_size_patches: int = 255,
        permute_patches: bool = True,
        num_patches: int = 9,
        patch_jitter: int = 21,
    ):
        grid = round(num_patches**0.5)
        if grid * grid != num_patches:
            raise ValueError(f"num_patches must be a square number, got {num_patches}")
        cell = crop_size_patches // grid
        if not 0 <= patch_jitter < cell:
            raise ValueError(
                f"patch_jitter must be in [0, {cell}) for crop_size_patches={crop_size_patches} "
                f"and {num_patches} patches (cell size {cell}), got {patch_jitter}"
            )
        self.grid, self.cell, self.jitter = grid, cell, patch_jitter
        self.patch_size = cell - patch_jitter
        self.image_crop = T.RandomResizedCrop(crop_size_image, scale=tuple(crop_scale_image))
        self.jigsaw_crop = T.RandomResizedCrop(crop_size_patches, scale=tuple(crop_scale_patches))

    def __call__(self, img: Image.Image) -> list[Image.Image]:
        image = self.image_crop(img)
        jig = self.jigsaw_crop(img)
        patches = []
        for gx in range(self.grid):  # x outer, y inner, as VISSL
            for gy in range(self.grid):
                ox = gx * self.cell + self._offset()
                oy = gy * self.cell + self._offset()
                patches.append(jig.crop((ox, oy, ox + self.patch_size, oy + self.patch_size)))
        order = torch.randperm(len(patches)).tolist()
        return [image] + [patches[i] for i in order]

    def _offset(self) -> int:
        """A jitter offset, uniform in [0, patch_jitter)."""
        return int(torch.randint(self.jitter, ()).item()) if self.jitter else 0


class ImgPilRandomPhotometric:
    """With probability p: posterize (4..8 bits), sharpness (0.1..1.9), solarize (0..256), autocontrast."""

    def __init__(self, p: float = 0.66):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        img = ImageOps.posterize(img, random.randint(4, 8))
        img = Sharpness(img).enhance(random.uniform(0.1, 1.9))
        img = ImageOps.solarize(img, random.randint(0, 256))
        return ImageOps.autocontrast(img)


class ImgPilColorDistortion:
    """SimCLR colour distortion: p 0.8 ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), then grayscale p 0.2."""

    def __init__(self, strength: float = 1.0):
        s = strength
        self.t = T.Compose(
            [
                T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        )

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.t(img)


class ImgPilGaussianBlur:
    """With probability p, a PIL GaussianBlur of radius uniform in [radius_min, radius_max]."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(
            ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max))
        )


def _list_args(**kwargs: Any) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


# name -> constructor; the transforms PIRL and NPID use (docs/vissl-notes.md#transforms-with-copies).
TRANSFORMS: dict[str, Callable[..., Callable]] = {
    "ImgPilToPatchesAndImage": ImgPilToPatchesAndImage,
    "ColorJitter": lambda **kw: T.ColorJitter(**kw),
    "ImgPilRandomPhotometric": ImgPilRandomPhotometric,
    "RandomGrayscale": lambda **kw: T.RandomGrayscale(**kw),
    "RandomHorizontalFlip": lambda **kw: T.RandomHorizontalFlip(**kw),
    "RandomResizedCrop": lambda **kw: T.RandomResizedCrop(**_list_args(**kw)),
    "Resize": lambda **kw: T.Resize(**kw),
    "CenterCrop": lambda **kw: T.CenterCrop(**kw),
    "ImgPilColorDistortion": ImgPilColorDistortion,
    "ImgPilGaussianBlur": ImgPilGaussianBlur,
    "ToTensor": lambda **kw: T.ToTensor(**kw),
    "Normalize": lambda **kw: T.Normalize(**kw),
}


class MultiViewTransform:
    """Apply `first` (which may return a list of views), then `rest` to each view independently."""

    def __init__(self, first: Callable | None, rest: list[Callable]):
        self.first, self.rest = first, T.Compose(rest) if rest else None

    def __call__(self, img: Image.Image) -> Any:
        views = self.first(img) if self.first is not None else img
        if self.rest is None:
            return views
        if isinstance(views, list):
            return [self.rest(v) for v in views]
        return self.rest(views)


def build_transform(spec: list[dict], where: str = "TRANSFORMS") -> MultiViewTransform:
    """Build from a VISSL-style list of {name: ..., **params}; errors name the bad entry."""
    built = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{where}[{i}] must be a mapping with a 'name', got {entry!r}")
        params = {k: v for k, v in entry.items() if k != "name"}
        name = entry["name"]
        if name not in TRANSFORMS:
            import difflib

            close = difflib.get_close_matches(str(name), list(TRANSFORMS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}[{i}].name={name!r} is not a known transform{hint}; known: {sorted(TRANSFORMS)}"
            )
        if name == "ImgPilToPatchesAndImage" and i != 0:
            raise ConfigError(f"{where}[{i}]: ImgPilToPatchesAndImage must be the first transform")
        try:
            built.append(TRANSFORMS[name](**params))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}[{i}] ({name}): {exc}") from None
    if built and isinstance(built[0], ImgPilToPatchesAndImage):
        return MultiViewTransform(built[0], built[1:])
    return MultiViewTransform(None, built)


def collate_patches_and_images(
    batch: list[tuple[list[torch.Tensor], int, int]],
) -> dict[str, torch.Tensor]:
    """[(views=[image, p1..p9], sample_index, label)] -> images Bx3xHxW, patches (9B)x3xhxw sample-major."""
    images = torch.stack([views[0] for views, _, _ in batch])
    patches = torch.stack([p for views, _, _ in batch for p in views[1:]])
    return {
        "images": images,
        "patches": patches,
        "index": torch.tensor([idx for _, idx, _ in batch], dtype=torch.long),
        "label": torch.tensor([lab for _, _, lab in batch], dtype=torch.long),
    }


def collate_single_view(input_key: str) -> Callable:
    def collate(batch: list[tuple[torch.Tensor, int, int]]) -> dict[str, torch.Tensor]:
        return {
            input_key: torch.stack([img for img, _, _ in batch]),
            "index": torch.tensor([idx for _, idx, _ in batch], dtype=torch.long),
            "label": torch.tensor([lab for _, _, lab in batch], dtype=torch.long),
        }

    return collate


def collate_encoded(batch: list[tuple[torch.Tensor, int, int]]) -> dict:
    """Undecoded images (a list: their sizes differ) for TRANSFORMS_ON_DEVICE, with index, label."""
    return {
        "encoded": [data for data, _, _ in batch],
        "index": torch.tensor([idx for _, idx, _ in batch], dtype=torch.long),
        "label": torch.tensor([lab for _, _, lab in batch], dtype=torch.long),
    }


def build_collator(name: str, input_keys: list[str]) -> Callable:
    if name == "patch_and_image_collator":
        return collate_patches_and_images
    return collate_single_view(input_keys[0])
