"""The local runner runs a PyTorchJob spec as the operator would: the pods' environment, restart
policies (ExitCode: >=128 recreated, 1-127 fail the job), Master exit 0 = Succeeded, deadline.

The pods here run a small script instead of the trainer (fast); the last test runs real torchrun
(slow) to check that the injected environment is what torchrun needs.
"""

from __future__ import annotations

import io
import json
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.jobspec import job_spec
from pipeline.local_runner import LocalJob, exit_code, local_command, retryable, run_pytorchjob
from pipeline.pytorchjob import build_pytorchjob

REPLICA = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    d = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    keys = [k for k in os.environ if k.startswith(("PET_", "MASTER_", "TEST_"))]
    keys += ["RANK", "WORLD_SIZE", "PYTHONUNBUFFERED"]
    (d / f"env-{rank}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
    print(f"hello from rank {rank}", flush=True)
    mode = os.environ.get("TEST_MODE", "ok")

    def wait_for(name, timeout=60):
        end = time.time() + timeout
        while not (d / name).exists():
            if time.time() > end:
                sys.exit(1)
            time.sleep(0.05)

    if mode == "restart":  # worker: first life waits to be killed, second life exits 0
        if rank == 0:
            wait_for("worker-restarted")
        elif (d / "worker-started").exists():
            (d / "worker-restarted").touch()
        else:
            (d / "worker-started").touch()
            time.sleep(600)
    elif mode == "exit":  # worker exits with TEST_CODE (once, if TEST_ONCE), master waits
        if rank == 0:
            wait_for("worker-done")
        elif os.environ.get("TEST_ONCE") and (d / "worker-failed").exists():
            (d / "worker-done").touch()
        else:
            (d / "worker-failed").touch()
            sys.exit(int(os.environ["TEST_CODE"]))
    elif mode == "hang":
        time.sleep(600)
    elif rank == 0:  # ok: the job succeeds when the master exits, so it waits for every pod
        for r in range(int(os.environ["PET_NNODES"])):
            wait_for(f"env-{r}.json")
    """
)


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "replica.py"
    path.write_text(REPLICA)
    return path


def make_job(script: Path, tmp_path: Path, *, nodes=2, policy="ExitCode", env=None, **kwargs):
    return build_pytorchjob(
        job_spec(
            name="local-test",
            namespace="",
            image="unused",
            command=["python"],
            args=[str(script), str(tmp_path)],
            num_nodes=nodes,
            restart_policy=policy,
            env=env,
            **kwargs,
        )
    )


def started(job: LocalJob, marker: Path, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not marker.exists():
        assert time.monotonic() < end, f"{marker} did not appear"
        assert job._step() is None, "the job ended early"
        time.sleep(0.05)


def test_exit_code_mapping():
    assert exit_code(-9) == 137 and exit_code(-15) == 143 and exit_code(3) == 3
    assert retryable("ExitCode", 137) and retryable("ExitCode", 129)
    assert not retryable("ExitCode", 1) and not retryable("ExitCode", 127)
    assert retryable("OnFailure", 1) and not retryable("Never", 137)


def test_local_command_maps_torchrun_and_python():
    assert local_command(["torchrun", "-m", "x"], "/py") == [
        "/py",
        "-m",
        "torch.distributed.run",
        "-m",
        "x",
    ]
    assert local_command(["python", "-m", "pipeline.torchrun"], "/py") == [
        "/py",
        "-m",
        "pipeline.torchrun",
    ]
    assert local_command(["/bin/echo", "hi"], "/py") == ["/bin/echo", "hi"]


def test_pods_get_the_operators_environment(script, tmp_path):
    job = make_job(script, tmp_path, nodes=3, env={"TEST_MODE": "ok"}, nproc_per_node=4)
    out = io.StringIO()
    base = {
        "PATH": "/usr/bin:/bin",
        "RANK": "7",
        "PET_NNODES": "9",
        "MASTER_PORT": "1",
        "HOME": "/h",
    }
    result = LocalJob(job, out=out, base_env=base).run()
    assert result.succeeded, out.getvalue()
    envs = [json.loads((tmp_path / f"env-{r}.json").read_text()) for r in range(3)]
    port = envs[0]["MASTER_PORT"]
    assert port != "1" and port == envs[0]["PET_MASTER_PORT"]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["PET_NODE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "12"  # 3 pods x nprocPerNode 4
        assert env["PET_NNODES"] == "3" and env["PET_NPROC_PER_NODE"] == "4"
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "localhost"
        assert env["MASTER_PORT"] == port and env["PYTHONUNBUFFERED"] == "1"
        assert env["TEST_MODE"] == "ok"  # the container's env
    text = out.getvalue()
    assert "[master-0] hello from rank 0" in text and "[worker-1] hello from rank 2" in text


def test_sigkilled_replica_is_recreated_and_the_job_succeeds(script, tmp_path):
    job = LocalJob(make_job(script, tmp_path, env={"TEST_MODE": "restart"}), out=io.StringIO())
    job.start()
    started(job, tmp_path / "worker-started")
    job.kill_pod("worker-0", signal.SIGKILL)  # an OOM kill: exit 137, retryable under ExitCode
    result = job.wait()
    assert result.succeeded, job.out.getvalue()
    assert result.exit_codes["worker-0"][0] == 137  # then 0, unless the Master ended first
    assert result.restarts == {"master-0": 0, "worker-0": 1}
    assert "worker-0 exited 137 (retryable under restartPolicy ExitCode)" in job.out.getvalue()


@pytest.mark.parametrize("code", [129, 143])
def test_retryable_exit_code_restarts_the_pod(script, tmp_path, code):
    env = {"TEST_MODE": "exit", "TEST_CODE": str(code), "TEST_ONCE": "1"}
    result = LocalJob(make_job(script, tmp_path, env=env), out=io.StringIO()).run()
    assert result.succeeded
    assert result.exit_codes["worker-0"][0] == code and result.restarts["worker-0"] == 1


def test_permanent_exit_code_fails_the_job(script, tmp_path):
    env = {"TEST_MODE": "exit", "TEST_CODE": "3"}
    t0 = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"worker-0 exited 3 \(permanent under restartPolicy ExitCode\)"
    ):
        run_pytorchjob(make_job(script, tmp_path, env=env), out=io.StringIO(), grace_seconds=2)
    assert time.monotonic() - t0 < 30  # the master (waiting forever) was stopped


def test_never_policy_fails_on_a_kill(script, tmp_path):
    job = LocalJob(
        make_job(script, tmp_path, policy="Never", env={"TEST_MODE": "restart"}), out=io.StringIO()
    )
    job.start()
    started(job, tmp_path / "worker-started")
    job.kill_pod("worker-0")
    result = job.wait()
    assert not result.succeeded and "worker-0 exited 137" in result.message


def test_on_failure_policy_counts_against_backoff_limit(script, tmp_path):
    env = {"TEST_MODE": "exit", "TEST_CODE": "1"}
    job = make_job(script, tmp_path, policy="OnFailure", env=env, backoff_limit=2)
    result = LocalJob(job, out=io.StringIO(), grace_seconds=2).run()
    assert result.reason == "BackoffLimitExceeded"
    assert result.exit_codes["worker-0"] == [1, 1, 1] and result.restarts["worker-0"] == 2


def test_active_deadline_fails_the_job(script, tmp_path):
    job = make_job(script, tmp_path, env={"TEST_MODE": "hang"}, active_deadline_seconds=1)
    result = LocalJob(job, out=io.StringIO(), grace_seconds=2).run()
    assert result.status == "Failed" and result.reason == "DeadlineExceeded"
    assert result.seconds < 20


TORCH_SCRIPT = textwrap.dedent(
    """
    import os, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.ones(1) * dist.get_rank()
    dist.all_reduce(t)
    print(f"rank {dist.get_rank()}/{dist.get_world_size()} local {os.environ['LOCAL_RANK']} sum {int(t.item())}")
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("command", [["torchrun"], ["python", "-m", "pipeline.torchrun"]])
def test_real_torchrun_reads_the_injected_environment(tmp_path, command):
    """2 pods x 2 processes: torchrun gets nnodes, node rank, nproc and the master from PET_*."""
    script = tmp_path / "ddp.py"
    script.write_text(TORCH_SCRIPT)
    job = build_pytorchjob(
        job_spec(
            name="ddp-test",
            namespace="",
            image="unused",
            command=command,
            args=[str(script)],
            num_nodes=2,
            nproc_per_node=2,
            active_deadline_seconds=240,
            env={"OMP_NUM_THREADS": "1"},
        )
    )
    out = io.StringIO()
    result = LocalJob(job, out=out).run()
    assert result.succeeded, out.getvalue()
    for rank in range(4):
        assert f"rank {rank}/4 local {rank % 2} sum 6" in out.getvalue()
    assert sys.executable  # the pods ran this interpreter


@pytest.mark.slow
def test_real_trainer_survives_a_killed_worker(digits_folder, tmp_path):
    """The pretraining PyTorchJob itself: SIGKILL the Worker after the first checkpoint; it is
    recreated (137), the Master sees a lost peer (129) and is recreated too, both resume from the
    checkpoint and the job Succeeds."""
    from pipeline.pytorchjob import trainer_args

    ckpt = tmp_path / "ckpt"
    args = trainer_args(
        "pretrain/pirl/pirl_demo_resnet18",
        num_nodes=2,
        nproc_per_node=1,
        dataset_url=str(digits_folder / "train"),
        checkpoint_dir=str(ckpt),
        data_source="disk_folder",
        overrides=[
            "config.DATA.TRAIN.DATA_LIMIT=128",
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
            "config.DATA.NUM_DATALOADER_WORKERS=0",
            "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=64",
            "config.OPTIMIZER.num_epochs=3",
            "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=2",
            "config.DISTRIBUTED.TIMEOUT_SECONDS=60",
            "config.LOG_FREQUENCY=1",
        ],
    )
    spec = build_pytorchjob(
        job_spec(
            name="trainer-kill",
            namespace="",
            image="unused",
            args=args,
            num_nodes=2,
            env={"OMP_NUM_THREADS": "1"},
            active_deadline_seconds=600,
        )
    )
    job = LocalJob(spec, out=io.StringIO())
    job.start()
    end = time.monotonic() + 400
    while not list((ckpt / "checkpoints").glob("*.pt")):
        assert time.monotonic() < end, job.out.getvalue()[-3000:]
        assert job._step() is None, job.out.getvalue()[-3000:]
        time.sleep(0.2)
    job.kill_pod("worker-0", signal.SIGKILL)
    result = job.wait()
    log = job.out.getvalue()
    assert result.succeeded, log[-3000:]
    assert result.exit_codes["worker-0"][0] == 137 and result.restarts["worker-0"] >= 1
    assert "resumed from" in log
    assert (ckpt / "trunk.safetensors").exists()
