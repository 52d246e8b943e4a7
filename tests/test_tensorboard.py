"""TensorBoard event files (HOOKS.TENSORBOARD_SETUP): written by a real run, read back with
TensorBoard's own reader, locally, on memory:// and on the local S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pirl import config, storage
from pirl.errors import ConfigError
from pirl.tensorboard import TensorBoardLog, event_dir
from pirl.train import main as train_main


def tiny(root, data, *extra: str) -> list[str]:
    """NPID on 16 digits, batch 4: 4 steps per epoch, 2 epochs, a record every 2 steps."""
    return [
        "config=pretrain/npid/npid_demo_resnet18",
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}/train]",
        "config.DATA.TRAIN.DATA_LIMIT=16",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8",
        "config.OPTIMIZER.num_epochs=2",
        "config.LOG_FREQUENCY=2",
        f"config.CHECKPOINT.DIR={root}",
        *extra,
    ]


pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def read_events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def download(url: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in storage.list_names(url):
        (dest / name).write_bytes(storage.read_bytes(storage.join(url, name)))
    return dest


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


TB_ON = [
    "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=true",
    "config.HOOKS.TENSORBOARD_SETUP.LOG_PARAMS_EVERY_N_ITERS=3",
]


def test_training_writes_vissl_tags_that_match_metrics_jsonl(tmp_path, digits_folder):
    run = tmp_path / "run"
    assert train_main(tiny(run, digits_folder, *TB_ON)) == 0
    acc = read_events(run / "tensorboard")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "epoch_loss" in r]
    loss = scalars(acc, "Training/Loss")
    assert sorted(loss) == [r["global_step"] for r in steps]
    for r in steps:
        assert loss[r["global_step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert scalars(acc, "Training/Learning_rate")[r["global_step"]] == pytest.approx(r["lr"])
    assert set(scalars(acc, "Speed/img_per_sec_per_gpu")) == set(loss)
    cosine = scalars(acc, "Health/bank_mean_cosine")
    assert sorted(cosine) == [4, 8]  # the two epoch ends (4 steps each)
    for r in epochs:
        assert cosine[r["global_step"]] == pytest.approx(r["health"]["bank_mean_cosine"])
        assert scalars(acc, "Training/Epoch_loss")[r["global_step"]] == pytest.approx(
            r["epoch_loss"]
        )
    histograms = acc.Tags()["histograms"]
    assert "Parameters/trunk.conv1.weight" in histograms
    assert "Gradients/trunk.conv1.weight" in histograms
    assert any(tag.startswith("Gradients/heads.0.") for tag in histograms)
    # every 3 steps and at each epoch end
    assert [e.step for e in acc.Histograms("Parameters/trunk.conv1.weight")] == [3, 4, 6, 8]


def test_off_by_default_and_no_params_when_asked(tmp_path, digits_folder):
    run = tmp_path / "run"
    assert train_main(tiny(run, digits_folder, "config.OPTIMIZER.num_epochs=1")) == 0
    assert not (run / "tensorboard").exists()
    run2 = tmp_path / "run2"
    extra = [*TB_ON, "config.HOOKS.TENSORBOARD_SETUP.LOG_PARAMS=false"]
    assert train_main(tiny(run2, digits_folder, "config.OPTIMIZER.num_epochs=1", *extra)) == 0
    acc = read_events(run2 / "tensorboard")
    assert acc.Tags()["histograms"] == [] and "Training/Loss" in acc.Tags()["scalars"]


def test_training_writes_event_files_to_s3(tmp_path, digits_folder, s3_bucket):
    url = f"{s3_bucket}/tb/pirl"
    extra = [
        *TB_ON,
        f"config.HOOKS.TENSORBOARD_SETUP.EXPERIMENT_LOG_DIR={url}",
        "config.OPTIMIZER.num_epochs=1",
    ]
    assert train_main(tiny(tmp_path / "run", digits_folder, *extra)) == 0
    assert not (tmp_path / "run" / "tensorboard").exists()
    acc = read_events(download(url, tmp_path / "events"))
    assert sorted(scalars(acc, "Training/Loss")) == [2, 4]
    assert sorted(scalars(acc, "Health/alignment")) == [4]


def test_upload_to_memory_url_and_a_resume_purges_what_followed_the_checkpoint(tmp_path):
    """A resumed run's file starts at the checkpoint's step: TensorBoard drops the earlier
    file's events from that step on (what the interrupted run logged past its checkpoint)."""
    url = "memory://tb-test/run/tensorboard"
    first = TensorBoardLog(url)
    for step in range(1, 11):
        first.add_scalars({"Training/Loss": 10.0 - step}, step)
    first.close()  # "interrupted" at step 10, its last checkpoint at step 6
    resumed = TensorBoardLog(url, purge_step=6)
    for step in range(6, 9):
        resumed.add_scalars({"Training/Loss": 100.0 + step}, step)
    resumed.close()
    assert len(storage.list_names(url)) == 2
    loss = scalars(read_events(download(url, tmp_path / "events")), "Training/Loss")
    assert loss == {**{s: 10.0 - s for s in range(1, 6)}, **{s: 100.0 + s for s in (6, 7, 8)}}


def test_event_dir_follows_log_dir_and_experiment_log_dir():
    cfg, _ = config.load(["config=pretrain/npid/npid_demo_resnet18"])
    setup = cfg.HOOKS.TENSORBOARD_SETUP
    assert (setup.LOG_DIR, setup.EXPERIMENT_LOG_DIR, setup.FLUSH_EVERY_N_MIN) == (
        ".",
        "tensorboard",
        5,
    )
    assert event_dir(setup, "s3://b/run") == "s3://b/run/tensorboard"
    setup.LOG_DIR = "gs://logs"
    assert event_dir(setup, "s3://b/run") == "gs://logs/tensorboard"
    setup.EXPERIMENT_LOG_DIR = "/abs/tb"
    assert event_dir(setup, "s3://b/run") == "/abs/tb"


def test_vissl_tensorboard_keys_are_accepted_and_checked():
    base = ["config=pretrain/npid/npid_demo_resnet18"]
    keys = [
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=true",
        "config.HOOKS.TENSORBOARD_SETUP.LOG_DIR=/tmp/tb",
        "config.HOOKS.TENSORBOARD_SETUP.EXPERIMENT_LOG_DIR=exp1",
        "config.HOOKS.TENSORBOARD_SETUP.FLUSH_EVERY_N_MIN=1",
        "config.HOOKS.TENSORBOARD_SETUP.LOG_PARAMS=false",
        "config.HOOKS.TENSORBOARD_SETUP.LOG_PARAMS_GRADIENTS=false",
        "config.HOOKS.TENSORBOARD_SETUP.LOG_PARAMS_EVERY_N_ITERS=-1",
    ]
    cfg, _ = config.load(base + keys)
    assert cfg.HOOKS.TENSORBOARD_SETUP.EXPERIMENT_LOG_DIR == "exp1"
    with pytest.raises(ConfigError, match="FLUSH_EVERY_N_MIN"):
        config.load(base + ["config.HOOKS.TENSORBOARD_SETUP.FLUSH_EVERY_N_MIN=0"])
    with pytest.raises(ConfigError, match="LOG_PARAMS_EVERY_N_ITERS"):
        config.load(base + ["config.HOOKS.TENSORBOARD_SETUP.LOG_PARAMS_EVERY_N_ITERS=0"])


def test_a_failed_upload_is_a_warning_and_the_next_one_copies_everything(
    tmp_path, monkeypatch, caplog
):
    from pirl import tensorboard
    from pirl.errors import StorageUnavailable

    dest = tmp_path / "tb"
    tb = TensorBoardLog(str(dest))
    tb.add_scalars({"Training/Loss": 1.0}, 1)
    real = storage.write_bytes

    def unavailable(url, data):
        raise StorageUnavailable(f"{url}: the store did not answer")

    monkeypatch.setattr(tensorboard.storage, "write_bytes", unavailable)
    tb.upload()
    assert "could not upload" in caplog.text and not dest.exists()
    monkeypatch.setattr(tensorboard.storage, "write_bytes", real)
    tb.add_scalars({"Training/Loss": 0.5}, 2)
    tb.close()
    assert scalars(read_events(dest), "Training/Loss") == {1: 1.0, 2: 0.5}


def test_events_reach_the_destination_every_flush_period_before_the_end(tmp_path):
    dest = tmp_path / "tb"
    tb = TensorBoardLog(str(dest), flush_every_s=3600)
    tb.add_scalars({"Training/Loss": 1.0}, 1)
    assert not dest.exists()  # not due yet: staged locally only
    tb.flush_every_s = 0  # FLUSH_EVERY_N_MIN has passed
    tb.add_scalars({"Training/Loss": 0.5}, 2)
    assert scalars(read_events(dest), "Training/Loss") == {1: 1.0, 2: 0.5}
    tb.close()
