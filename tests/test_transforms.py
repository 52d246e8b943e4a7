"""PIRL augmentations: 10 independent views, the jigsaw grid, the patch order, the collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pirl import config
from pirl.errors import ConfigError
from pirl.transforms import (
    ImgPilRandomPhotometric,
    ImgPilToPatchesAndImage,
    build_transform,
    collate_patches_and_images,
)


def coordinate_image(size: int) -> Image.Image:
    """Pixel (x, y) holds (x, y, 0): a patch's top-left pixel says where it was cut."""
    ys, xs = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8))


def test_patches_cover_the_grid_in_a_random_order():
    t = ImgPilToPatchesAndImage(
        crop_scale_image=(1.0, 1.0),
        crop_size_image=32,
        crop_scale_patches=(1.0, 1.0),
        crop_size_patches=255,
        patch_jitter=21,
    )
    t.jigsaw_crop.ratio = (1.0, 1.0)  # the whole 255x255 image, so pixels map back to cells
    orders = set()
    for _ in range(5):
        views = t(coordinate_image(255))
        assert len(views) == 10
        assert views[0].size == (32, 32)
        cells = []
        for patch in views[1:]:
            assert patch.size == (64, 64)
            x, y, _ = patch.getpixel((0, 0))
            assert x % 85 < 21 and y % 85 < 21  # jitter within the cell: [0, 21)
            cells.append((x // 85, y // 85))
        assert sorted(cells) == [(gx, gy) for gx in range(3) for gy in range(3)]
        orders.add(tuple(cells))
    assert len(orders) > 1  # the order is drawn anew each time


def test_patch_offsets_are_drawn_in_zero_to_jitter_exclusive():
    """VISSL: offsets uniform in [0, patch_jitter): with jitter 2, both 0 and 1, never 2."""
    t = ImgPilToPatchesAndImage(
        crop_scale_image=(1.0, 1.0),
        crop_size_image=8,
        crop_scale_patches=(1.0, 1.0),
        crop_size_patches=30,
        patch_jitter=2,
    )
    t.jigsaw_crop.ratio = (1.0, 1.0)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(20):
        for patch in t(coordinate_image(30))[1:]:
            x, y, _ = patch.getpixel((0, 0))
            offsets |= {x % 10, y % 10}
    assert offsets == {0, 1}


def test_every_view_gets_its_own_augmentation():
    spec = [
        {
            "name": "ImgPilToPatchesAndImage",
            "crop_size_image": 32,
            "crop_size_patches": 48,
            "patch_jitter": 4,
        },
        {"name": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.2},
        {"name": "ToTensor"},
    ]
    t = build_transform(spec)
    grey = Image.new("RGB", (64, 64), (120, 80, 40))
    torch.manual_seed(0)
    views = t(grey)
    assert len(views) == 10 and views[1].shape == (3, 12, 12)
    means = {round(v.mean().item(), 4) for v in views[1:]}
    assert len(means) > 5  # a flat image: only the per-patch jitter makes them differ


def test_photometric_probability():
    img = coordinate_image(64).convert("RGB")
    assert ImgPilRandomPhotometric(p=0.0)(img) is img
    out = ImgPilRandomPhotometric(p=1.0)(img)
    assert out.size == img.size


@pytest.mark.parametrize(
    "overrides",
    [
        ["config=pretrain/pirl/pirl_jigsaw_4node_resnet50"],
        [
            "config=pretrain/pirl/pirl_jigsaw_4node_resnet50",
            "+config/pretrain/pirl/transforms=photo_gblur",
        ],
        ["config=pretrain/npid/npid_8gpu_resnet"],
    ],
)
def test_preset_transforms_run(overrides):
    cfg, _ = config.load(overrides)
    out = build_transform(cfg.DATA.TRAIN.TRANSFORMS)(Image.new("RGB", (300, 260), (10, 200, 30)))
    if isinstance(out, list):
        assert out[0].shape == (3, 224, 224)
        assert all(p.shape == (3, 64, 64) for p in out[1:]) and len(out) == 10
    else:
        assert out.shape == (3, 224, 224)


def test_collator_is_sample_major():
    batch = [
        (
            [torch.full((3, 4, 4), 10.0 * i)]
            + [torch.full((3, 2, 2), 10.0 * i + j) for j in range(9)],
            i + 5,
            i,
        )
        for i in range(3)
    ]
    out = collate_patches_and_images(batch)
    assert out["images"].shape == (3, 3, 4, 4)
    assert out["patches"].shape == (27, 3, 2, 2)
    assert out["patches"][9 + 4, 0, 0, 0].item() == 14.0  # sample 1, patch 4
    assert out["index"].tolist() == [5, 6, 7]


def test_bad_transform_entries_are_named():
    with pytest.raises(
        ConfigError,
        match=r"TRANSFORMS\[0\].name='ColourJitter' is not a known transform \(did you mean 'ColorJitter'",
    ):
        build_transform([{"name": "ColourJitter"}])
    with pytest.raises(
        ConfigError, match=r"TRANSFORMS\[0\] \(ImgPilToPatchesAndImage\): patch_jitter"
    ):
        build_transform(
            [{"name": "ImgPilToPatchesAndImage", "crop_size_patches": 30, "patch_jitter": 12}]
        )
    with pytest.raises(ConfigError, match="must be the first transform"):
        build_transform([{"name": "ToTensor"}, {"name": "ImgPilToPatchesAndImage"}])
