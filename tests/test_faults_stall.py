"""A stalled object store: its server frozen with SIGSTOP (it accepts connections and answers
nothing, which the backends' read timeouts do not cover for uploads).

- every store call (read, write, list, delete, exists) ends within its deadline with a retryable
  error, and works again once the server is thawed;
- a trainer whose store freezes during a checkpoint upload, or during a shard read, exits 129 in
  bounded time; one that gets SIGTERM during a frozen upload exits 143 at once; nothing is
  half-published, and the next start resumes and finishes.
The bounds are shortened here (storage.CALL_TIMEOUT_SECONDS, RETRY_MAX_SECONDS); the defaults
and the worst cases are in docs/failure-handling.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import s3fs

from pirl import checkpoint, prep, storage
from pirl.errors import EXIT_RETRYABLE, EXIT_TERMINATED, StorageUnavailable

from ._images import make_clean_folder
from .conftest import S3_ENV, start_moto_server, subprocess_env
from .fault_proxy import FaultProxy

pytestmark = pytest.mark.slow

CALL_TIMEOUT = 2.0
RETRY_SECONDS = 2.0
# a call's deadline (RETRY_SECONDS + one try) plus the slack a loaded 2-core machine needs
BOUND = RETRY_SECONDS + CALL_TIMEOUT + 3.0


@dataclass
class Store:
    server: subprocess.Popen
    proxy: FaultProxy
    bucket: str
    env: dict[str, str]

    def freeze(self) -> None:
        os.kill(self.server.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.server.pid, signal.SIGCONT)


@pytest.fixture
def store(monkeypatch):
    """A private S3 server (so that it can be frozen) behind a FaultProxy, with short bounds."""
    server, endpoint = start_moto_server()
    proxy = FaultProxy(endpoint)
    env = {
        **S3_ENV,
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_RETRY_MODE": "standard",
        "AWS_MAX_ATTEMPTS": "2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(storage, "CALL_TIMEOUT_SECONDS", CALL_TIMEOUT)
    monkeypatch.setattr(storage, "RETRY_MAX_SECONDS", RETRY_SECONDS)
    monkeypatch.setattr(storage, "RETRY_FIRST_DELAY", 0.05)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bkt")
    yield Store(server, proxy, "s3://bkt", env)
    os.kill(server.pid, signal.SIGCONT)
    server.terminate()
    server.wait(timeout=10)
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()


def test_every_store_call_on_a_frozen_store_ends_in_bounded_time(store):
    url = f"{store.bucket}/blob"
    storage.write_bytes(url, b"x" * 1000)
    store.freeze()
    calls = {
        "read": lambda: storage.read_bytes(url),
        "write": lambda: storage.write_bytes(f"{store.bucket}/new", b"y" * (1 << 20)),
        "list": lambda: storage.list_names(store.bucket),
        "delete": lambda: storage.remove(url),
        "exists": lambda: storage.exists(f"{store.bucket}/other"),
    }
    took = {}
    for name, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable, match="the store kept failing"):
            call()
        took[name] = time.monotonic() - t0
    print("seconds to StorageUnavailable on a frozen store:", took)
    assert all(t < BOUND for t in took.values()), took
    store.thaw()  # the abandoned calls may still complete now (the delete, the write)
    storage.write_bytes(url, b"z")
    assert storage.read_bytes(url) == b"z"


# a trainer with this test's bounds (a module-level setting cannot be passed on the command line)
RUNNER = (
    "import sys; from pirl import storage; "
    "storage.CALL_TIMEOUT_SECONDS = {call}; storage.RETRY_MAX_SECONDS = {retry}; "
    "storage.RETRY_FIRST_DELAY = 0.05; "
    "from pirl.train import main; sys.exit(main(sys.argv[1:]))"
)


def start_trainer(store: Store, data: str, run: str, *, call_timeout: float) -> subprocess.Popen:
    args = [
        "config=pretrain/npid/npid_demo_resnet18",
        "config.DATA.TRAIN.DATA_SOURCES=[shards]",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8",
        "config.OPTIMIZER.num_epochs=3",
        f"config.CHECKPOINT.DIR={run}",
    ]
    code = RUNNER.format(call=call_timeout, retry=RETRY_SECONDS)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=subprocess_env(**store.env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, out


def freeze_on(store: Store, method: str, path: str) -> dict:
    """Freeze the server when the first request matching (method, path) arrives."""
    frozen: dict = {"event": threading.Event()}

    def hook() -> None:
        store.freeze()
        frozen["at"] = time.monotonic()
        frozen["event"].set()

    store.proxy.add("pass", method=method, path=path, times=1, hook=hook)
    return frozen


def published(run: str) -> list[int]:
    return [m["global_step"] for m in checkpoint.complete(run)]


def test_a_trainer_on_a_frozen_store_exits_129_or_143_in_bounded_time_then_resumes(store, tmp_path):
    """16 samples, 2 steps per epoch, 3 epochs: checkpoints at steps 2, 4, 6."""
    src = tmp_path / "src"
    make_clean_folder(src / "train", {"a": 8, "b": 8}, size=(48, 48))
    data, run = f"{store.bucket}/ds", f"{store.bucket}/run"
    assert prep.main([str(src), data, "--shard-size", "8", "--workers", "1"]) == 0
    exits = {}

    # 1. frozen during the upload of checkpoint 2: exit 129, nothing published
    frozen = freeze_on(store, "PUT", r"checkpoint-0000000002\.pt")
    rc, out = finish(start_trainer(store, data, run, call_timeout=CALL_TIMEOUT))
    exits["checkpoint upload"] = time.monotonic() - frozen["at"]
    assert rc == EXIT_RETRYABLE, out
    assert "checkpoint-0000000002.pt: the store kept failing" in out
    store.thaw()
    assert published(run) == []

    # 2. frozen during a shard read: exit 129
    store.proxy.clear()
    frozen = freeze_on(store, "GET", r"shard-000000\.tar")
    rc, out = finish(start_trainer(store, data, run, call_timeout=CALL_TIMEOUT))
    exits["shard read"] = time.monotonic() - frozen["at"]
    assert rc == EXIT_RETRYABLE, out
    assert "shard-000000.tar: the store kept failing" in out
    store.thaw()

    # 3. SIGTERM during a frozen upload of checkpoint 4 (first the run publishes 2), with a
    #    call timeout far beyond any grace period: only the interrupt can end it in time
    store.proxy.clear()
    frozen = freeze_on(store, "PUT", r"checkpoint-0000000004\.pt")
    proc = start_trainer(store, data, run, call_timeout=600.0)
    assert frozen["event"].wait(180), "the trainer never uploaded checkpoint 4"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    rc, out = finish(proc)
    exits["SIGTERM during the upload"] = time.monotonic() - t_term
    assert rc == EXIT_TERMINATED, out
    assert "checkpoint-0000000004.pt: stopped, SIGTERM received" in out
    store.thaw()
    assert published(run) == [2]

    # 4. the store is back: the run resumes from 2 and finishes
    store.proxy.clear()
    rc, out = finish(start_trainer(store, data, run, call_timeout=CALL_TIMEOUT))
    assert rc == 0, out
    assert "resumed from checkpoint-0000000002.pt" in out
    assert published(run)[-1] == 6
    print("seconds from the freeze (or SIGTERM) to the exit:", exits)
    # an upload's tries get more time per byte; + 5 s for the trainer's exit on a busy machine
    size = checkpoint.complete(run)[-1]["size"]
    assert exits["checkpoint upload"] < BOUND + size / storage.MIN_BYTES_PER_SECOND + 5
    assert exits["shard read"] < BOUND + 5
    assert exits["SIGTERM during the upload"] < 10
