"""The local runner runs a TrainJob on its TrainingRuntime as Trainer v2 would: each node's
environment is exactly the torch plugin's (plus the Indexed Job's completion index), permanent
exit codes fail the run at once (podFailurePolicy FailJob), others restart every pod within the
JobSet's maxRestarts, every node exiting 0 completes it, the deadline fails it.

The pods run a small script instead of the trainer (fast); the slow tests run real torchrun and
the real trainer (a killed node, the run restarted, resumed from its checkpoint).
"""

from __future__ import annotations

import io
import json
import signal
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import trainjob as tj
from pipeline.jobspec import job_spec
from pipeline.local_trainjob import (
    LocalTrainJob,
    jobset_failure_action,
    pod_failure_action,
    port_is_free,
    run_trainjob,
)

# The torch plugin's environment (tests/schemas/README.md) and the Indexed Job's index variable
PLUGIN_ENV = {
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
}
JOB_ENV = {"JOB_COMPLETION_INDEX"}

NODE = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    d = Path(sys.argv[1])
    rank = int(os.environ["PET_NODE_RANK"])
    (d / f"env-{rank}.json").write_text(json.dumps(dict(os.environ)))
    print(f"hello from node {rank}", flush=True)
    mode = os.environ.get("TEST_MODE", "ok")

    def wait_for(name, timeout=60):
        end = time.time() + timeout
        while not (d / name).exists():
            if time.time() > end:
                sys.exit(1)
            time.sleep(0.05)

    if mode == "kill":  # node 1: first life waits to be killed; then every node exits 0
        if rank == 1 and not (d / "node1-started").exists():
            (d / "node1-started").touch()
            time.sleep(600)
    elif mode == "exit":  # node 1 exits TEST_CODE (once, if TEST_ONCE), node 0 waits for it
        if rank == 0:
            wait_for("node1-done")
        elif os.environ.get("TEST_ONCE") and (d / "node1-failed").exists():
            (d / "node1-done").touch()
        else:
            (d / "node1-failed").touch()
            sys.exit(int(os.environ["TEST_CODE"]))
    elif mode == "hang":
        time.sleep(600)
    """
)


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "node.py"
    path.write_text(NODE)
    return path


def make_run(
    script, tmp_path, *, nodes=2, nproc=1, env=None, max_restarts=3, backoff_limit=0, **kw
):
    runtime, job = tj.build_run(
        job_spec(
            name="local-test",
            image="unused",
            command=["python"],
            args=[str(script), str(tmp_path)],
            num_nodes=nodes,
            nproc_per_node=nproc,
            env=env or {},
            max_restarts=max_restarts,
            **kw,
        )
    )
    tj.node_job(runtime)["backoffLimit"] = backoff_limit  # the pipeline's is always 0
    return job, runtime


def started(job: LocalTrainJob, marker: Path, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not marker.exists():
        assert time.monotonic() < end, f"{marker} did not appear"
        assert job._step() is None, "the run ended early"
        time.sleep(0.05)


def test_policy_matching():
    _, runtime = make_run(Path("x"), Path("y"))
    rules = tj.node_job(runtime)["podFailurePolicy"]["rules"]
    assert [pod_failure_action(rules, "node", c) for c in (2, 3, 4, 5)] == ["FailJob"] * 4
    assert [pod_failure_action(rules, "node", c) for c in (1, 129, 137, 143)] == ["Count"] * 4
    assert pod_failure_action(rules, "sidecar", 3) == "Count"  # the rule names container node
    not_in = [{"action": "Ignore", "onExitCodes": {"operator": "NotIn", "values": [1]}}]
    assert pod_failure_action(not_in, "node", 7) == "Ignore"
    jobset_rules = runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"]
    assert jobset_failure_action(jobset_rules, "PodFailurePolicy") == (
        "FailJobSet",
        tj.PERMANENT_RULE,
    )
    assert jobset_failure_action(jobset_rules, "BackoffLimitExceeded") == ("RestartJobSet", "")


def test_nodes_get_exactly_the_torch_plugins_environment(script, tmp_path):
    job, runtime = make_run(script, tmp_path, nodes=3, nproc=4, env={"TEST_MODE": "ok"})
    out = io.StringIO()
    base = {
        "PATH": "/usr/bin:/bin",
        "LC_ALL": "C.UTF-8",
        "HOME": "/h",
        "RANK": "7",
        "PET_NNODES": "9",
        "MASTER_PORT": "1",
        "TORCHELASTIC_RUN_ID": "x",
    }
    free = port_is_free(tj.MASTER_PORT)
    local = LocalTrainJob(job, runtime, out=out, base_env=base)
    result = local.run()
    assert result.succeeded and result.status == "Complete", out.getvalue()
    if free:  # the plugin's port, unless something on this machine holds it
        assert local.master_port == tj.MASTER_PORT == 29400
    kept = {"PATH", "LC_ALL", "HOME"}  # the machine's environment minus launcher variables
    own = {"PYTHONUNBUFFERED", "TEST_MODE"}  # the runtime container's env + the trainer's env
    for rank in range(3):
        env = json.loads((tmp_path / f"env-{rank}.json").read_text())
        assert set(env) - kept - own == PLUGIN_ENV | JOB_ENV, sorted(env)
        assert set(tj.TORCH_PLUGIN_ENV) == PLUGIN_ENV
        assert env["PET_NNODES"] == "3" and env["PET_NPROC_PER_NODE"] == "4"
        assert env["PET_NODE_RANK"] == env["JOB_COMPLETION_INDEX"] == str(rank)
        assert env["PET_MASTER_ADDR"] == "localhost"
        assert env["PET_MASTER_PORT"] == str(local.master_port)
        assert env["PYTHONUNBUFFERED"] == "1" and env["TEST_MODE"] == "ok"
        assert env["PATH"] == base["PATH"]
    text = out.getvalue()
    assert "[node-0-0] hello from node 0" in text and "[node-0-2] hello from node 2" in text


@pytest.mark.parametrize("code", [2, 3, 4, 5])
def test_a_permanent_exit_code_fails_the_run_at_once(script, tmp_path, code):
    job, runtime = make_run(script, tmp_path, env={"TEST_MODE": "exit", "TEST_CODE": str(code)})
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"Failed: PodFailurePolicy: .*node-0-1 exited {code}"):
        run_trainjob(job, runtime, out=io.StringIO(), grace_seconds=2)
    assert time.monotonic() - t0 < 30  # node 0 (waiting forever) was stopped


@pytest.mark.parametrize("code", [1, 129, 143])
def test_a_retryable_exit_code_restarts_every_node_and_the_run_completes(script, tmp_path, code):
    env = {"TEST_MODE": "exit", "TEST_CODE": str(code), "TEST_ONCE": "1"}
    job, runtime = make_run(script, tmp_path, env=env)
    result = LocalTrainJob(job, runtime, out=io.StringIO(), grace_seconds=2).run()
    assert result.succeeded
    assert result.run_restarts == 1
    assert result.exit_codes["node-0-1"] == [code, 0]
    assert result.restarts == {"node-0-0": 1, "node-0-1": 1}  # a JobSet restart recreates all


def test_a_killed_node_restarts_the_run(script, tmp_path):
    job, runtime = make_run(script, tmp_path, env={"TEST_MODE": "kill"})
    local = LocalTrainJob(job, runtime, out=io.StringIO(), grace_seconds=2)
    local.start()
    started(local, tmp_path / "node1-started")
    local.kill_pod("node-0-1", signal.SIGKILL)  # an OOM kill: 137, counted, the run restarts
    result = local.wait()
    assert result.succeeded, local.out.getvalue()
    assert result.exit_codes["node-0-1"][0] == 137 and result.run_restarts == 1
    assert "BackoffLimitExceeded" in local.out.getvalue()


def test_restarts_are_bounded_by_max_restarts(script, tmp_path):
    env = {"TEST_MODE": "exit", "TEST_CODE": "129"}
    job, runtime = make_run(script, tmp_path, env=env, max_restarts=2)
    result = LocalTrainJob(job, runtime, out=io.StringIO(), grace_seconds=2).run()
    assert result.status == "Failed" and result.reason == "ReachedMaxRestarts"
    assert result.run_restarts == 2 and result.exit_codes["node-0-1"] == [129, 129, 129]


def test_within_backoff_limit_only_the_failed_pod_is_replaced(script, tmp_path):
    env = {"TEST_MODE": "exit", "TEST_CODE": "129", "TEST_ONCE": "1"}
    job, runtime = make_run(script, tmp_path, env=env, backoff_limit=1)
    result = LocalTrainJob(job, runtime, out=io.StringIO(), grace_seconds=2).run()
    assert result.succeeded and result.run_restarts == 0
    assert result.restarts == {"node-0-0": 0, "node-0-1": 1}


def test_active_deadline_fails_the_run(script, tmp_path):
    job, runtime = make_run(script, tmp_path, env={"TEST_MODE": "hang"}, active_deadline_seconds=1)
    result = LocalTrainJob(job, runtime, out=io.StringIO(), grace_seconds=2).run()
    assert result.status == "Failed" and result.reason == "DeadlineExceeded"
    assert result.seconds < 20


def test_the_runtime_must_be_the_jobs():
    job, runtime = make_run(Path("x"), Path("y"))
    runtime["metadata"]["name"] = "other"
    with pytest.raises(ValueError, match="runs on 'local-test'"):
        LocalTrainJob(job, runtime)


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
def test_real_torchrun_reads_the_plugins_environment(tmp_path):
    """2 nodes x 2 processes: pipeline.torchrun gets nnodes, node rank, nproc and the master from
    the plugin's PET_* alone."""
    script = tmp_path / "ddp.py"
    script.write_text(TORCH_SCRIPT)
    runtime, job = tj.build_run(
        job_spec(
            name="ddp-test",
            image="unused",
            args=[str(script)],
            num_nodes=2,
            nproc_per_node=2,
            env={"OMP_NUM_THREADS": "1"},
            active_deadline_seconds=240,
        )
    )
    out = io.StringIO()
    result = LocalTrainJob(job, runtime, out=out).run()
    assert result.succeeded, out.getvalue()
    for rank in range(4):
        assert f"rank {rank}/4 local {rank % 2} sum 6" in out.getvalue()


@pytest.mark.slow
def test_real_trainer_survives_a_killed_node_under_v2_semantics(digits_folder, tmp_path):
    """The pretraining TrainJob itself: SIGKILL node 1 after the first checkpoint; the Job fails
    (137, backoffLimit 0), the JobSet recreates both nodes, they resume from the checkpoint and
    the run is Complete."""
    from pipeline.podspec import trainer_args

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
    runtime, job = tj.build_run(
        job_spec(
            name="trainer-kill",
            image="unused",
            args=args,
            num_nodes=2,
            env={"OMP_NUM_THREADS": "1"},
            active_deadline_seconds=600,
        )
    )
    local = LocalTrainJob(job, runtime, out=io.StringIO())
    local.start()
    end = time.monotonic() + 400
    while not list((ckpt / "checkpoints").glob("*.pt")):
        assert time.monotonic() < end, local.out.getvalue()[-3000:]
        assert local._step() is None, local.out.getvalue()[-3000:]
        time.sleep(0.2)
    local.kill_pod("node-0-1", signal.SIGKILL)
    result = local.wait()
    log = local.out.getvalue()
    assert result.succeeded, log[-3000:]
    assert result.exit_codes["node-0-1"][0] == 137 and result.run_restarts == 1
    assert "resumed from" in log
    assert (ckpt / "trunk.safetensors").exists()
