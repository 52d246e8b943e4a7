"""Data order: prep writes shards in a seeded random order, DATA_LIMIT takes a seeded random
subset, and datasets of the older class-ordered format still load (with a warning) or refuse a
DATA_LIMIT that would keep the first classes only."""

from __future__ import annotations

import json
import logging

import pytest

from pirl import prep
from pirl.data import limited_subset
from pirl.data import manifest as mf
from pirl.data.shapes import SHAPES, write_shapes_folder
from pirl.errors import ConfigError, DataError
from pirl.schema import DataSplit

from .bench.batch_entropy import mean_batch_entropy, open_labelled


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_folder(str(root / "src"), train=160, val=16, size=16)
    dest = root / "ds"
    assert prep.main([str(root / "src"), str(dest), "--shard-size", "40"]) == 0
    return root


def batch_class_entropy(split: DataSplit, batches: int = 5) -> float:
    """Mean class entropy (bits) of the first batches of epoch 0."""
    return mean_batch_entropy(open_labelled(split), max_batches=batches)


def split_of(source: str, path: str, **kw) -> DataSplit:
    return DataSplit(
        DATA_SOURCES=[source],
        DATA_PATHS=[path],
        BATCHSIZE_PER_REPLICA=16,
        LABEL_TYPE="standard",
        **kw,
    )


def test_shards_mix_every_class_like_a_shuffled_folder(shapes):
    manifest = json.loads((shapes / "ds" / "manifest.json").read_text())
    assert manifest["format"] == mf.FORMAT and manifest["params"]["order"] == "shuffled"
    shards = batch_class_entropy(split_of("shards", str(shapes / "ds")))
    folder = batch_class_entropy(split_of("disk_folder", str(shapes / "src" / "train")))
    # 10 classes: at most 3.32 bits, about 2.8-2.9 for 16 uniform draws; class-sorted: 0-1
    assert shards > 2.5 and folder > 2.5


def test_class_ordered_datasets_still_load_with_a_warning(shapes, tmp_path, caplog):
    old = tmp_path / "old"
    import shutil

    shutil.copytree(shapes / "ds", old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format"] = mf.CLASS_ORDERED_FORMAT
    (old / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="pirl"):
        batch_class_entropy(split_of("shards", str(old)), batches=1)
    assert "sorted by class" in caplog.text
    with pytest.raises(DataError, match="keep the first classes only"):
        batch_class_entropy(split_of("shards", str(old), DATA_LIMIT=32), batches=1)


def test_data_limit_is_a_seeded_random_subset_on_folders(shapes):
    subset = limited_subset(160, 40, seed=0)
    assert len(set(subset)) == 40 and subset == sorted(subset)
    assert subset != list(range(40)) and subset == limited_subset(160, 40, seed=0)
    assert subset != limited_subset(160, 40, seed=1)
    split = split_of("disk_folder", str(shapes / "src" / "train"), DATA_LIMIT=40)
    data = open_labelled(split)
    assert data.num_samples == 40
    labels = [lab for b in data.batches(0) for lab in b["label"].tolist()]
    assert len(set(labels)) == len(SHAPES)  # every class, not the first one or two
    indices = sorted(i for b in data.batches(0) for i in b["index"].tolist())
    assert indices == list(range(40))  # memory-bank rows stay 0..n-1


def test_data_limit_sampling_keys_are_checked():
    from pirl import config

    base = ["config=pretrain/npid/npid_demo_resnet18", "config.DATA.TRAIN.DATA_LIMIT=100"]
    with pytest.raises(ConfigError, match="IS_BALANCED"):
        config.load([*base, "config.DATA.TRAIN.DATA_LIMIT_SAMPLING.IS_BALANCED=true"], 1)
    with pytest.raises(ConfigError, match="pirl prep --seed"):
        config.load([*base, "config.DATA.TRAIN.DATA_LIMIT_SAMPLING.SEED=3"], 1)
    cfg, _ = config.load(
        [
            *base,
            "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
            "config.DATA.TRAIN.DATA_LIMIT_SAMPLING.SEED=3",
        ],
        1,
    )
    assert cfg.DATA.TRAIN.DATA_LIMIT_SAMPLING.SEED == 3
