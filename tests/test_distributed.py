"""Real multi-process training (gloo, 2 ranks): torchrun on one machine, and two "nodes" started
with the environment the Training Operator injects into PyTorchJob pods; resume after SIGKILL,
on local disk and on an S3 server.

Why a 2-rank run's loss is not compared with a 1-rank run at the same global batch: as in VISSL,
BatchNorm statistics are per rank (PyTorch's SyncBatchNorm is GPU-only, so CPU tests cannot turn
it on) and each rank draws its own negatives from its own stream, so the two runs score
different batches of statistics and different negatives. What must hold, and is tested here, is
that every rank sees the same global batch the 1-rank run sees (same sampler order, same
per-sample augmentation), and that every replica of the memory bank and of the weights is
bit-identical after every step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pirl import checkpoint, storage
from pirl.data import rank_indices

from .conftest import free_port, subprocess_env

pytestmark = pytest.mark.slow


def overrides(out: str, data: Path, *extra: str, nodes: int = 1, procs: int = 2) -> list[str]:
    return [
        "config=pretrain/pirl/pirl_demo_resnet18",
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}/train]",
        "config.DATA.TRAIN.DATA_LIMIT=50",  # 25 per rank: not a multiple of the batch
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=16",
        "config.OPTIMIZER.num_epochs=2",
        "config.LOG_FREQUENCY=2",
        f"config.DISTRIBUTED.NUM_NODES={nodes}",
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}",
        "config.DISTRIBUTED.TIMEOUT_SECONDS=120",
        f"config.CHECKPOINT.DIR={out}",
        *extra,
    ]


def torchrun(args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args],
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def local_torchrun(out: str, data: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    port = free_port()
    return torchrun(
        [
            "--nproc-per-node=2",
            f"--master-port={port}",
            "--master-addr=127.0.0.1",
            "-m",
            "pirl.train",
            *overrides(out, data, *extra),
        ],
        env,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def metrics(root: str) -> list[dict]:
    return [
        json.loads(x)
        for x in storage.read_bytes(storage.join(root, "metrics.jsonl")).decode().splitlines()
    ]


def assert_replicas_identical(root: str, expected_saves: int) -> None:
    digests = [r["replica_digests"] for r in metrics(root) if "replica_digests" in r]
    assert len(digests) >= expected_saves
    for d in digests:
        assert len(d["memory"]) == 2 and len(set(d["memory"])) == 1, d
        assert len(set(d["model"])) == 1, d


# as the warnings module prints one: "path:line: Category: message" (a deprecated torch API we
# call may be reported at torch's own wrapper, so the path does not say whose call it was)
DEPRECATION = re.compile(r"\.py:\d+: (FutureWarning|DeprecationWarning): ")


def test_torchrun_two_ranks(tmp_path, digits_folder):
    every_warning = subprocess_env(PYTHONWARNINGS="always")
    tensorboard = "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=true"
    rc, log = finish(local_torchrun(str(tmp_path), digits_folder, tensorboard, env=every_warning))
    assert rc == 0, log
    assert not DEPRECATION.search(log), log  # every warning shown: none about a deprecated API
    assert "50 samples, 2 rank(s) x batch 8 = global batch 16, 4 steps/epoch" in log
    assert_replicas_identical(str(tmp_path), 2)
    _, meta = checkpoint.load_latest(str(tmp_path))
    assert meta["global_step"] == 8
    # only rank 0 writes TensorBoard events: one file
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_two_nodes_with_the_operators_environment(tmp_path, digits_folder):
    """Master-0 and Worker-0 pods, each `torchrun -m pirl.train ...` with no flags: torchrun reads
    the PET_* variables the operator injects (docs/pytorchjob-contract.md#environment)."""
    port = free_port()
    procs = []
    for pod_rank in range(2):
        env = subprocess_env(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE="2",
            RANK=str(pod_rank),
            PET_MASTER_ADDR="127.0.0.1",
            PET_MASTER_PORT=str(port),
            PET_NNODES="2",
            PET_NODE_RANK=str(pod_rank),
            PET_NPROC_PER_NODE="1",
            PYTHONUNBUFFERED="1",
        )
        procs.append(
            torchrun(
                ["-m", "pirl.train", *overrides(str(tmp_path), digits_folder, nodes=2, procs=1)],
                env=env,
            )
        )
    results = [finish(p) for p in procs]
    for rc, log in results:
        assert rc == 0, log
    assert "2 rank(s) x batch 8" in results[0][1]
    assert_replicas_identical(str(tmp_path), 2)


def test_ranks_together_see_the_one_rank_batches():
    one = rank_indices(50, 0, 1, seed=0, epoch=3)
    two = [rank_indices(50, r, 2, seed=0, epoch=3) for r in range(2)]
    assert len(two[0]) == len(two[1]) == 25
    for step in range(3):  # global batch 16 = 2 ranks x 8
        global_two = set(two[0][step * 8 : step * 8 + 8]) | set(two[1][step * 8 : step * 8 + 8])
        assert global_two == set(one[step * 16 : step * 16 + 16])
    assert set(two[0]) | set(two[1]) == set(range(50))


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def kill_a_rank_after_first_checkpoint(root: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not checkpoint.complete(root):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    workers = children(proc.pid)
    assert workers, "torchrun has no worker processes"
    os.kill(workers[-1], signal.SIGKILL)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, digits_folder, store, request):
    if store == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        straight, killed = f"{bucket}/straight", f"{bucket}/killed"
    else:
        straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    extra = ("config.OPTIMIZER.num_epochs=3", "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=2")
    rc, log = finish(local_torchrun(straight, digits_folder, *extra))
    assert rc == 0, log

    proc = local_torchrun(killed, digits_folder, *extra)
    kill_a_rank_after_first_checkpoint(killed, proc)
    rc, log = finish(proc)
    assert rc != 0, "the job finished before the kill: the test did not interrupt anything"
    rc, log = finish(
        local_torchrun(killed, digits_folder, *extra)
    )  # the operator restarts the pods
    assert rc == 0, log
    assert "resumed from checkpoint-" in log

    a, meta_a = checkpoint.load_latest(straight)
    b, meta_b = checkpoint.load_latest(killed)
    assert (
        (meta_a["epoch"], meta_a["global_step"])
        == (meta_b["epoch"], meta_b["global_step"])
        == (3, 12)
    )
    assert torch.equal(a["loss"]["memory.memory"], b["loss"]["memory.memory"])
    assert a["loss"]["z"] == b["loss"]["z"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def _bank_update_worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as tdist

    from pirl.memory import MemoryBank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    bank = MemoryBank(40, 4, momentum=0.0)  # momentum 0: a row becomes its new embedding
    index = torch.tensor([3, 17]) if rank == 0 else torch.tensor([38, 5])
    embeddings = torch.eye(4)[[0, 1]] if rank == 0 else torch.eye(4)[[2, 3]]
    bank.update(embeddings, index)
    out[rank] = bank.memory[[3, 17, 38, 5]].clone()
    tdist.destroy_process_group()


def test_bank_update_gathers_every_ranks_pairs():
    """The one packed all-gather delivers each rank's (embedding, index) pairs intact."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_bank_update_worker, args=(free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.equal(out[rank], torch.eye(4)), rank
