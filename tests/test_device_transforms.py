"""Augmentations on the device (TRANSFORMS_ON_DEVICE), run here on the CPU: the collator's
layout, per-sample determinism, the jigsaw geometry, the random rates, each op against
torchvision's own, config errors and decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as T

from pirl import config
from pirl.device_transforms import (
    ColorJitter,
    PatchesAndImageCrops,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    adjust_sharpness,
    autocontrast,
    build_device_transform,
    decode,
    gaussian_blur,
    posterize,
    sample_crop,
    solarize,
)
from pirl.errors import ConfigError, DataError
from pirl.transforms import ImgPilToPatchesAndImage, build_collator, build_transform

PRESETS = {
    "pirl_demo": ["config=pretrain/pirl/pirl_demo_resnet18"],
    "pirl_r50": ["config=pretrain/pirl/pirl_jigsaw_4node_resnet50"],
    "pirl_r50_photo_gblur": [
        "config=pretrain/pirl/pirl_jigsaw_4node_resnet50",
        "+config/pretrain/pirl/transforms=photo_gblur",
    ],
    # VISSL's NPID order (ColorJitter before the crop) is CPU-only; the device path runs the
    # crop first.
    "npid": [
        "config=pretrain/npid/npid_8gpu_resnet",
        "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 224}, {name: ColorJitter,"
        " brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.4}, {name: RandomHorizontalFlip},"
        " {name: ToTensor}, {name: Normalize, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}]",
    ],
}


def whole_image_pirl_spec(crop_size_image: int, *per_view: dict) -> list[dict]:
    """PIRL views of the whole image (crop scale 1), then `per_view` transforms, then ToTensor."""
    return [
        {
            "name": "ImgPilToPatchesAndImage",
            "crop_scale_image": [1.0, 1.0],
            "crop_size_image": crop_size_image,
            "crop_scale_patches": [1.0, 1.0],
            "crop_size_patches": 255,
            "patch_jitter": 21,
        },
        *per_view,
        {"name": "ToTensor"},
    ]


NO_PHOTOMETRIC_PIRL = whole_image_pirl_spec(255)
PIRL_KEYS = ["patches", "images"]


def smooth_image(seed: int, height: int, width: int) -> torch.Tensor:
    """uint8 3xHxW with smooth gradients and some noise (so every op has work to do)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(1, height, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, width)
    base = torch.rand(3, 1, 1, generator=g) * 120 + 40
    slope = torch.rand(3, 2, generator=g) * 160 - 80
    noise = torch.rand(3, height, width, generator=g) * 20
    img = base + slope[:, :1, None] * ys + slope[:, 1:, None] * xs + noise
    return img.clamp(0, 255).to(torch.uint8)


def coordinate_image(size: int = 255) -> torch.Tensor:
    """Pixel (x, y) holds (x, y, 0)."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)]).to(torch.uint8)


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def presets() -> dict:
    loaded = {}
    for name, overrides in PRESETS.items():
        train = config.load(overrides)[0].DATA.TRAIN
        loaded[name] = (train.TRANSFORMS, train.COLLATE_FUNCTION, train.INPUT_KEY_NAMES)
    return loaded


def device_transform(presets: dict, name: str):
    return build_device_transform(*presets[name])


# ----------------------------------------------------------------------------------------------
# The collator's layout


@pytest.mark.parametrize("preset", list(PRESETS))
def test_output_matches_the_cpu_collator(presets, preset):
    spec, collate_function, input_keys = presets[preset]
    images = [smooth_image(0, 90, 120), smooth_image(1, 140, 100)]
    if preset != "pirl_demo":
        images = [smooth_image(0, 260, 300), smooth_image(1, 300, 260)]
    cpu_transform = build_transform(spec)
    collate = build_collator(collate_function, input_keys)
    expected = collate([(cpu_transform(to_pil(img)), i, 0) for i, img in enumerate(images)])
    del expected["index"], expected["label"]

    out = build_device_transform(spec, collate_function, input_keys)(images, [3, 4])

    assert list(out) == list(expected)
    for key in expected:
        assert out[key].shape == expected[key].shape, key
        assert out[key].dtype == expected[key].dtype == torch.float32, key
        assert out[key].is_contiguous(), key
        assert torch.isfinite(out[key]).all(), key


def test_views_are_sample_major():
    """images[b] and patches[9b:9b+9] come from sample b, as collate_patches_and_images."""
    colors = [(10, 20, 30), (200, 100, 50), (0, 255, 128)]
    images = [torch.tensor(c, dtype=torch.uint8).view(3, 1, 1).expand(3, 300, 280) for c in colors]
    t = build_device_transform(NO_PHOTOMETRIC_PIRL, "patch_and_image_collator", PIRL_KEYS)
    out = t([img.contiguous() for img in images], [0, 1, 2])
    assert out["images"].shape == (3, 3, 255, 255) and out["patches"].shape == (27, 3, 64, 64)
    for b, color in enumerate(colors):
        expected = torch.tensor(color).view(3, 1, 1) / 255
        assert torch.allclose(out["images"][b], expected.expand(3, 255, 255), atol=1e-6)
        for patch in out["patches"][9 * b : 9 * b + 9]:
            assert torch.allclose(patch, expected.expand(3, 64, 64), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("preset", ["pirl_r50", "pirl_r50_photo_gblur", "npid"])
def test_a_sample_depends_only_on_its_seed(presets, preset):
    t = device_transform(presets, preset)
    a, b = smooth_image(0, 260, 300), smooth_image(1, 240, 320)
    pair = t([a, b], [11, 12])
    again = t([a, b], [11, 12])
    alone = t([b], [12])
    other_seed = t([b], [13])
    for key in pair:
        assert torch.equal(pair[key], again[key]), key
        views_of_b = pair[key][len(pair[key]) // 2 :]
        assert torch.allclose(views_of_b, alone[key], atol=1e-5), key
        assert not torch.allclose(alone[key], other_seed[key], atol=1e-2), key


# ----------------------------------------------------------------------------------------------
# Jigsaw geometry


def test_cut_patches_takes_jittered_windows_of_the_cells_in_the_drawn_order():
    crops = PatchesAndImageCrops(ImgPilToPatchesAndImage())  # 255-px jigsaw, 85-px cells, jitter 21
    batch = 3
    ys, xs = torch.meshgrid(torch.arange(255.0), torch.arange(255.0), indexing="ij")
    jigsaw = torch.stack(
        [torch.stack([xs, ys, torch.full_like(xs, float(b))]) for b in range(batch)]
    )
    g = torch.Generator().manual_seed(0)
    offsets = torch.randint(21, (batch, 9, 2), generator=g)  # [0, patch_jitter)
    orders = torch.stack([torch.randperm(9, generator=g) for _ in range(batch)])

    patches = crops.cut_patches(jigsaw, offsets, orders)

    assert patches.shape == (batch * 9, 3, 64, 64)
    span = torch.arange(64.0)
    for b in range(batch):
        for slot in range(9):
            patch = patches[9 * b + slot]
            cell = int(orders[b, slot])
            gx, gy = divmod(cell, 3)  # cells column by column: x outer, y inner
            left = gx * 85 + int(offsets[b, cell, 0])
            top = gy * 85 + int(offsets[b, cell, 1])
            assert torch.equal(patch[0], (left + span).expand(64, 64))
            assert torch.equal(patch[1], (top + span)[:, None].expand(64, 64))
            assert torch.equal(patch[2], torch.full((64, 64), float(b)))


def test_patch_offsets_are_drawn_in_zero_to_jitter_exclusive():
    """As on the CPU path (VISSL): offsets in [0, patch_jitter), here both 0 and 1, never 2."""
    source = ImgPilToPatchesAndImage(crop_size_image=8, crop_size_patches=30, patch_jitter=2)
    crops = PatchesAndImageCrops(source)
    drawn = []
    cut = crops.cut_patches
    crops.cut_patches = lambda jigsaw, offsets, orders: cut(
        jigsaw, drawn.append(offsets) or offsets, orders
    )
    images = [torch.zeros(3, 30, 30, dtype=torch.uint8) for _ in range(20)]
    crops(images, [torch.Generator().manual_seed(i) for i in range(20)])
    assert set(torch.cat(drawn).unique().tolist()) == {0, 1}


def test_patches_are_contiguous_windows_from_every_cell():
    """End to end: the jigsaw crop of a 255-px image is the whole image (scale 1)."""
    t = build_device_transform(NO_PHOTOMETRIC_PIRL, "patch_and_image_collator", PIRL_KEYS)
    image = coordinate_image()
    out = t([image] * 4, [0, 1, 2, 3])
    assert torch.equal(out["images"], (image.float() / 255).expand(4, 3, 255, 255))
    span = torch.arange(64)
    orders = set()
    for b in range(4):
        cells = []
        for patch in out["patches"][9 * b : 9 * b + 9]:
            levels = torch.round(patch * 255).long()
            left, top = int(levels[0, 0, 0]), int(levels[1, 0, 0])
            assert torch.equal(levels[0], (left + span).expand(64, 64))
            assert torch.equal(levels[1], (top + span)[:, None].expand(64, 64))
            assert left % 85 <= 21 and top % 85 <= 21
            cells.append((left // 85, top // 85))
        assert sorted(cells) == [(gx, gy) for gx in range(3) for gy in range(3)]
        orders.add(tuple(cells))
    assert len(orders) > 1


# ----------------------------------------------------------------------------------------------
# Rates of the random ops (400 views: 40 samples x 10; bounds are ~5 standard deviations)


def run_per_view_spec(extra: list[dict], image: torch.Tensor) -> torch.Tensor:
    spec = whole_image_pirl_spec(64, *extra)
    t = build_device_transform(spec, "patch_and_image_collator", PIRL_KEYS)
    out = t([image] * 40, list(range(100, 140)))
    return torch.cat([out["images"], out["patches"]])


def test_flip_rate():
    views = run_per_view_spec([{"name": "RandomHorizontalFlip"}], coordinate_image())
    flipped = (views[:, 0, 0, 0] > views[:, 0, 0, -1]).float().mean()
    assert 0.38 < flipped < 0.62


def test_grayscale_rate():
    views = run_per_view_spec([{"name": "RandomGrayscale", "p": 0.2}], coordinate_image())
    gray = ((views[:, 0] == views[:, 1]) & (views[:, 1] == views[:, 2])).all(-1).all(-1)
    assert 0.12 < gray.float().mean() < 0.28


def test_photometric_rate():
    # channels span levels 40..200 at most: autocontrast (the last step) always reaches 1
    image = (coordinate_image().float() * 160 / 255 + 40).to(torch.uint8)
    views = run_per_view_spec([{"name": "ImgPilRandomPhotometric", "p": 0.66}], image)
    changed = views.amax(dim=(1, 2, 3)) > 0.95
    assert 0.55 < changed.float().mean() < 0.77


def test_blur_rate_and_color_distortion_run():
    image = torch.randint(0, 256, (3, 255, 255), generator=torch.Generator().manual_seed(0))
    image = image.to(torch.uint8)
    blur = {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 1.0, "radius_max": 2.0}
    blurred = run_per_view_spec([blur], image)
    sharp = torch.round(blurred * 255) == torch.round(run_per_view_spec([], image) * 255)
    assert 0.38 < (~sharp.all(-1).all(-1).all(-1)).float().mean() < 0.62
    distorted = run_per_view_spec([{"name": "ImgPilColorDistortion", "strength": 1.0}], image)
    assert distorted.shape == blurred.shape and torch.isfinite(distorted).all()


# ----------------------------------------------------------------------------------------------
# Each op against torchvision's functional on tensors


@pytest.fixture(scope="module")
def small_views() -> tuple[torch.Tensor, torch.Tensor]:
    uint8 = torch.stack([smooth_image(seed, 24, 20) for seed in range(3)])
    return uint8, uint8.float() / 255


def per_view(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
        (adjust_saturation, TF.adjust_saturation, [0.0, 0.6, 1.4]),
        (adjust_hue, TF.adjust_hue, [-0.2, 0.05, 0.4]),
        (adjust_sharpness, TF.adjust_sharpness, [0.1, 1.0, 1.9]),
    ],
)
def test_float_ops_match_torchvision(small_views, ours, theirs, factors):
    _, views = small_views
    out = ours(views.clone(), per_view(factors))
    for view, result, factor in zip(views, out, factors, strict=True):
        assert (result - theirs(view, factor)).abs().max() <= 1 / 255, factor


def test_posterize_solarize_autocontrast_match_torchvision_uint8(small_views):
    uint8, views = small_views
    bits, thresholds = [4, 6, 8], [0, 128, 255]
    posterized = posterize(views, per_view(bits)) * 255
    solarized = solarize(views, per_view(thresholds)) * 255
    stretched = autocontrast(views) * 255
    for i in range(3):
        assert torch.equal(posterized[i].round().to(torch.uint8), TF.posterize(uint8[i], bits[i]))
        assert torch.equal(
            solarized[i].round().to(torch.uint8), TF.solarize(uint8[i], thresholds[i])
        )
        assert (stretched[i] - TF.autocontrast(uint8[i]).float()).abs().max() <= 1


def test_color_jitter_applies_each_op_once_in_the_drawn_order(small_views):
    _, views = small_views
    views = torch.cat([views, views])  # 6 views, so the subsets per position differ
    jitter = ColorJitter(T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2))
    params = jitter.draw(torch.Generator().manual_seed(5), len(views))
    out = jitter.apply(views.clone(), params)
    torchvision_ops = (
        TF.adjust_brightness,
        TF.adjust_contrast,
        TF.adjust_saturation,
        TF.adjust_hue,
    )
    orders = set()
    for view, result, row in zip(views, out, params, strict=True):
        order = row[1:5].long().tolist()
        assert sorted(order) == [0, 1, 2, 3]
        orders.add(tuple(order))
        expected = view
        for op_id in order:
            expected = torchvision_ops[op_id](expected, float(row[5 + op_id]))
        assert (result - expected).abs().max() <= 2 / 255
    assert len(orders) > 1


def test_photometric_steps_match_pil():
    """Each step of ImgPilRandomPhotometric on the PIL result of the step before (a one-level
    rounding difference in one step can flip a pixel across the solarize threshold)."""

    def as_levels(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()

    pil = to_pil(smooth_image(7, 40, 30))
    steps = [
        (lambda im: ImageOps.posterize(im, 5), lambda x: posterize(x, per_view([5]))),
        (
            lambda im: ImageEnhance.Sharpness(im).enhance(1.6),
            lambda x: adjust_sharpness(x, per_view([1.6])),
        ),
        (lambda im: ImageOps.solarize(im, 150), lambda x: solarize(x, per_view([150]))),
        (ImageOps.autocontrast, autocontrast),
    ]
    for pil_step, our_step in steps:
        ours = our_step(as_levels(pil) / 255) * 255
        pil = pil_step(pil)
        assert (ours - as_levels(pil)).abs().max() <= 1


def test_autocontrast_keeps_a_constant_channel():
    view = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.2
    view[0, 1] = 0.4
    out = autocontrast(view)
    assert torch.equal(out[0, 1], view[0, 1])
    assert out[0, 0].min() == 0 and abs(out[0, 0].max() - 1) < 1e-6


def test_gaussian_blur_matches_torchvision(small_views):
    _, views = small_views
    sigmas = [0.1, 1.0, 2.0]
    out = gaussian_blur(views, per_view(sigmas), half_size=6)
    for view, result, sigma in zip(views, out, sigmas, strict=True):
        expected = TF.gaussian_blur(view, kernel_size=[13, 13], sigma=[sigma, sigma])
        assert (result - expected).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# Config errors


def test_unsupported_transform_is_named():
    spec = [{"name": "RandomResizedCrop", "size": 32}, {"name": "Resize", "size": 40}]
    with pytest.raises(
        ConfigError,
        match=r"TRANSFORMS\[1\].name='Resize' is not supported with "
        r"config.DATA.TRAIN.TRANSFORMS_ON_DEVICE=true.*set config.DATA.TRAIN.TRANSFORMS_ON_DEVICE=false",
    ):
        build_device_transform(spec, "default_collate", ["data"])


def test_unknown_transform_gets_the_cpu_paths_message():
    with pytest.raises(ConfigError, match=r"TRANSFORMS\[0\].name='ColourJitter' is not a known"):
        build_device_transform([{"name": "ColourJitter"}], "default_collate", ["data"])


@pytest.mark.parametrize(
    ("spec", "collate_function", "match"),
    [
        ([{"name": "ToTensor"}], "default_collate", r"TRANSFORMS\[0\] must be RandomResizedCrop"),
        (
            [{"name": "RandomResizedCrop", "size": 32}],
            "patch_and_image_collator",
            r"TRANSFORMS\[0\] must be ImgPilToPatchesAndImage",
        ),
        (
            [{"name": "RandomResizedCrop", "size": 32}, {"name": "RandomResizedCrop", "size": 16}],
            "default_collate",
            r"TRANSFORMS\[1\] \(RandomResizedCrop\): .* must be the first transform",
        ),
        ([{"name": "RandomResizedCrop", "size": 32}], "my_collator", "COLLATE_FUNCTION"),
        (
            [{"name": "ImgPilToPatchesAndImage", "crop_size_patches": 30, "patch_jitter": 12}],
            "patch_and_image_collator",
            r"TRANSFORMS\[0\] \(ImgPilToPatchesAndImage\): patch_jitter",
        ),
    ],
)
def test_bad_pipelines_are_config_errors(spec, collate_function, match):
    keys = PIRL_KEYS if collate_function == "patch_and_image_collator" else ["data"]
    with pytest.raises(ConfigError, match=match):
        build_device_transform(spec, collate_function, keys)


# ----------------------------------------------------------------------------------------------
# Decoding


def encoded(img: Image.Image, fmt: str) -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_decode_jpeg_and_png_to_rgb_on_cpu():
    rgb = to_pil(smooth_image(0, 30, 40))
    gray = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    out = decode(
        [encoded(rgb, "JPEG"), encoded(rgb, "PNG"), encoded(gray, "PNG"), encoded(rgba, "PNG")],
        torch.device("cpu"),
    )
    assert all(img.shape == (3, 30, 40) and img.dtype == torch.uint8 for img in out)
    assert torch.equal(out[1], torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
    assert torch.equal(out[2][0], out[2][1]) and torch.equal(out[2][1], out[2][2])
    assert torch.equal(out[3], out[1])
    jpeg_by_pil = Image.open(io.BytesIO(encoded(rgb, "JPEG").numpy().tobytes())).convert("RGB")
    jpeg_by_pil = torch.from_numpy(np.array(jpeg_by_pil)).permute(2, 0, 1)
    assert (out[0].float() - jpeg_by_pil.float()).abs().max() <= 2


@pytest.mark.parametrize(
    "bad",
    [b"not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 40, b""],
    ids=["garbage", "truncated_jpeg", "empty"],
)
def test_undecodable_bytes_name_their_position(bad):
    good = encoded(to_pil(smooth_image(0, 8, 8)), "PNG")
    broken = (
        torch.frombuffer(bytearray(bad), dtype=torch.uint8)
        if bad
        else torch.empty(0, dtype=torch.uint8)
    )
    with pytest.raises(DataError, match="image 1 of the batch could not be decoded"):
        decode([good, broken, good], "cpu")


def test_sample_crop_follows_torchvision_rules():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = sample_crop(375, 500, (0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        assert 0.08 * 0.9 <= h * w / (375 * 500) <= 1.0
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # impossible aspect ratios fall back to the central crop clipped to the ratio range
    assert sample_crop(100, 400, (1.0, 1.0), (1.0, 1.0), g) == (0, 150, 100, 100)


def test_decode_passes_already_decoded_images_through():
    image = smooth_image(1, 20, 30)
    out = decode([encoded(to_pil(image), "PNG"), image], torch.device("cpu"))
    assert torch.equal(out[0], image) and torch.equal(out[1], image)
