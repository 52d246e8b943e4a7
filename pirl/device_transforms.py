"""PIRL / NPID augmentations run batched on the training device (TRANSFORMS_ON_DEVICE).

The DataLoader workers then only read the encoded files: `decode` turns a batch of them into
uint8 images on the device, and a `DeviceTransform`, built from the same VISSL-style list as
`pirl.transforms.build_transform`, turns those into what `build_collator`'s collator returns
for the views (same keys, shapes and sample-major layout, float32, normalized), without the
`index` and `label` keys, which the caller adds.

Randomness: every random parameter of sample i is drawn, as small CPU tensors, from a CPU
`torch.Generator` seeded with seeds[i], so a sample's views depend only on its seed: not on
the other samples, the batch size or the device.

Work: the crop stage crops and resizes each image on its own (the images differ in size),
then cuts the jigsaw patches of the whole batch with one gather. Every later transform runs
on whole batches of views with per-view parameters; a random op is applied to the subset of
views that drew it (index_select / index_copy_).

Deviations from the PIL path (same distributions, not the same pixels):
- The random numbers come from other generators, in another order, than the PIL path's
  (python `random` and torch's global generator): a seed gives other draws from the same
  distributions. ColorJitter's random op order is the argsort of 4 uniforms (a uniform
  permutation, like torchvision's randperm).
- Crops are resized with torchvision's tensor bilinear resize with antialias, close to
  (not equal to) PIL's resize.
- Views turn float in [0, 1] right after the resize, so ColorJitter, grayscale, blur and
  flip don't round to 8 bits after each op as PIL does; `ToTensor` is a no-op marker.
- ColorJitter: contrast blends with the exact mean of the grayscale view (PIL rounds it to an
  integer); hue is shifted in float HSV (PIL shifts an 8-bit hue channel).
- Grayscale (RandomGrayscale, contrast, saturation) uses PIL's luma weights 0.299, 0.587,
  0.114 (torchvision's tensor ops use 0.2989) without PIL's rounding.
- ImgPilRandomPhotometric works on the view rounded to the nearest of 256 levels, and rounds
  again after sharpness (as the uint8 PIL ops do); autocontrast's output is not rounded.
- ImgPilGaussianBlur is an exact Gaussian with sigma = radius (separable, truncated at
  3 * radius_max, reflect padding, so the kernel never depends on the batch), where PIL
  approximates it with three box blurs and extends the edge pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from pirl.errors import ConfigError, DataError
from pirl.transforms import (
    TRANSFORMS,
    ImgPilColorDistortion,
    ImgPilGaussianBlur,
    ImgPilRandomPhotometric,
    ImgPilToPatchesAndImage,
    build_transform,
)

CONFIG_KEY = "config.DATA.TRAIN.TRANSFORMS_ON_DEVICE"
PIRL_COLLATOR = "patch_and_image_collator"
SINGLE_VIEW_COLLATORS = ("default_collate",)
SUPPORTED = (
    "ImgPilToPatchesAndImage",
    "RandomResizedCrop",
    "ColorJitter",
    "ImgPilRandomPhotometric",
    "ImgPilColorDistortion",
    "ImgPilGaussianBlur",
    "RandomGrayscale",
    "RandomHorizontalFlip",
    "ToTensor",
    "Normalize",
)
JPEG_MAGIC = (0xFF, 0xD8)


# ----------------------------------------------------------------------------------------------
# Decoding, copies to the device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`. To CUDA it goes through pinned memory without blocking: a
    copy from pageable memory would wait for the stream, i.e. for the training step queued
    before this batch, at each of the many small parameter copies."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def decode(encoded: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Encoded image files (1-D uint8 CPU tensors) -> uint8 3xHxW RGB images on `device`.
    Images already decoded (uint8 3xHxW, e.g. the synthetic source's) are only moved.

    On CUDA the JPEGs are decoded by nvJPEG in one batched call; other files, or every file
    on another device, are decoded on the CPU and moved.
    """
    device = torch.device(device)
    decoded: list[torch.Tensor | None] = [
        to_device(data, device) if data.dim() == 3 else None for data in encoded
    ]
    if device.type == "cuda":
        jpegs = [i for i, data in enumerate(encoded) if data.dim() == 1 and _is_jpeg(data)]
        if jpegs:
            for i, image in zip(jpegs, _decode_jpegs_on_gpu(encoded, jpegs, device), strict=True):
                decoded[i] = image
    for i, data in enumerate(encoded):
        if decoded[i] is None:
            decoded[i] = to_device(_decode_on_cpu(data, i), device)
    return decoded  # type: ignore[return-value]


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 2 and tuple(data[:2].tolist()) == JPEG_MAGIC


def _decode_on_cpu(data: torch.Tensor, position: int) -> torch.Tensor:
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise _undecodable(position, exc) from None


def _decode_jpegs_on_gpu(
    encoded: list[torch.Tensor], positions: list[int], device: torch.device
) -> list[torch.Tensor]:
    try:
        return decode_jpeg([encoded[i] for i in positions], device=device, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        # The batched call does not say which file failed, and nvJPEG rejects some valid
        # files (CMYK ones, for instance): decode one by one, on the CPU where the GPU fails.
        return [_decode_jpeg_on_gpu_or_cpu(encoded[i], i, device) for i in positions]


def _decode_jpeg_on_gpu_or_cpu(
    data: torch.Tensor, position: int, device: torch.device
) -> torch.Tensor:
    try:
        return decode_jpeg(data, device=device, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return to_device(_decode_on_cpu(data, position), device)


def _undecodable(position: int, exc: Exception) -> DataError:
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return DataError(f"image {position} of the batch could not be decoded: {reason}")


# ----------------------------------------------------------------------------------------------
# Random draws (all from a sample's own CPU generator)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(_uniforms(generator, low, high, 1))


def _uniforms(generator: torch.Generator, low: float, high: float, n: int) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=generator)


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def _chance(generator: torch.Generator, p: float, n: int) -> torch.Tensor:
    """n draws of 'happens with probability p', as 0/1 floats."""
    return (torch.rand(n, generator=generator) < p).float()


def sample_crop(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): torchvision's RandomResizedCrop.get_params with a
    generator (10 tries at a random area and aspect ratio, then a central crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect_ratio = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, height - h + 1), _randint(generator, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------------------------
# Crop stage: images of any size -> groups of same-size views


def _random_resized_crop(
    image: torch.Tensor, crop: T.RandomResizedCrop, generator: torch.Generator
) -> torch.Tensor:
    top, left, h, w = sample_crop(
        image.shape[-2], image.shape[-1], crop.scale, crop.ratio, generator
    )
    return tvf.resized_crop(
        image, top, left, h, w, list(crop.size), interpolation=crop.interpolation, antialias=True
    )


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


class ImageCrop:
    """RandomResizedCrop: one view per sample."""

    def __init__(self, crop: T.RandomResizedCrop):
        self.crop = crop
        self.views_per_group = (1,)

    def __call__(
        self, images: list[torch.Tensor], generators: list[torch.Generator]
    ) -> list[torch.Tensor]:
        crops = [
            _random_resized_crop(img, self.crop, g)
            for img, g in zip(images, generators, strict=True)
        ]
        return [_to_float(torch.stack(crops))]


class PatchesAndImageCrops:
    """ImgPilToPatchesAndImage: per sample an image crop and num_patches shuffled jigsaw patches,
    returned as two groups: images Bx3xHxW and patches (num_patches*B)x3xhxw, sample-major."""

    def __init__(self, source: ImgPilToPatchesAndImage):
        self.image_crop, self.jigsaw_crop = source.image_crop, source.jigsaw_crop
        self.grid, self.cell, self.jitter = source.grid, source.cell, source.jitter
        self.patch_size = source.patch_size
        self.num_patches = self.grid * self.grid
        self.views_per_group = (1, self.num_patches)

    def __call__(
        self, images: list[torch.Tensor], generators: list[torch.Generator]
    ) -> list[torch.Tensor]:
        image_views, jigsaw_crops, offsets, orders = [], [], [], []
        for image, g in zip(images, generators, strict=True):
            image_views.append(_random_resized_crop(image, self.image_crop, g))
            jigsaw_crops.append(_random_resized_crop(image, self.jigsaw_crop, g))
            offsets.append(self._offsets(g))
            orders.append(torch.randperm(self.num_patches, generator=g))
        patches = self.cut_patches(
            torch.stack(jigsaw_crops), torch.stack(offsets), torch.stack(orders)
        )
        return [_to_float(torch.stack(image_views)), _to_float(patches)]

    def _offsets(self, g: torch.Generator) -> torch.Tensor:
        """Per-cell (x, y) jitter offsets, uniform in [0, patch_jitter) as on the CPU path."""
        if not self.jitter:
            return torch.zeros((self.num_patches, 2), dtype=torch.long)
        return torch.randint(self.jitter, (self.num_patches, 2), generator=g)

    def cut_patches(
        self, jigsaw: torch.Tensor, offsets: torch.Tensor, orders: torch.Tensor
    ) -> torch.Tensor:
        """jigsaw crops BxCxSxS, per-cell (x, y) jitter offsets BxPx2 and patch orders BxP (CPU)
        -> patches (P*B)xCxhxw, sample-major: slot j of sample b is cell orders[b, j], cells
        numbered column by column (x outer, y inner)."""
        batch, channels = jigsaw.shape[:2]
        cells = torch.arange(self.num_patches)
        left = (cells // self.grid) * self.cell + offsets[..., 0]
        top = (cells % self.grid) * self.cell + offsets[..., 1]
        left, top = left.gather(1, orders), top.gather(1, orders)
        span = torch.arange(self.patch_size)
        rows = to_device(top[..., None] + span, jigsaw.device)  # B x P x h
        cols = to_device(left[..., None] + span, jigsaw.device)  # B x P x w
        sample = torch.arange(batch, device=jigsaw.device).view(batch, 1, 1, 1)
        pixels = jigsaw.permute(0, 2, 3, 1)[sample, rows[..., None], cols[:, :, None, :]]
        patches = pixels.permute(0, 1, 4, 2, 3).reshape(
            batch * self.num_patches, channels, self.patch_size, self.patch_size
        )
        return patches.contiguous()


# ----------------------------------------------------------------------------------------------
# Batched image ops on float views Nx3xHxW in [0, 1], with per-view factors (N,)


def _per_view(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _blend(views: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    f = _per_view(factors)
    return (f * views + (1 - f) * other).clamp_(0, 1)


def grayscale(views: torch.Tensor) -> torch.Tensor:
    """Nx3xHxW -> Nx1xHxW luma (PIL's weights)."""
    return 0.299 * views[:, 0:1] + 0.587 * views[:, 1:2] + 0.114 * views[:, 2:3]


def adjust_brightness(views: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return (views * _per_view(factors)).clamp_(0, 1)


def adjust_contrast(views: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    mean = grayscale(views).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(views, mean, factors)


def adjust_saturation(views: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _blend(views, grayscale(views), factors)


def adjust_hue(views: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = rgb_to_hsv(views).unbind(1)
    hue = (hue + shifts.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack((hue, saturation, value), 1))


def rgb_to_hsv(views: torch.Tensor) -> torch.Tensor:
    """torchvision's _rgb2hsv: hue in [0, 1), grey pixels get hue and saturation 0."""
    r, g, b = views.unbind(1)
    maxc = views.amax(1)
    minc = views.amin(1)
    grey = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(grey, ones, maxc)
    chroma_divisor = torch.where(grey, ones, chroma)
    rc = (maxc - r) / chroma_divisor
    gc = (maxc - g) / chroma_divisor
    bc = (maxc - b) / chroma_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    hue = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((hue, saturation, maxc), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Channel n of (5, 3, 1) is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6: the
    same values as torchvision's _hsv2rgb without its 6-way one-hot einsum."""
    hue, saturation, value = hsv.unbind(1)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + hue * 6) % 6
        channels.append(value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, 1)


def _round_to_levels(views: torch.Tensor) -> torch.Tensor:
    return torch.round(views * 255) / 255


def posterize(views: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of each 8-bit level."""
    levels = torch.round(views * 255).to(torch.uint8)
    masks = (256 - 2 ** (8 - bits)).to(torch.uint8)
    return (levels & _per_view(masks)).float() / 255


def adjust_sharpness(views: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with the [[1,1,1],[1,5,1],[1,1,1]]/13 smoothed view; the 1-pixel border is kept."""
    if views.shape[-2] <= 2 or views.shape[-1] <= 2:
        return views
    # 3x3 box sum from shifted slices (a 1-channel conv2d is ~10x slower on the CPU)
    rows = views[..., :-2, :] + views[..., 1:-1, :] + views[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    degenerate = views.clone()
    degenerate[..., 1:-1, 1:-1] = (box + 4 * views[..., 1:-1, 1:-1]) / 13
    return _blend(views, degenerate, factors)


def solarize(views: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Invert the pixels whose nearest 8-bit level is >= threshold (0..256)."""
    return torch.where(views * 255 >= _per_view(thresholds) - 0.5, 1 - views, views)


def autocontrast(views: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each view to [0, 1]; a constant channel stays as it is."""
    low = views.amin(dim=(2, 3), keepdim=True)
    high = views.amax(dim=(2, 3), keepdim=True)
    varies = high > low
    scale = 1 / torch.where(varies, high - low, torch.ones_like(high))
    return ((views - low * varies) * scale).clamp_(0, 1)


def gaussian_blur(views: torch.Tensor, sigmas: torch.Tensor, half_size: int) -> torch.Tensor:
    """Blur view i with a Gaussian of sigma sigmas[i], kernel 2*half_size+1, reflect padding:
    two depthwise convolutions (vertical, horizontal) over the whole batch."""
    n, c, h, w = views.shape
    offsets = torch.arange(-half_size, half_size + 1, dtype=views.dtype, device=views.device)
    kernels = torch.exp(-0.5 * (offsets / sigmas.clamp(min=1e-6)[:, None]) ** 2)
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0)
    size = 2 * half_size + 1
    mode = "reflect" if half_size < min(h, w) else "replicate"
    padded = nnf.pad(views.reshape(1, n * c, h, w), (half_size,) * 4, mode=mode)
    blurred = nnf.conv2d(padded, kernels.view(n * c, 1, size, 1), groups=n * c)
    blurred = nnf.conv2d(blurred, kernels.view(n * c, 1, 1, size), groups=n * c)
    return blurred.view(n, c, h, w)


def _apply_to_subset(
    views: torch.Tensor,
    chosen: torch.Tensor,
    op: Callable[..., torch.Tensor],
    *per_view: torch.Tensor,
) -> torch.Tensor:
    """views[chosen] = op(views[chosen], *(a[chosen] for a in per_view)); `chosen` is a CPU
    bool mask, `per_view` tensors are on the views' device. Writes into `views`."""
    index = chosen.nonzero().squeeze(1)
    if len(index) == 0:
        return views
    if len(index) == len(views):
        return op(views, *per_view)
    index = to_device(index, views.device)
    subset = op(views.index_select(0, index), *(a.index_select(0, index) for a in per_view))
    return views.index_copy_(0, index, subset)


# ----------------------------------------------------------------------------------------------
# Per-view transforms: draw() the parameters of one sample's views, apply() them to a group


class ViewOp(Protocol):
    def draw(self, generator: torch.Generator, num_views: int) -> torch.Tensor:
        """num_views x k float parameters (CPU)."""
        ...

    def apply(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """views Nx3xHxW and their parameters N x k (CPU) -> the transformed views."""
        ...


class RandomFlip:
    def __init__(self, p: float):
        self.p = p

    def draw(self, generator: torch.Generator, num_views: int) -> torch.Tensor:
        return _chance(generator, self.p, num_views)[:, None]

    def apply(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return _apply_to_subset(views, params[:, 0] > 0, lambda v: v.flip(-1))


class RandomGrayscale:
    def __init__(self, p: float):
        self.p = p

    def draw(self, generator: torch.Generator, num_views: int) -> torch.Tensor:
        return _chance(generator, self.p, num_views)[:, None]

    def apply(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return _apply_to_subset(views, params[:, 0] > 0, lambda v: grayscale(v).repeat(1, 3, 1, 1))


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class ColorJitter:
    """torchvision's ColorJitter per view (applied with probability p, 1 for the plain entry):
    factors uniform in its ranges, the four ops in a random order per view."""

    def __init__(self, jitter: T.ColorJitter, p: float = 1.0):
        # (low, high) per op in COLOR_OPS order, None where the op is off
        self.ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        self.p = p

    def draw(self, generator: torch.Generator, num_views: int) -> torch.Tensor:
        applied = _chance(generator, self.p, num_views)[:, None]
        order = torch.rand(num_views, 4, generator=generator).argsort(dim=1)
        low = torch.tensor([r[0] if r else 0.0 for r in self.ranges])
        high = torch.tensor([r[1] if r else 0.0 for r in self.ranges])
        factors = low + (high - low) * torch.rand(num_views, 4, generator=generator)
        return torch.cat([applied, order.float(), factors], dim=1)

    def apply(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        applied = params[:, 0] > 0
        order = params[:, 1:5].long()  # order[:, k]: the op at position k
        factors = to_device(params[:, 5:9], views.device)
        for position in range(4):
            for op_id, (op, value_range) in enumerate(zip(COLOR_OPS, self.ranges, strict=True)):
                if value_range is not None:
                    chosen = applied & (order[:, position] == op_id)
                    views = _apply_to_subset(views, chosen, op, factors[:, op_id])
        return views


class RandomPhotometric:
    """ImgPilRandomPhotometric: with probability p posterize, sharpness, solarize, autocontrast."""

    def __init__(self, p: float):
        self.p = p

    def draw(self, generator: torch.Generator, num_views: int) -> torch.Tensor:
        applied = _chance(generator, self.p, num_views)
        bits = torch.randint(4, 9, (num_views,), generator=generator).float()
        sharpness = _uniforms(generator, 0.1, 1.9, num_views)
        threshold = torch.randint(0, 257, (num_views,), generator=generator).float()
        return torch.stack([applied, bits, sharpness, threshold], 1)

    def apply(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        on_device = to_device(params, views.device)
        return _apply_to_subset(
            views, params[:, 0] > 0, photometric, on_device[:, 1], on_device[:, 2], on_device[:, 3]
        )


def photometric(
    views: torch.Tensor, bits: torch.Tensor, sharpness: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    views = posterize(views, bits)
    views = _round_to_levels(adjust_sharpness(views, sharpness))
    return autocontrast(solarize(views, thresholds))


class RandomGaussianBlur:
    """ImgPilGaussianBlur: with probability p, sigma uniform in [radius_min, radius_max]."""

    def __init__(self, p: float, radius_min: float, radius_max: float):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max
        self.half_size = max(1, math.ceil(3 * radius_max))

    def draw(self, generator: torch.Generator, num_views: int) -> torch.Tensor:
        applied = _chance(generator, self.p, num_views)
        sigma = _uniforms(generator, self.radius_min, self.radius_max, num_views)
        return torch.stack([applied, sigma], 1)

    def apply(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        sigmas = to_device(params[:, 1], views.device)
        return _apply_to_subset(
            views, params[:, 0] > 0, lambda v, s: gaussian_blur(v, s, self.half_size), sigmas
        )


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = list(mean), list(std)

    def draw(self, generator: torch.Generator, num_views: int) -> torch.Tensor:
        return torch.empty(num_views, 0)

    def apply(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        mean = to_device(torch.tensor(self.mean).view(1, -1, 1, 1), views.device)
        std = to_device(torch.tensor(self.std).view(1, -1, 1, 1), views.device)
        return (views - mean) / std


def _view_ops(transform: Callable) -> list[ViewOp]:
    """The device ops of one built (PIL-path) transform that runs on every view."""
    if isinstance(transform, T.ColorJitter):
        return [ColorJitter(transform)]
    if isinstance(transform, ImgPilRandomPhotometric):
        return [RandomPhotometric(transform.p)]
    if isinstance(transform, ImgPilColorDistortion):
        maybe_jitter, gray = transform.t.transforms
        return [ColorJitter(maybe_jitter.transforms[0], p=maybe_jitter.p), RandomGrayscale(gray.p)]
    if isinstance(transform, ImgPilGaussianBlur):
        return [RandomGaussianBlur(transform.p, transform.radius_min, transform.radius_max)]
    if isinstance(transform, T.RandomGrayscale):
        return [RandomGrayscale(transform.p)]
    if isinstance(transform, T.RandomHorizontalFlip):
        return [RandomFlip(transform.p)]
    if isinstance(transform, T.ToTensor):
        return []  # the views are float from the crop on
    if isinstance(transform, T.Normalize):
        return [Normalize(transform.mean, transform.std)]
    raise AssertionError(f"no device op for {transform!r}")  # SUPPORTED and this list disagree


# ----------------------------------------------------------------------------------------------
# The whole pipeline


class DeviceTransform:
    """Crop stage, then per-view ops; returns the collator's view tensors."""

    def __init__(
        self,
        crops: ImageCrop | PatchesAndImageCrops,
        view_ops: list[ViewOp],
        output_keys: tuple[str, ...],
    ):
        self.crops, self.view_ops, self.output_keys = crops, view_ops, output_keys

    def __call__(self, images: list[torch.Tensor], seeds: list[int]) -> dict[str, torch.Tensor]:
        """uint8 3xHxW images (any sizes, one device) and one seed per image -> float32 views."""
        if len(images) != len(seeds):
            raise ValueError(f"got {len(images)} images but {len(seeds)} seeds")
        if not images:
            raise ValueError("empty batch")
        for i, image in enumerate(images):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"image {i} must be a uint8 3xHxW tensor, got {image.dtype} {tuple(image.shape)}"
                )
            if image.device != images[0].device:
                raise ValueError(f"image {i} is on {image.device}, image 0 on {images[0].device}")
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        groups = self.crops(images, generators)
        views_per_group = self.crops.views_per_group
        for op in self.view_ops:
            params = torch.stack([op.draw(g, sum(views_per_group)) for g in generators])
            groups = [
                op.apply(views, group_params)
                for views, group_params in zip(
                    groups, _split_views(params, views_per_group), strict=True
                )
            ]
        return dict(zip(self.output_keys, groups, strict=True))


def _split_views(params: torch.Tensor, views_per_group: Sequence[int]) -> list[torch.Tensor]:
    """B x V x k parameters (V views per sample) -> one (B*v) x k block per group, sample-major."""
    batch, k = params.shape[0], params.shape[2]
    blocks = params.split(list(views_per_group), dim=1)
    return [block.reshape(batch * v, k) for block, v in zip(blocks, views_per_group, strict=True)]


def build_device_transform(
    spec: list[dict],
    collate_function: str,
    input_keys: list[str],
    where: str = "TRANSFORMS",
) -> DeviceTransform:
    """A DeviceTransform from a VISSL-style transform list; ConfigError names a bad entry."""
    _check_supported(spec, where)
    pipeline = build_transform(spec, where)  # validates every entry and its parameters
    built = ([pipeline.first] if pipeline.first is not None else []) + (
        list(pipeline.rest.transforms) if pipeline.rest is not None else []
    )
    crops = _crop_stage(built, collate_function, input_keys, where)
    if collate_function == PIRL_COLLATOR:
        output_keys: tuple[str, ...] = ("images", "patches")
    else:
        output_keys = (input_keys[0],)
    view_ops: list[ViewOp] = []
    for i, transform in enumerate(built[1:], start=1):
        if isinstance(transform, T.RandomResizedCrop):
            raise ConfigError(
                f"{where}[{i}] (RandomResizedCrop): with {CONFIG_KEY}=true the crop must be "
                f"the first transform"
            )
        view_ops.extend(_view_ops(transform))
    return DeviceTransform(crops, view_ops, output_keys)


def _check_supported(spec: list[dict], where: str) -> None:
    for i, entry in enumerate(spec):
        name = entry.get("name") if isinstance(entry, dict) else None
        # unknown names and malformed entries get build_transform's message
        if isinstance(name, str) and name in TRANSFORMS and name not in SUPPORTED:
            raise ConfigError(
                f"{where}[{i}].name={name!r} is not supported with {CONFIG_KEY}=true (supported: "
                f"{', '.join(SUPPORTED)}); set {CONFIG_KEY}=false to run it in the data loader"
            )


def _crop_stage(
    built: list[Callable], collate_function: str, input_keys: list[str], where: str
) -> ImageCrop | PatchesAndImageCrops:
    first = built[0] if built else None
    if collate_function == PIRL_COLLATOR:
        if sorted(input_keys) != ["images", "patches"]:
            raise ConfigError(
                f"INPUT_KEY_NAMES must be [patches, images] with {PIRL_COLLATOR}, got {input_keys}"
            )
        if not isinstance(first, ImgPilToPatchesAndImage):
            raise ConfigError(
                f"{where}[0] must be ImgPilToPatchesAndImage with {PIRL_COLLATOR} and {CONFIG_KEY}=true"
            )
        return PatchesAndImageCrops(first)
    if collate_function in SINGLE_VIEW_COLLATORS:
        if not input_keys:
            raise ConfigError(f"INPUT_KEY_NAMES must name the input key with {collate_function}")
        if not isinstance(first, T.RandomResizedCrop):
            jitter_first = (
                "; VISSL's NPID presets jitter the whole image before the crop (its contrast "
                "uses the whole image's mean), which runs only on the CPU path: set "
                f"{CONFIG_KEY}=false, or list RandomResizedCrop first"
                if isinstance(first, T.ColorJitter)
                else ""
            )
            raise ConfigError(
                f"{where}[0] must be RandomResizedCrop with {collate_function} and {CONFIG_KEY}=true "
                f"(the images differ in size and are batched after the crop){jitter_first}"
            )
        return ImageCrop(first)
    raise ConfigError(
        f"COLLATE_FUNCTION={collate_function!r} is not supported with {CONFIG_KEY}=true; "
        f"use one of {[PIRL_COLLATOR, *SINGLE_VIEW_COLLATORS]}"
    )
