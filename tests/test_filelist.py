"""VISSL's `disk_filelist` source: .npy lists of image paths and labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from pirl.data import limited_subset, open_images, open_train_data
from pirl.data.filelist import FileListImages
from pirl.errors import DataError
from pirl.schema import DataSplit
from pirl.transforms import build_collator, build_transform


@pytest.fixture(scope="module")
def filelist(digits_folder, tmp_path_factory):
    """The digits' val split as VISSL's create_*_data_files.py write it."""
    root = tmp_path_factory.mktemp("filelist")
    samples = ImageFolder(str(digits_folder / "val")).samples
    np.save(root / "val_images.npy", np.array([p for p, _ in samples]))
    np.save(root / "val_labels.npy", np.array([label for _, label in samples]))
    return root, samples


def test_images_and_labels_by_index(filelist):
    root, samples = filelist
    images = FileListImages(str(root / "val_images.npy"), str(root / "val_labels.npy"))
    assert len(images) == len(samples) and images.classes == [str(c) for c in range(10)]
    for i in (0, 17, len(samples) - 1):
        image, label = images[i]
        assert label == samples[i][1] and image.mode == "RGB"
        data, label = images.encoded(i)
        assert data.dtype == torch.uint8 and label == samples[i][1]
    unlabelled = FileListImages(str(root / "val_images.npy"), mmap=False)
    assert unlabelled[3][1] == -1 and unlabelled.classes == []


def test_the_training_contract(filelist):
    """DATA_SOURCES=[disk_filelist] through open_train_data, as train and benchmark open it."""
    root, samples = filelist
    split = DataSplit(
        DATA_SOURCES=["disk_filelist"],
        DATA_PATHS=[str(root / "val_images.npy")],
        LABEL_SOURCES=["disk_filelist"],
        LABEL_PATHS=[str(root / "val_labels.npy")],
        BATCHSIZE_PER_REPLICA=8,
        DATA_LIMIT=20,
    )
    tf = [{"name": "Resize", "size": 16}, {"name": "CenterCrop", "size": 16}, {"name": "ToTensor"}]
    data = open_train_data(
        split,
        build_transform(tf),
        build_collator("default_collate", ["data"]),
        rank=0,
        world=1,
        seed=0,
        num_workers=0,
    )
    assert data.num_samples == 20 and data.classes == [str(c) for c in range(10)]
    chosen = limited_subset(len(samples), 20, seed=0)
    seen = []
    for batch in data.batches(0):
        assert batch["data"].shape[1:] == (3, 16, 16)
        for i, y in zip(batch["index"].tolist(), batch["label"].tolist(), strict=True):
            assert y == samples[chosen[i]][1]  # sample i is the i-th of DATA_LIMIT's subset
            seen.append(i)
    assert sorted(seen) == list(range(20))


def test_prefix_rewrite(filelist, tmp_path):
    root, samples = filelist
    moved = [p.replace(str(p.split("/val/")[0]), "/old/place") for p, _ in samples]
    np.save(tmp_path / "images.npy", np.array(moved))
    old_root = samples[0][0].split("/val/")[0]
    split = DataSplit(
        DATA_SOURCES=["disk_filelist"],
        DATA_PATHS=[str(tmp_path / "images.npy")],
        REMOVE_IMG_PATH_PREFIX="/old/place",
        NEW_IMG_PATH_PREFIX=old_root,
    )
    images = open_images(split)
    assert images.path(0) == samples[0][0] and images[0][0].size
    without = FileListImages(str(tmp_path / "images.npy"))
    with pytest.raises(DataError, match="does not exist"):
        without[0]


def test_bad_lists_are_data_errors(filelist, tmp_path):
    root, _ = filelist
    paths = str(root / "val_images.npy")
    np.save(tmp_path / "objects.npy", np.array(["a.png", 3], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"dtype=str"):
        FileListImages(str(tmp_path / "objects.npy"))
    np.save(tmp_path / "short.npy", np.arange(5))
    with pytest.raises(DataError, match="one integer per image"):
        FileListImages(paths, str(tmp_path / "short.npy"))
    np.save(tmp_path / "numbers.npy", np.arange(5))
    with pytest.raises(DataError, match="1-d array of paths"):
        FileListImages(str(tmp_path / "numbers.npy"))
    with pytest.raises(DataError, match="does not exist"):
        FileListImages(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "empty.npy", np.array([], dtype=str))
    with pytest.raises(DataError, match="is empty"):
        open_images(
            DataSplit(DATA_SOURCES=["disk_filelist"], DATA_PATHS=[str(tmp_path / "empty.npy")])
        )


def test_extract_reads_a_filelist(filelist, digits_folder, tmp_path):
    """`pirl extract --source disk_filelist` gives the same features as the folder it lists."""
    from pirl.extract import load_features, main
    from pirl.models import ResNetTrunk
    from pirl.weights import export_torchvision

    root, _ = filelist
    export_torchvision(ResNetTrunk(18).state_dict(), str(tmp_path / "t.safetensors"))
    common = ["--resize", "32", "--crop", "32", "--workers", "0", "--limit", "12"]
    weights = str(tmp_path / "t.safetensors")
    assert main([weights, str(tmp_path / "a"), "--data", str(digits_folder / "val"), *common,
                 "--source", "disk_folder"]) == 0  # fmt: skip
    assert main([weights, str(tmp_path / "b"), "--data", str(root / "val_images.npy"), *common,
                 "--source", "disk_filelist", "--labels", str(root / "val_labels.npy")]) == 0  # fmt: skip
    a = load_features(str(tmp_path / "a"), "train", "res5avg")
    b = load_features(str(tmp_path / "b"), "train", "res5avg")
    assert a["targets"].tolist() == b["targets"].tolist()
    np.testing.assert_array_equal(a["features"], b["features"])
