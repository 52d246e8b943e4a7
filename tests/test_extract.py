"""`pirl extract`: layer features of a split, VISSL's file layout, 2 ranks, heads, offline kNN."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from pirl import checkpoint
from pirl.benchmark.knn import knn_evaluate
from pirl.extract import load_features, main
from pirl.models import ResNetTrunk
from pirl.weights import export_torchvision

from .conftest import free_port, subprocess_env

SMALL = ["--resize", "32", "--crop", "32", "--workers", "0", "--source", "disk_folder"]


@pytest.fixture(scope="module")
def trunk_file(tmp_path_factory):
    torch.manual_seed(3)
    trunk = ResNetTrunk(18).eval()
    path = tmp_path_factory.mktemp("weights") / "trunk.safetensors"
    export_torchvision(trunk.state_dict(), str(path))
    return trunk, path


def reference_features(trunk, folder, n: int) -> tuple[torch.Tensor, list[int]]:
    """res5avg of the n images of an ImageFolder that DATA_LIMIT=n selects, computed directly."""
    from pirl.data import limited_subset

    tf = T.Compose(
        [T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(*NORM)],
    )
    every = ImageFolder(str(folder)).samples
    samples = [every[i] for i in limited_subset(len(every), n, seed=0)]
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in samples])
    with torch.no_grad():
        return trunk(x), [label for _, label in samples]


NORM = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_npy_chunks_under_vissl_names_match_the_trunk(digits_folder, trunk_file, tmp_path, capsys):
    trunk, weights = trunk_file
    out = tmp_path / "feats"
    args = [str(weights), str(out), "--data", str(digits_folder / "val"), "--split", "val"]
    args += [*SMALL, "--layers", "res4,res5avg", "--chunk-size", "16", "--limit", "40"]
    args += ["--batch-size", "12", "--pool-size", "1"]
    assert main(args) == 0
    assert "40 samples" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    for chunk in range(3):  # 40 samples in chunks of 16
        for layer in ("res4", "res5avg"):
            for kind in ("features", "targets", "inds"):
                assert f"rank0_chunk{chunk}_val_{layer}_{kind}.npy" in names
    manifest = json.loads((out / "extract.json").read_text())
    assert manifest["shapes"] == {"res4": [256, 1, 1], "res5avg": [512]}
    assert manifest["num_samples"] == 40 and manifest["weights"]["format"] == "safetensors"

    got = load_features(str(out), "val", "res5avg")
    ref, labels = reference_features(trunk, digits_folder / "val", 40)
    assert got["inds"].tolist() == list(range(40))
    assert got["targets"].tolist() == labels
    np.testing.assert_allclose(got["features"], ref.numpy(), rtol=1e-4, atol=1e-5)
    assert load_features(str(out), "val", "res4")["features"].shape == (40, 256, 1, 1)


def test_two_ranks_under_torchrun_write_the_same_features(digits_folder, trunk_file, tmp_path):
    """gloo, 2 processes, safetensors: each rank writes its share; merged they equal 1 rank."""
    _, weights = trunk_file
    common = [str(weights), "--data", str(digits_folder / "train"), *SMALL]
    common += ["--layers", "res3,res5avg", "--format", "safetensors", "--limit", "37"]
    common += ["--chunk-size", "10", "--batch-size", "8", "--pool-size", "2"]
    assert main([*common[:1], str(tmp_path / "one"), *common[1:]]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    cmd += [f"--master-port={free_port()}", "-m", "pirl.extract"]
    cmd += [*common[:1], str(tmp_path / "two"), *common[1:]]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "extract.json").read_text())
    assert manifest["world_size"] == 2 and manifest["num_samples"] == 37
    # rank 0 has 19 samples (2 chunks), rank 1 has 18 (2 chunks)
    assert sorted(manifest["files"]) == [
        f"rank{r}_chunk{c}_train.safetensors" for r in (0, 1) for c in (0, 1)
    ]
    for layer in ("res3", "res5avg"):
        one = load_features(str(tmp_path / "one"), "train", layer)
        two = load_features(str(tmp_path / "two"), "train", layer)
        assert two["inds"].tolist() == list(range(37))
        assert two["targets"].tolist() == one["targets"].tolist()
        np.testing.assert_allclose(two["features"], one["features"], rtol=1e-4, atol=1e-5)


def test_offline_knn_on_extracted_features(digits_folder, trunk_file, tmp_path):
    _, weights = trunk_file
    for split in ("train", "val"):
        args = [str(weights), str(tmp_path / split), "--data", str(digits_folder / split)]
        assert main([*args, "--split", split, *SMALL, "--limit", "60"]) == 0
    train = load_features(str(tmp_path / "train"), "train", "res5avg")
    val = load_features(str(tmp_path / "val"), "val", "res5avg")
    result = knn_evaluate(
        torch.from_numpy(train["features"]),
        torch.from_numpy(train["targets"]),
        torch.from_numpy(val["features"]),
        torch.from_numpy(val["targets"]),
        [5],
        0.07,
        10,
    )
    assert 0 <= result["5"]["top1"] <= result["5"]["top5"] <= 100


def test_heads_from_a_training_checkpoint(digits_folder, tmp_path):
    """`heads` is the head that embeds a whole image: PIRL's image head (index 1)."""
    from pirl import config
    from pirl.models import build_model

    cfg, _ = config.load(
        [
            "config=pretrain/pirl/pirl_demo_resnet18",
            "config.DISTRIBUTED.NUM_NODES=1",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
        ]
    )
    model = build_model(cfg).eval()
    state = {"model": model.state_dict(), "config": config.dump_yaml(cfg)}
    run = tmp_path / "run"
    checkpoint.save(str(run), state, epoch=1, step_in_epoch=0, global_step=3, keep_last=1)
    out = tmp_path / "feats"
    args = [str(run), str(out), "--data", str(digits_folder / "val"), *SMALL]
    assert main([*args, "--layers", "heads,res5avg", "--limit", "10"]) == 0
    got = load_features(str(out), "train", "heads")
    x = load_features(str(out), "train", "res5avg")["features"]
    with torch.no_grad():
        ref = model.heads[1](torch.from_numpy(x))
    assert got["features"].shape == (10, 128)
    np.testing.assert_allclose(got["features"], ref.numpy(), rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_config_errors(digits_folder, trunk_file, tmp_path, capsys):
    _, weights = trunk_file
    base = [str(weights), str(tmp_path / "o"), "--data", str(digits_folder / "val"), *SMALL]
    assert main([*base, "--layers", "res6"]) == 2
    assert "unknown layer 'res6'" in capsys.readouterr().err
    assert main([*base, "--layers", "heads"]) == 2  # a trunk-only file has no heads
    assert "needs a training checkpoint" in capsys.readouterr().err
    assert main([*base[:3], str(tmp_path / "missing"), *base[4:]]) == 3
