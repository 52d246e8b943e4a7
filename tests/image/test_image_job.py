"""The demo's PyTorchJob (Master + 1 Worker, restartPolicy ExitCode) as two containers of the
image, one per replica, each with exactly the environment the operator gives its pod
(`ContainerJob`: the local runner's pods as `podman run`), the checkpoints on a folder mounted
into both (a ReadWriteMany volume). `podman kill` of the Worker's container after the first
checkpoint: it exits 137 (retryable), is recreated, the Master sees the lost peer (129) and is
recreated too, and the job finishes resumed from the checkpoint."""

from __future__ import annotations

import io
import os
import time

import pytest

from pipeline.jobspec import job_spec
from pipeline.pytorchjob import build_pytorchjob, trainer_args

from .podman import ContainerJob, podman

pytestmark = [pytest.mark.image, pytest.mark.slow]

SHARED = "/shared"  # where the volume is mounted in every pod


def test_killed_worker_container_is_restarted_and_the_job_resumes(image, tmp_path):
    from pirl.data.demo import write_digits_folder

    store = tmp_path / "store"
    write_digits_folder(str(store / "digits"), size=32)
    for path in [store, *store.rglob("*")]:
        os.chown(path, 1000, 1000)
    args = trainer_args(
        "pretrain/pirl/pirl_demo_resnet18",
        num_nodes=2,
        nproc_per_node=1,
        dataset_url=f"{SHARED}/digits/train",
        checkpoint_dir=f"{SHARED}/ckpt",
        data_source="disk_folder",
        overrides=[
            "config.DATA.TRAIN.DATA_LIMIT=128",
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
            "config.DATA.NUM_DATALOADER_WORKERS=1",  # its batches cross /dev/shm
            "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=64",
            "config.OPTIMIZER.num_epochs=3",
            "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=2",
            "config.DISTRIBUTED.TIMEOUT_SECONDS=60",
            "config.LOG_FREQUENCY=1",
        ],
    )
    spec = build_pytorchjob(
        job_spec(
            name="image-kill",
            namespace="",
            image=image,
            args=args,
            num_nodes=2,
            env={"OMP_NUM_THREADS": "1"},
            active_deadline_seconds=900,
        )
    )
    job = ContainerJob(spec, image=image, volumes={str(store): SHARED}, out=io.StringIO())
    worker = job.container_name("worker-0")
    try:
        job.start()
        end = time.monotonic() + 600
        while not list((store / "ckpt" / "checkpoints").glob("*.json")):
            assert time.monotonic() < end, job.out.getvalue()[-3000:]
            assert job._step() is None, job.out.getvalue()[-3000:]
            time.sleep(0.5)
        podman("kill", "--signal=KILL", worker)
        result = job.wait()
    finally:
        for pod in job.pods:
            podman("rm", "--force", "--ignore", job.container_name(pod.name), check=False)
    log = job.out.getvalue()
    assert result.succeeded, log[-4000:]
    assert result.exit_codes["worker-0"][0] == 137 and result.restarts["worker-0"] >= 1, log[-4000:]
    assert "resumed from" in log
    assert (store / "ckpt" / "trunk.safetensors").exists()
    # the pods ran as the image's user, on the operator's environment only
    assert {p.stat().st_uid for p in (store / "ckpt").rglob("*")} == {1000}
    master_env = job.pods[0].command
    assert "--env=PET_NNODES=2" in master_env and "--env=PET_NODE_RANK=0" in master_env
    assert not any(a.startswith(("--env=PATH=", "--env=HOME=")) for a in master_env)
