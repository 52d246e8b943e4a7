"""Storage that cannot be used: a full disk, a location without write permission, a missing
bucket, bad or missing credentials, checkpoints none of which verifies. Each is one clear line
naming the URL, a permanent exit code (5 for the output location, 3 for the dataset: the Training
Operator fails the job rather than recreating the pod forever), and nothing is published.

The full disk is a real 1 MiB tmpfs when this process may mount one (root); otherwise ENOSPC is
raised at the OS boundary (os.fsync of files over 1 MiB under that folder). Bad credentials are
checked by a second local S3 server started in IAM mode (moto's INITIAL_NO_AUTH_ACTION_COUNT=0),
which rejects unknown keys as S3 does (403 InvalidAccessKeyId).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import s3fs

from pirl.errors import EXIT_DATA, EXIT_STORAGE
from pirl.train import main as train_main

from .conftest import npid_tiny, start_moto_server

SECRET = "FAKE-SECRET-storage-test-7c1d"


def tiny(root, data, *extra: str) -> list[str]:
    return npid_tiny(root, data, "config.OPTIMIZER.num_epochs=1", *extra)


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """(folder, how): a folder on which writes over 1 MiB fail with ENOSPC."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    if mounted:
        yield mnt, "a 1 MiB tmpfs"
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
        return
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(mnt)) and os.fstat(fd).st_size > (
            1 << 20
        ):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    yield mnt, "ENOSPC from os.fsync (no tmpfs mount allowed here)"


def test_a_full_disk_fails_the_checkpoint_permanently_and_leaves_nothing(
    small_disk, digits_folder, capsys
):
    mnt, how = small_disk
    out = mnt / "run"
    rc = train_main(tiny(out, digits_folder, "config.MAX_STEPS=1"))
    err = capsys.readouterr().err
    assert rc == EXIT_STORAGE, err
    assert f"writing {out}/checkpoints/checkpoint-0000000001.pt" in err, err
    assert "No space left on device" in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    # no checkpoint, partial or temporary file (metrics.jsonl, written before, is whole)
    assert files(out) == ["metrics.jsonl"], f"{how}: left {files(out)}"


@contextmanager
def without_write_permission(path: Path):
    """`path` read-only for this process: chmod 555, and as root (which ignores modes) an
    effective uid of nobody for the duration."""
    path.chmod(0o555)
    root = os.geteuid() == 0
    if root:
        os.setegid(65534)
        os.seteuid(65534)
    try:
        yield
    finally:
        if root:
            os.seteuid(0)
            os.setegid(0)
        path.chmod(0o755)


def test_a_read_only_output_location_is_a_clear_permanent_error(tmp_path, digits_folder, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    with without_write_permission(out):
        rc = train_main(tiny(out / "run", digits_folder))
    err = capsys.readouterr().err
    assert rc == EXIT_STORAGE, err
    assert f"the output location '{out / 'run'}' is not writable" in err
    assert "ermission denied" in err
    assert files(out) == []


def test_a_missing_bucket_is_a_clear_permanent_error(s3_bucket, digits_folder, tmp_path, capsys):
    missing = "s3://no-such-bucket-pirl-test"
    t0 = time.monotonic()
    assert train_main(tiny(f"{missing}/run", digits_folder)) == EXIT_STORAGE
    err = capsys.readouterr().err
    assert f"the output location '{missing}/run' is not writable" in err
    assert "bucket does not exist" in err
    # the dataset in a missing bucket: a data error naming it, before any output is written
    out = tmp_path / "out"
    args = tiny(out, digits_folder)
    args[1:3] = [
        "config.DATA.TRAIN.DATA_SOURCES=[shards]",
        f"config.DATA.TRAIN.DATA_PATHS=[{missing}/ds]",
    ]
    assert train_main(args) == EXIT_DATA
    assert f"no manifest.json at '{missing}/ds'" in capsys.readouterr().err
    assert time.monotonic() - t0 < 30  # permanent errors are not retried
    assert files(out) == []


@pytest.fixture
def iam_s3(monkeypatch):
    """A local S3 server that checks credentials (it knows none, so every key is unknown)."""
    proc, url = start_moto_server(dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"))
    for key, value in {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "AKIAFAKESTORAGETEST0",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()
    proc.terminate()
    proc.wait(timeout=10)


def test_bad_credentials_are_a_clear_permanent_error(iam_s3, digits_folder, capsys):
    url = "s3://pirl-runs/run"
    assert train_main(tiny(url, digits_folder)) == EXIT_STORAGE
    err = capsys.readouterr().err
    assert f"the output location '{url}' is not writable" in err
    assert "permission denied" in err and "Access Key Id you provided does not exist" in err
    assert SECRET not in err


def test_no_credentials_at_all_is_a_clear_permanent_error(
    s3_bucket, digits_folder, monkeypatch, tmp_path, capsys
):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # loopback only: no metadata service
    s3fs.S3FileSystem.clear_instance_cache()
    url = f"{s3_bucket}/run"
    assert train_main(tiny(url, digits_folder)) == EXIT_STORAGE
    err = capsys.readouterr().err
    assert f"the output location '{url}' is not writable" in err
    assert "NoCredentialsError" in err and "Traceback" not in err


def test_checkpoints_none_of_which_verifies_stop_the_run(tmp_path, digits_folder, capsys):
    """Starting over would lose the run silently, and KEEP_LAST would then delete the new
    checkpoints in favour of the unusable, higher-numbered ones: a permanent error instead."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "checkpoint-0000000040.pt").write_bytes(b"not a checkpoint")
    meta = {"file": "checkpoint-0000000040.pt", "size": 16, "sha256": "0" * 64, "global_step": 40}
    (ckpts / "checkpoint-0000000040.json").write_text(json.dumps(meta))
    assert train_main(tiny(tmp_path, digits_folder)) == EXIT_STORAGE
    captured = capsys.readouterr()
    assert "checkpoint-0000000040.pt does not match its checksum" in captured.out
    assert f"{tmp_path}/checkpoints holds checkpoints but none verifies" in captured.err
    assert files(tmp_path) == [
        "checkpoints/checkpoint-0000000040.json",
        "checkpoints/checkpoint-0000000040.pt",
    ]
