"""DATASET_NAMES through a dataset catalog (VISSL's dataset_catalog.json) when DATA_PATHS is empty."""

from __future__ import annotations

import json

import pytest

from pirl import config, storage
from pirl.benchmark.config import load as load_benchmark
from pirl.errors import ConfigError, DataError

NPID = "config=pretrain/npid/npid_demo_resnet18"
BENCH = "config=benchmark/linear_image_classification/demo/eval_resnet18_demo_linear"
FOLDER = ["config.DATA.TRAIN.DATA_SOURCES=[disk_folder]", "config.DATA.TRAIN.DATASET_NAMES=[mine]"]


def write_catalog(path, entries: dict) -> str:
    path.write_text(json.dumps(entries))
    return str(path)


def test_dataset_name_resolves_through_the_configured_catalog(tmp_path, monkeypatch):
    monkeypatch.delenv("PIRL_DATASET_CATALOG", raising=False)
    url = write_catalog(
        tmp_path / "catalog.json",
        {"mine": {"train": ["/data/mine/train", "<lbl_path>"], "val": ["/data/mine/val", ""]}},
    )
    cfg, derived = config.load([NPID, *FOLDER, f"config.DATA.DATASET_CATALOG={url}"])
    assert cfg.DATA.TRAIN.DATA_PATHS == ["/data/mine/train"]
    assert any("DATA_PATHS -> [/data/mine/train] (mine/train in" in n for n in derived.notes)
    # paths on the command line win over the catalog
    cfg, _ = config.load(
        [NPID, *FOLDER, f"config.DATA.DATASET_CATALOG={url}", "config.DATA.TRAIN.DATA_PATHS=[/x]"]
    )
    assert cfg.DATA.TRAIN.DATA_PATHS == ["/x"]


def test_catalog_from_the_environment_on_any_url(monkeypatch):
    url = "memory://catalog-test/dataset_catalog.json"
    entries = {"mine": {"train": ["s3://b/list.npy", "s3://b/labels.npy"]}}
    storage.write_bytes(url, json.dumps(entries).encode())
    monkeypatch.setenv("PIRL_DATASET_CATALOG", url)
    cfg, _ = config.load(
        [
            NPID,
            "config.DATA.TRAIN.DATA_SOURCES=[disk_filelist]",
            "config.DATA.TRAIN.DATASET_NAMES=[mine]",
        ]
    )
    assert cfg.DATA.TRAIN.DATA_PATHS == ["s3://b/list.npy"]
    assert cfg.DATA.TRAIN.LABEL_PATHS == ["s3://b/labels.npy"]  # disk_filelist's labels


def test_benchmark_resolves_train_and_test_by_their_split(tmp_path, monkeypatch):
    monkeypatch.delenv("PIRL_DATASET_CATALOG", raising=False)
    url = write_catalog(
        tmp_path / "c.json", {"mine": {"train": ["/d/train", ""], "val": ["/d/val", ""]}}
    )
    cfg, _ = load_benchmark(
        [
            BENCH,
            "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
            "config.DATA.TEST.DATA_SOURCES=[disk_folder]",
            "config.DATA.TRAIN.DATASET_NAMES=[mine]",
            "config.DATA.TEST.DATASET_NAMES=[mine]",
            f"config.DATA.DATASET_CATALOG={url}",
        ]
    )
    assert cfg.DATA.TRAIN.DATA_PATHS == ["/d/train"] and cfg.DATA.TEST.DATA_PATHS == ["/d/val"]


@pytest.mark.parametrize(
    "entries,match",
    [
        (
            {"other": {"train": ["/a", ""]}},
            r"DATASET_NAMES=\[mine\] is not in the dataset catalog .* \['other'\]",
        ),
        ({"mine": {"val": ["/a", ""]}}, "no usable 'train' entry for mine"),
        ({"mine": {"train": ["<img_path>", "<lbl_path>"]}}, "placeholder '<img_path>'"),
    ],
)
def test_bad_catalog_entries_are_config_errors(tmp_path, monkeypatch, entries, match):
    monkeypatch.delenv("PIRL_DATASET_CATALOG", raising=False)
    url = write_catalog(tmp_path / "c.json", entries)
    with pytest.raises(ConfigError, match=match):
        config.load([NPID, *FOLDER, f"config.DATA.DATASET_CATALOG={url}"])


def test_missing_or_broken_catalog_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PIRL_DATASET_CATALOG", raising=False)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load([NPID, *FOLDER, f"config.DATA.DATASET_CATALOG={tmp_path / 'none.json'}"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config.load([NPID, *FOLDER, f"config.DATA.DATASET_CATALOG={tmp_path / 'bad.json'}"])


def test_without_paths_or_catalog_the_error_names_both(monkeypatch):
    from pirl.data import open_images

    monkeypatch.delenv("PIRL_DATASET_CATALOG", raising=False)
    cfg, _ = config.load([NPID, *FOLDER])
    with pytest.raises(DataError, match=r"DATASET_NAMES \['mine'\].*PIRL_DATASET_CATALOG"):
        open_images(cfg.DATA.TRAIN)
