"""Object-store faults: tests/fault_proxy.py between the code and the local S3 server drops
connections, stalls, cuts responses short and answers HTTP 500/503 during manifest reads, shard
reads, checkpoint writes and prep's writes.

- reads retry with a doubling backoff and give up after a bounded time, with a retryable error;
- a failed checkpoint write (data object or sidecar) never replaces the last good checkpoint;
- a resume never loads a partial or corrupted checkpoint: it falls back to the previous good one
  and says so, and the run still ends bit-identical to a run without faults.

Retry layers (docs/failure-handling.md): botocore retries each request (here AWS_RETRY_MODE=
standard, AWS_MAX_ATTEMPTS=2, and s3fs timeouts of 2 s), pirl.storage.retry retries each call
(here a first delay of 0.05 s instead of 0.5 s); s3fs's own loop is off (storage.S3FS_RETRIES).
"""

from __future__ import annotations

import logging
import re
import time

import pytest
import s3fs
import torch

from pirl import checkpoint, prep, storage
from pirl.data.shards import ShardTrainData
from pirl.errors import EXIT_RETRYABLE, StorageUnavailable
from pirl.train import main as train_main
from pirl.transforms import collate_single_view

from ._images import make_clean_folder
from .fault_proxy import FaultProxy

DELAY = 0.05
# one storage call that keeps failing: 5 tries x 2 requests, backoff 0.05 + 0.1 + 0.2 + 0.4 s,
# botocore's jittered backoff between its 2 tries; a stalled request costs the 2 s read timeout
PERSISTENT_BOUND = 15.0


@pytest.fixture
def proxy(s3_bucket, monkeypatch):
    """A FaultProxy in front of the S3 server; every client in this process goes through it."""
    monkeypatch.setattr(storage, "RETRY_FIRST_DELAY", DELAY)
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setattr(s3fs.S3FileSystem, "read_timeout", 2)
    monkeypatch.setattr(s3fs.S3FileSystem, "connect_timeout", 2)
    import os

    p = FaultProxy(os.environ["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    s3fs.S3FileSystem.clear_instance_cache()
    yield p
    p.close()
    s3fs.S3FileSystem.clear_instance_cache()


def retry_delays(caplog) -> list[float]:
    return [float(x) for x in re.findall(r"; retry \d+/\d+ in ([\d.]+) s", caplog.text)]


# ---------------------------------------------------------------- one read


@pytest.mark.parametrize(
    "action,kw",
    [
        ("503", {}),
        ("500", {}),
        ("drop", {}),
        ("reset", {}),
        ("truncate", {"limit": 3000}),
        ("stall", {"seconds": 10}),  # longer than the read timeout
    ],
)
def test_a_read_retries_transient_faults_with_backoff(
    proxy, s3_bucket, caplog, monkeypatch, action, kw
):
    url = f"{s3_bucket}/blob"
    data = bytes(range(256)) * 2000
    storage.write_bytes(url, data)
    if action == "stall":  # each stalled request costs a read timeout: make it 1 s
        monkeypatch.setattr(s3fs.S3FileSystem, "read_timeout", 1)
        s3fs.S3FileSystem.clear_instance_cache()
    proxy.add(action, method="GET", path="/blob", times=3, **kw)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pirl"):
        assert storage.read_bytes(url) == data
    took = time.monotonic() - t0
    assert len(proxy.faulted()) == 3
    assert took < PERSISTENT_BOUND
    delays = retry_delays(caplog)  # storage-level retries (botocore absorbed the others)
    assert delays == [DELAY * 2**i for i in range(len(delays))]


@pytest.mark.parametrize("action", ["503", "drop"])
def test_a_read_that_keeps_failing_gives_up_in_bounded_time_and_is_retryable(
    proxy, s3_bucket, caplog, action
):
    url = f"{s3_bucket}/blob"
    storage.write_bytes(url, b"x" * 100)
    proxy.add(action, method="GET", times=None)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pirl"):
        with pytest.raises(StorageUnavailable) as err:
            storage.read_bytes(url)
    took = time.monotonic() - t0
    assert took < PERSISTENT_BOUND
    assert err.value.exit_code == EXIT_RETRYABLE
    assert f"reading {url}: the store kept failing, 5 attempt(s)" in str(err.value)
    assert retry_delays(caplog) == [0.05, 0.1, 0.2, 0.4]
    # storage tries x botocore tries (x 2 for a dropped GET: aiohttp sends it again once)
    assert 5 * 2 <= len(proxy.faulted()) <= 5 * 2 * 2


def test_shard_reads_survive_faults_and_a_dead_store_is_retryable(proxy, s3_bucket, tmp_path):
    src = tmp_path / "src"
    make_clean_folder(src / "train", {"a": 6, "b": 6})
    url = f"{s3_bucket}/ds"
    assert prep.main([str(src), url, "--shard-size", "4", "--workers", "1"]) == 0

    def epoch() -> list[int]:
        data = ShardTrainData(
            url,
            transform=lambda img: torch.zeros(1),
            collate=collate_single_view("data"),
            batch_size=4,
            shuffle_buffer=4,
        )
        return [i for b in data.batches(0) for i in b["index"].tolist()]

    clean = epoch()
    proxy.add("503", method="GET", path="manifest.json", times=2)
    proxy.add("drop", method="GET", path=r"shard-000000\.tar", times=2)
    proxy.add("truncate", method="GET", path=r"shard-000001\.tar", times=1, limit=500)
    proxy.add("500", method="GET", path=r"shard-000002\.tar", times=2)
    assert epoch() == clean
    assert all(r.hits == r.times for r in proxy.rules)

    proxy.clear()
    proxy.add("reset", method="GET", path=r"shard-", times=None)
    with pytest.raises(StorageUnavailable, match=r"shard-00000\d\.tar: the store kept failing"):
        epoch()


# ---------------------------------------------------------------- the trainer, end to end


def run_args(ckpt: str, data: str, *extra: str) -> list[str]:
    return [
        "config=pretrain/npid/npid_demo_resnet18",
        "config.DATA.TRAIN.DATA_SOURCES=[shards]",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8",
        "config.OPTIMIZER.num_epochs=3",
        "config.LOG_FREQUENCY=1",
        "config.CHECKPOINT.KEEP_LAST=2",
        f"config.CHECKPOINT.DIR={ckpt}",
        *extra,
    ]


def published(root: str) -> list[int]:
    return [m["global_step"] for m in checkpoint.complete(root)]


def test_a_failed_checkpoint_write_never_replaces_the_last_good_one(proxy, s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)
    root = f"{s3_bucket}/run"
    state = {"w": torch.arange(4.0), "epoch": 1}
    checkpoint.save(root, state, epoch=1, step_in_epoch=0, global_step=1, keep_last=2)
    proxy.add("503", method="PUT", path=r"checkpoint-0000000002\.pt", times=None)
    with pytest.raises(StorageUnavailable, match=r"checkpoint-0000000002\.pt: the store kept"):
        checkpoint.save(root, state, epoch=2, step_in_epoch=0, global_step=2, keep_last=2)
    proxy.clear()
    proxy.add("500", method="PUT", path=r"checkpoint-0000000002\.json", times=None)
    with pytest.raises(StorageUnavailable, match=r"checkpoint-0000000002\.json: the store kept"):
        checkpoint.save(root, state, epoch=2, step_in_epoch=0, global_step=2, keep_last=2)
    proxy.clear()
    # the data object of 2 is there, unpublished; 1 is still the newest complete checkpoint
    assert "checkpoint-0000000002.pt" in storage.list_names(f"{root}/checkpoints")
    assert published(root) == [1]
    assert checkpoint.load_latest(root)[1]["global_step"] == 1


def test_checkpoint_write_faults_and_a_corrupt_newest_on_s3(proxy, s3_bucket, tmp_path, capsys):
    """16 samples, 2 steps per epoch, 3 epochs: checkpoints at steps 2, 4, 6.
    run 1: every PUT of checkpoint 6's sidecar fails -> exit 129; 6's data object is there but
           unpublished, the newest complete checkpoint is 4. Then 4's bytes are flipped.
    run 2: transient faults on every kind of request; it resumes from 2 (not the corrupt 4, and
           says so), finishes, and ends bit-identical to a run without faults."""
    src = tmp_path / "src"
    make_clean_folder(src / "train", {"a": 8, "b": 8}, size=(48, 48))
    data = f"{s3_bucket}/ds"
    proxy.add("503", method="PUT", path=r"shard-000000\.tar", times=2)
    proxy.add("drop", method="PUT", path="manifest.json", times=1)
    assert prep.main([str(src), data, "--shard-size", "8", "--workers", "1"]) == 0
    assert all(r.hits == r.times for r in proxy.rules)
    proxy.clear()

    # the uninterrupted run: its final checkpoint only, on local disk (saving changes nothing)
    straight, run = str(tmp_path / "straight"), f"{s3_bucket}/run"
    assert train_main(run_args(straight, data, "config.CHECKPOINT.CHECKPOINT_FREQUENCY=3")) == 0

    # ---- run 1: checkpoint 6's sidecar cannot be written
    proxy.add("503", method="PUT", path=r"checkpoint-0000000006\.json", times=None)
    t0 = time.monotonic()
    assert train_main(run_args(run, data)) == EXIT_RETRYABLE
    assert time.monotonic() - t0 < 60
    err = capsys.readouterr().err
    assert f"writing {run}/checkpoints/checkpoint-0000000006.json: the store kept failing" in err
    assert published(run) == [2, 4]
    assert "checkpoint-0000000006.pt" in storage.list_names(f"{run}/checkpoints")
    assert checkpoint.load_latest(run)[1]["global_step"] == 4

    # ---- flip bytes in the newest published checkpoint
    url = f"{run}/checkpoints/checkpoint-0000000004.pt"
    raw = bytearray(storage.read_bytes(url))
    raw[len(raw) // 2] ^= 0xFF
    storage.write_bytes(url, bytes(raw))

    # ---- run 2: transient faults everywhere; resumes from 2, finishes
    proxy.clear()
    rules = [
        proxy.add("503", method="GET", path="manifest.json", times=1),
        proxy.add("drop", method="GET", path=r"shard-000000\.tar", times=2),
        proxy.add("truncate", method="GET", path=r"shard-000001\.tar", times=1, limit=2000),
        proxy.add("500", method="GET", path=r"checkpoint-0000000002\.pt", times=1),
        proxy.add("503", method="GET", path=r"list-type=2", times=1),  # a listing
        proxy.add("reset", method="PUT", path=r"checkpoint-0000000004\.pt", times=1),
        proxy.add("stall", method="PUT", path=r"checkpoint-0000000006\.json", times=1, seconds=5),
        proxy.add("503", method="PUT", path="metrics.jsonl", times=2),
        proxy.add("drop", method="PUT", path="trunk.safetensors", times=1),
    ]
    assert train_main(run_args(run, data)) == 0
    out = capsys.readouterr().out
    assert "checkpoint-0000000004.pt does not match its checksum" in out
    assert "resumed from checkpoint-0000000002.pt" in out
    missed = [r for r in rules if r.hits < r.times]
    assert not missed, missed
    proxy.clear()

    a, meta_a = checkpoint.load_latest(straight)
    b, meta_b = checkpoint.load_latest(run)
    assert meta_a["global_step"] == meta_b["global_step"] == 6
    assert torch.equal(a["loss"]["memory.memory"], b["loss"]["memory.memory"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert published(run) == [4, 6]
    assert storage.list_names(f"{run}/checkpoints") == [
        f"checkpoint-{s:010d}.{x}" for s in (4, 6) for x in ("json", "pt")
    ]


def test_a_dead_store_at_the_manifest_is_retryable(proxy, s3_bucket, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)
    src = tmp_path / "src"
    make_clean_folder(src / "train", {"a": 8, "b": 8})
    data = f"{s3_bucket}/ds"
    assert prep.main([str(src), data, "--shard-size", "8", "--workers", "1"]) == 0
    proxy.add("503", method="GET", path="manifest.json", times=None)
    rc = train_main(run_args(f"{s3_bucket}/run", data))
    err = capsys.readouterr().err
    assert f"{data}/manifest.json" in err and "the store kept failing" in err
    assert rc == EXIT_RETRYABLE
