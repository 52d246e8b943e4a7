"""The learning tier: pretraining must learn, not only run.

NPID and PIRL, through the real trainer, on 128 generated shape images: within a bounded number of
steps the loss must fall well below its chance value with a healthy memory bank; and on 600
images, a linear probe of the trained trunk must beat the same probe of a random-init trunk on
held-out images. Each assertion fails
when learning breaks: a collapsed bank, a loss stuck at chance, features no better than random.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pirl import config
from pirl.data.shapes import write_shapes_folder
from pirl.models import ResNetTrunk, build_model
from pirl.train import main as train_main
from pirl.transforms import build_transform
from pirl.weights import load_trunk_weights

pytestmark = [pytest.mark.slow, pytest.mark.learning]

N_IMAGES, NEGATIVES = 128, 64
NORMALIZE = {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_folder(str(root), train=N_IMAGES, val=0, size=48)
    return root


def pretrain(
    preset: str, data: str, run, epochs: int, negatives: int = NEGATIVES, batch: int = 16
) -> list[dict]:
    overrides = [
        f"config={preset}",
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
        f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        f"config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives={negatives}",
        f"config.OPTIMIZER.num_epochs={epochs}",
        f"config.CHECKPOINT.DIR={run}",
        "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1000",
    ]
    assert train_main(overrides) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "health" in r]


@torch.no_grad()
def trunk_features(trunk: torch.nn.Module, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """res5avg features and labels of an ImageFolder, as the benchmark's transforms see it."""
    from torchvision.datasets import ImageFolder

    plain = build_transform([{"name": "Resize", "size": 32}, {"name": "ToTensor"}, NORMALIZE])
    data = ImageFolder(folder)
    trunk.eval()
    x = torch.stack([plain(img.convert("RGB")) for img, _ in data])
    return trunk(x).numpy(), np.array(data.targets)


def linear_probe(trunk: torch.nn.Module, root: str) -> float:
    """Top-1 (%) on val of a logistic regression on standardised res5avg features of train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (xt, yt), (xv, yv) = (
        trunk_features(trunk, f"{root}/train"),
        trunk_features(trunk, f"{root}/val"),
    )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    return probe.fit(xt, yt).score(xv, yv) * 100


@pytest.mark.parametrize(
    "preset,epochs",
    # 40 epochs each: NPID at 30 ended at 0.68x / 0.69x / 0.84x chance for seeds 1 / 2 / 0 (the
    # init's random draws alone), at 40 at 0.61x for seed 0
    [("pretrain/npid/npid_demo_resnet18", 40), ("pretrain/pirl/pirl_demo_resnet18", 40)],
)
def test_loss_falls_below_chance_with_a_healthy_bank(shapes, tmp_path, preset, epochs):
    health = [r["health"] for r in pretrain(preset, f"{shapes}/train", tmp_path / "run", epochs)]
    assert health[-1]["loss_vs_chance"] <= 0.75, health  # ln(K+1) is chance for InfoNCE
    assert health[-1]["bank_mean_cosine"] < 0.5, health
    assert health[-1]["uniformity"] < -1.0, health


def test_trained_trunk_beats_random_init(tmp_path):
    """NPID on 600 shapes: a linear probe of the trained trunk beats the same probe of the
    random-init trunk on held-out images (measured: 36.0% vs 20.0% at 25 epochs)."""
    root = str(tmp_path / "shapes")
    write_shapes_folder(root, train=600, val=300, size=32)
    preset = "pretrain/npid/npid_demo_resnet18"
    pretrain(preset, f"{root}/train", tmp_path / "run", epochs=25, negatives=512, batch=32)
    cfg, _ = config.load([f"config={preset}"], world_size=1)
    trained, random_init = ResNetTrunk(18), build_model(cfg).trunk
    trained.load_state_dict(load_trunk_weights(str(tmp_path / "run" / "trunk.safetensors")))
    ours, theirs = linear_probe(trained, root), linear_probe(random_init, root)
    print(f"linear probe top-1: trained {ours:.1f}%, random init {theirs:.1f}%")
    assert ours >= theirs + 10, (ours, theirs)
