"""Shared fixtures: a real S3 server (moto's, as a separate process on 127.0.0.1) and tiny configs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto_server(env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port of 127.0.0.1, started and answering; (process, URL)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("moto server did not start within 30 s")


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start `moto_server` on 127.0.0.1 for the whole session; yields its endpoint URL."""
    proc, url = start_moto_server()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket on the local S3 server; the AWS_* variables point every client (s3fs in this
    process and in the trainer's subprocesses) at it. Yields 's3://<bucket>'."""
    import s3fs

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """The demo's real images as an ImageFolder: <root>/{train,val}/<digit>/<n>.png."""
    from pirl.data.demo import write_digits_folder

    root = tmp_path_factory.mktemp("digits")
    write_digits_folder(str(root), size=32)
    return root


def first_limited_image(folder: Path, limit: int) -> Path:
    """The path of the first image of an ImageFolder that DATA_LIMIT=limit selects (seed 0)."""
    from torchvision.datasets import ImageFolder

    from pirl.data import limited_subset

    samples = ImageFolder(str(folder)).samples
    return Path(samples[limited_subset(len(samples), limit, seed=0)[0]][0])


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for trainer subprocesses: this one, repo on the path, 1 thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def plant_checkpoint(checkpoints: Path, step: int, data: bytes) -> None:
    """Write `data` as checkpoint `step` with a sidecar that matches it, as someone with write
    access to the store could: the sha256 check passes, only safe loading stands in the way."""
    import hashlib
    import json

    name = f"checkpoint-{step:010d}"
    (checkpoints / f"{name}.pt").write_bytes(data)
    meta = {
        "file": f"{name}.pt",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "epoch": step,
        "step_in_epoch": 0,
        "global_step": step,
    }
    (checkpoints / f"{name}.json").write_text(json.dumps(meta))


def npid_tiny(root, data, *extra: str) -> list[str]:
    """Overrides for a seconds-long NPID run on the demo images (2 steps per epoch)."""
    return [
        "config=pretrain/npid/npid_demo_resnet18",
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}/train]",
        "config.DATA.TRAIN.DATA_LIMIT=16",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8",
        f"config.CHECKPOINT.DIR={root}",
        *extra,
    ]
