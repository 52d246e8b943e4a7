"""One writer per output: a second trainer on a CHECKPOINT.DIR, or a second prep on a DEST, is
refused naming the holder; a crashed holder's lease is taken over; a lost lease stops publishing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pirl import checkpoint, lease, prep
from pirl.errors import EXIT_STORAGE, StorageError
from pirl.train import main as train_main

from ._images import make_clean_folder
from .conftest import npid_tiny, subprocess_env

HOLDER = (
    "import sys; from pirl import lease; lease.acquire(sys.argv[1], 'pirl train'); "
    "print('held', flush=True); sys.stdin.readline()"
)


def hold_in_another_process(root: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, root],
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_crashed_holders_lease_taken_over(
    tmp_path, digits_folder, capsys
):
    src, dest, run = tmp_path / "src", tmp_path / "ds", tmp_path / "run"
    make_clean_folder(src / "train", {"a": 4}, size=(16, 16))
    holders = [hold_in_another_process(str(dest)), hold_in_another_process(str(run))]
    try:
        assert prep.main([str(src), str(dest), "--workers", "1"]) == EXIT_STORAGE
        assert train_main(npid_tiny(run, digits_folder, "config.MAX_STEPS=1")) == EXIT_STORAGE
        err = capsys.readouterr().err
        assert f"the DEST {str(dest)!r} is in use by another writer: pirl train on host" in err
        assert f"pid {holders[0].pid}" in err and f"pid {holders[1].pid}" in err
        assert f"the CHECKPOINT.DIR {str(run)!r} is in use" in err
        assert not (dest / "manifest.json").exists() and not (run / "checkpoints").exists()
    finally:
        for proc in holders:
            proc.send_signal(signal.SIGKILL)  # crashes, leaving its lease behind
            proc.wait(timeout=30)
    assert (dest / lease.NAME).exists()
    assert prep.main([str(src), str(dest), "--workers", "1"]) == 0
    assert train_main(npid_tiny(run, digits_folder, "config.MAX_STEPS=1")) == 0
    assert capsys.readouterr().out.count("taking over the stale lease of pirl train") == 2
    assert not (dest / lease.NAME).exists() and not (run / lease.NAME).exists()  # released


def foreign_lease(root, expires: float) -> None:
    root.mkdir(parents=True, exist_ok=True)
    body = {"owner": "x", "command": "pirl train", "host": "other-node", "pid": 1, "start": 1}
    (root / lease.NAME).write_text(json.dumps({**body, "expires": expires}))


def test_a_lease_from_another_host_blocks_until_it_expires(tmp_path):
    foreign_lease(tmp_path, time.time() + 60)
    with pytest.raises(
        StorageError, match="in use by another writer: pirl train on host other-node"
    ):
        lease.acquire(str(tmp_path), "pirl prep")
    foreign_lease(tmp_path, time.time() - 1)
    lease.acquire(str(tmp_path), "pirl prep").release()


def test_on_s3_the_second_writer_is_refused(s3_bucket):
    first = lease.acquire(f"{s3_bucket}/run", "pirl train")
    with pytest.raises(StorageError, match=f"pid {os.getpid()}, lease expiring"):
        lease.acquire(f"{s3_bucket}/run", "pirl train")
    first.release()
    lease.acquire(f"{s3_bucket}/run", "pirl train").release()


def test_a_lost_lease_publishes_no_checkpoint(tmp_path):
    held = lease.acquire(str(tmp_path), "pirl train")
    try:
        foreign_lease(tmp_path, time.time() + 60)  # another writer took it over
        with pytest.raises(StorageError, match="lost the lease"):
            checkpoint.save(
                str(tmp_path),
                {"w": torch.zeros(1)},
                epoch=0,
                step_in_epoch=1,
                global_step=1,
                keep_last=1,
            )
        assert checkpoint.complete(str(tmp_path)) == []
    finally:
        held.release()
