"""The single-process training loop on the demo's real images: outputs, resume, divergence."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pirl import checkpoint, config, storage
from pirl.errors import EXIT_RETRYABLE, StorageUnavailable
from pirl.models import build_model
from pirl.train import main as train_main

from .conftest import first_limited_image


def tiny(root, data, *extra: str) -> list[str]:
    return [
        "config=pretrain/pirl/pirl_demo_resnet18",
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}/train]",
        "config.DATA.TRAIN.DATA_LIMIT=48",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=16",
        "config.OPTIMIZER.num_epochs=2",
        "config.LOG_FREQUENCY=2",
        f"config.CHECKPOINT.DIR={root}",
        *extra,
    ]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_metrics_checkpoints_and_trunk(tmp_path, digits_folder):
    assert train_main(tiny(tmp_path, digits_folder)) == 0
    records = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert steps and all(r["loss"] > 0 for r in steps)
    assert {"lr", "images_per_sec", "global_step"} <= set(steps[0])
    assert [r["epoch"] for r in records if "epoch_loss" in r] == [0, 1]
    _, meta = checkpoint.load_latest(str(tmp_path))
    assert meta["epoch"] == 2 and meta["global_step"] == 12
    from safetensors.torch import load_file

    trunk = load_file(tmp_path / "trunk.safetensors")
    assert "conv1.weight" in trunk and "layer4.1.bn2.running_var" in trunk
    assert (tmp_path / "train_config.yaml").read_text().startswith("config:")


def test_resume_mid_epoch_is_bit_identical(tmp_path, digits_folder):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert train_main(tiny(straight, digits_folder)) == 0
    # stop after 9 of 12 steps (mid-epoch 1), then start again: it resumes and finishes
    assert train_main(tiny(resumed, digits_folder, "config.MAX_STEPS=9")) == 0
    _, meta = checkpoint.load_latest(str(resumed))
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == (1, 3, 9)
    assert train_main(tiny(resumed, digits_folder)) == 0
    a, meta_a = checkpoint.load_latest(str(straight))
    b, meta_b = checkpoint.load_latest(str(resumed))
    assert meta_a["global_step"] == meta_b["global_step"] == 12
    assert torch.equal(a["loss"]["memory.memory"], b["loss"]["memory.memory"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, digits_folder, capsys):
    rc = train_main(
        tiny(
            tmp_path,
            digits_folder,
            "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale=false",
            "config.OPTIMIZER.param_schedulers.lr.start_value=1e30",
            "config.OPTIMIZER.param_schedulers.lr.end_value=1e30",
        )
    )
    assert rc == 4
    assert "training diverged" in capsys.readouterr().err


@pytest.mark.parametrize("loss_type", ["nce", "cross_entropy"])
def test_npid_preset_trains(tmp_path, digits_folder, loss_type):
    args = tiny(
        tmp_path,
        digits_folder,
        f"config.LOSS.nce_loss_with_memory.loss_type={loss_type}",
        "config.MAX_STEPS=3",
    )
    args[0] = "config=pretrain/npid/npid_demo_resnet18"
    assert train_main(args) == 0


def test_bf16_autocast_on_cpu_trains_with_a_float32_bank_and_weights(tmp_path, digits_folder):
    args = tiny(
        tmp_path, digits_folder, "config.MODEL.AMP_PARAMS.USE_AMP=true", "config.MAX_STEPS=3"
    )
    assert train_main(args) == 0
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps and all(0 < r["loss"] < float("inf") for r in steps)
    state, _ = checkpoint.load_latest(str(tmp_path))
    assert state["loss"]["memory.memory"].dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())


LINEAR_HEADS = (  # VISSL's plain linear heads: BatchNorm1d over a batch of 8 amplifies rounding
    "config.MODEL.HEAD.PARAMS=[[[mlp,{dims:[512,128]}],[siamese_concat_view,{num_towers:9}],"
    "[mlp,{dims:[1152,128]}]],[[mlp,{dims:[512,128]}]]]"
)


def assert_one_step_agrees(a, b, digits_folder) -> None:
    """The runs in `a` and `b` (one step each, LINEAR_HEADS) moved every parameter the same way,
    to float rounding: their difference is under 1% of what the step changed (in norm: a ReLU
    input within rounding of 0 may flip, so not the largest element)."""
    sa, _ = checkpoint.load_latest(str(a))
    sb, _ = checkpoint.load_latest(str(b))
    cfg, _ = config.load(tiny(a, digits_folder, LINEAR_HEADS), world_size=1)
    init = build_model(cfg).state_dict()
    for key, value in sb["model"].items():
        if value.is_floating_point() and "running" not in key:
            step = (sa["model"][key] - init[key]).norm()
            assert (sa["model"][key] - value).norm() <= 1e-2 * step + 1e-7, key


def test_channels_last_and_contiguous_runs_match(tmp_path, digits_folder):
    """NHWC is a layout, not a different model: one step agrees to float rounding (later steps
    amplify rounding chaotically at the demo's LR, so one step is the comparison)."""
    a, b = tmp_path / "nhwc", tmp_path / "nchw"
    assert train_main(tiny(a, digits_folder, "config.MAX_STEPS=1", LINEAR_HEADS)) == 0
    nchw = ["config.MAX_STEPS=1", "config.MODEL.CHANNELS_LAST=false", LINEAR_HEADS]
    assert train_main(tiny(b, digits_folder, *nchw)) == 0
    assert_one_step_agrees(a, b, digits_folder)
    sa, _ = checkpoint.load_latest(str(a))
    sb, _ = checkpoint.load_latest(str(b))
    assert torch.allclose(sa["loss"]["memory.memory"], sb["loss"]["memory.memory"], atol=1e-5)


def test_transforms_on_device_train_and_resume_bit_identically(tmp_path, digits_folder):
    """TRANSFORMS_ON_DEVICE: workers hand over the PNG bytes, the trainer decodes and augments
    (here on the CPU device); views are seeded per sample, so a resumed run matches."""
    on_device = "config.DATA.TRAIN.TRANSFORMS_ON_DEVICE=true"
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert train_main(tiny(straight, digits_folder, on_device)) == 0
    assert train_main(tiny(resumed, digits_folder, on_device, "config.MAX_STEPS=9")) == 0
    assert train_main(tiny(resumed, digits_folder, on_device)) == 0
    a, _ = checkpoint.load_latest(str(straight))
    b, _ = checkpoint.load_latest(str(resumed))
    assert torch.equal(a["loss"]["memory.memory"], b["loss"]["memory.memory"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    steps = [r for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r]
    assert steps and all(0 < r["loss"] < float("inf") for r in steps)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile's CPU backend needs a C++ compiler (apt install g++)",
)
def test_compiled_step_matches_the_eager_one(tmp_path, digits_folder):
    a, b = tmp_path / "eager", tmp_path / "compiled"
    assert train_main(tiny(a, digits_folder, "config.MAX_STEPS=1", LINEAR_HEADS)) == 0
    compiled = ["config.MAX_STEPS=1", "config.MODEL.COMPILE=true", LINEAR_HEADS]
    assert train_main(tiny(b, digits_folder, *compiled)) == 0
    assert_one_step_agrees(a, b, digits_folder)


def test_an_undecodable_file_on_device_stops_with_a_data_error(tmp_path, digits_folder, capsys):
    data = tmp_path / "digits"
    shutil.copytree(digits_folder, data)
    first = first_limited_image(data / "train", 48)  # tiny's DATA_LIMIT selects it
    first.write_bytes(b"\x89PNG not really")
    args = tiny(tmp_path / "run", data, "config.DATA.TRAIN.TRANSFORMS_ON_DEVICE=true")
    assert train_main(args) == 3
    assert "could not be decoded" in capsys.readouterr().err


def checkpoint_steps(root) -> list[int]:
    """The global step of every checkpoint record in metrics.jsonl (one per save)."""
    return [r["global_step"] for r in read_jsonl(root / "metrics.jsonl") if "replica_digests" in r]


def test_max_steps_stops_before_a_step_exports_and_saves_once(tmp_path, digits_folder):
    args = tiny(
        tmp_path,
        digits_folder,
        "config.MAX_STEPS=3",
        "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3",
    )
    assert train_main(args) == 0
    assert (tmp_path / "trunk.safetensors").exists()
    assert (tmp_path / "train_config.yaml").exists()
    assert checkpoint_steps(tmp_path) == [3]  # the iteration save and the limit's: one save
    assert train_main(args) == 0  # a rerun at the limit trains nothing more
    _, meta = checkpoint.load_latest(str(tmp_path))
    assert meta["global_step"] == 3
    assert checkpoint_steps(tmp_path) == [3]


def test_a_store_failing_on_the_metrics_exits_retryably_and_keeps_them(
    tmp_path, digits_folder, monkeypatch
):
    assert train_main(tiny(tmp_path, digits_folder, "config.MAX_STEPS=2")) == 0
    before = (tmp_path / "metrics.jsonl").read_bytes()
    read_bytes = storage.read_bytes

    def metrics_unavailable(url: str, size_hint: int = 0) -> bytes:
        if url.endswith("metrics.jsonl"):
            raise StorageUnavailable(f"reading {url}: the store kept failing")
        return read_bytes(url, size_hint)

    monkeypatch.setattr(storage, "read_bytes", metrics_unavailable)
    assert train_main(tiny(tmp_path, digits_folder, "config.MAX_STEPS=4")) == EXIT_RETRYABLE
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
