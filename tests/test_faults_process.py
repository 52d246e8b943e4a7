"""Process faults on a real 2-rank job (gloo, CPU), each followed by the restart the Training
Operator would do (restartPolicy ExitCode recreates pods that exit >= 128); the job that went
through all of them ends bit-identical to an uninterrupted one.

One job goes through the faults in turn (each restart resumes from the checkpoint the previous
fault left), which costs 4 restarts instead of 4 separate interrupted runs:
  A. SIGKILL of the Master pod mid-step (2 pods): Master 137, the Worker sees a lost peer: 129;
  B. SIGTERM of the Master pod only (an eviction): every rank stops after the same step, writes
     nothing, and both pods exit 143;
  C. a hung peer (SIGSTOP of rank 1, 1 pod x 2 ranks): rank 0 fails its collective after
     DISTRIBUTED.TIMEOUT_SECONDS with 129, and so does the pod. (torchrun then waits 30 s before
     it SIGKILLs a worker that ignores SIGTERM - its failure path ignores --shutdown-timeout - so
     the test lets the stopped rank go on once rank 0 is gone: it fails on its own, at once);
  D. the last restart runs to the end.
(SIGKILL of a non-master rank is tests/test_distributed.py's resume test.) A replica that never
comes up is a separate test: rendezvous timeout -> a clear error and a retryable exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pirl import lease, storage

from .conftest import free_port, subprocess_env
from .fault_jobs import (
    EPOCHS,
    assert_same_result,
    final_state,
    one_pod,
    pod_env,
    record,
    resumed_step,
    straight_run,
    train_args,
    two_pods,
)

pytestmark = pytest.mark.slow

HANG_TIMEOUT = 6  # DISTRIBUTED.TIMEOUT_SECONDS of the hung-peer segment


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """The run's outputs (not its lease, which a running job renews and a stopping one deletes)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.name != lease.NAME
    }


@pytest.fixture
def straight(tmp_path_factory, digits_folder) -> Path:
    return straight_run(tmp_path_factory, digits_folder)


def test_kill_term_hang_then_resume_matches_an_uninterrupted_run(tmp_path, digits_folder, straight):
    out, logs = tmp_path / "out", tmp_path / "logs"
    stopped: list[int] = []
    job = None
    try:
        # ---- A. SIGKILL of the Master pod in the middle of step 4 (checkpoint at step 2)
        job = two_pods(str(out), digits_folder, logs)
        job.wait_for_step(3)
        t_kill, step_kill = time.monotonic(), job.global_step()
        job.pods[0].kill()
        codes = job.wait(120)
        detect = time.monotonic() - t_kill
        assert codes == [137, 129], job.text()
        assert "lost a peer or timed out in a collective" in job.pods[1].text()
        assert detect < 60, f"the Worker took {detect:.0f} s to notice the dead Master"

        # ---- B. restart; SIGTERM the Master pod only, mid-epoch (checkpoint at step 4)
        job = two_pods(str(out), digits_folder, logs)
        job.wait_for_step(step_kill)
        resumed = resumed_step(job.pods[0].text())
        assert resumed == 2, job.text()
        record(
            "SIGKILL Master pod mid-step (2 pods)",
            f"Master 137, Worker 129 after {detect:.1f} s; resumed from step {resumed}",
            time.monotonic() - t_kill,
            step_kill - resumed,
        )
        job.wait_for_step(5)
        before = snapshot(out)
        t_term = time.monotonic()
        job.pods[0].signal(signal.SIGTERM)
        codes = job.wait(120)
        step_term = job.global_step()
        assert codes == [143, 143], job.text()  # the Worker stopped at the same step
        assert "SIGTERM received; stopped without writing" in job.pods[0].text()
        assert snapshot(out) == before, "a SIGTERM'd job wrote something"
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

        # ---- C. restart as 1 pod x 2 ranks; rank 1 hangs (SIGSTOP) after step 7
        job = one_pod(
            str(out),
            digits_folder,
            logs,
            f"config.DISTRIBUTED.TIMEOUT_SECONDS={HANG_TIMEOUT}",
        )
        job.wait_for_step(step_term)
        resumed = resumed_step(job.pods[0].text())
        assert resumed == 4, job.text()
        record(
            "SIGTERM Master pod (eviction)",
            f"both pods 143 after step {step_term}, nothing written; resumed from step {resumed}",
            time.monotonic() - t_term,
            step_term - resumed,
        )
        job.wait_for_step(7)
        ranks = job.pods[0].ranks()
        assert set(ranks) == {0, 1}, ranks
        t_stop, step_stop = time.monotonic(), job.global_step()
        os.kill(ranks[1], signal.SIGSTOP)
        stopped.append(ranks[1])
        while _alive(ranks[0]) and time.monotonic() - t_stop < HANG_TIMEOUT + 60:
            time.sleep(0.1)
        rank0_gone = time.monotonic() - t_stop
        os.kill(ranks[1], signal.SIGCONT)  # the hang ends (see the module doc)
        codes = job.wait(120)
        assert codes == [129], job.text()
        assert "lost a peer or timed out in a collective" in job.text()
        # the collective timeout fired, and not much later (gloo's own checks are coarse)
        assert rank0_gone < HANG_TIMEOUT + 30, f"rank 0 exited {rank0_gone:.0f} s after the hang"
        assert not _alive(ranks[1]), "torchrun left the hung rank behind"
        stopped.clear()

        # ---- D. restart, runs to the end
        job = one_pod(str(out), digits_folder, logs)
        job.wait_for_step(step_stop)
        resumed = resumed_step(job.pods[0].text())
        assert resumed == 6, job.text()
        record(
            f"hung peer (SIGSTOP rank 1), TIMEOUT_SECONDS={HANG_TIMEOUT}",
            f"rank 0 exited 129 after {rank0_gone:.1f} s, pod 129; resumed from step {resumed}",
            time.monotonic() - t_stop,
            step_stop - resumed,
        )
        assert job.wait(300) == [0], job.text()
    finally:  # a failed assertion must leave no process behind, stopped or running
        for pid in stopped:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if job is not None:
            job.kill()

    _, meta = final_state(str(out))
    assert (meta["epoch"], meta["global_step"]) == (EPOCHS, 2 * EPOCHS)
    assert_same_result(str(straight), str(out))
    names = storage.list_names(str(out / "checkpoints"))
    last = [2 * EPOCHS - 2, 2 * EPOCHS]
    assert names == [f"checkpoint-{s:010d}.{x}" for s in last for x in ("json", "pt")]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_replica_that_never_comes_up_is_a_retryable_timeout(tmp_path, digits_folder):
    """Three pods whose peer never comes up, side by side: a Master alone and a Worker alone
    (`pipeline.torchrun`, static rendezvous with PET_RDZV_CONF=timeout=3), and a Master that runs
    the trainer without torchrun (DISTRIBUTED.TIMEOUT_SECONDS=3 bounds init_process_group).
    Each gives up within the timeout, with a retryable exit code."""
    out = str(tmp_path / "out")
    args = train_args(out, digits_folder, "config.DISTRIBUTED.TIMEOUT_SECONDS=3", nodes=2, procs=1)
    direct_port = free_port()
    commands = {
        "master alone": (
            ["-m", "pipeline.torchrun", "-m", "pirl.train", *args],
            pod_env(free_port(), 0, PET_RDZV_CONF="timeout=3"),
        ),
        "worker alone": (
            ["-m", "pipeline.torchrun", "-m", "pirl.train", *args],
            pod_env(free_port(), 1, PET_RDZV_CONF="timeout=3"),
        ),
        "trainer without torchrun": (
            ["-m", "pirl.train", *args],
            subprocess_env(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(direct_port), WORLD_SIZE="2", RANK="0"
            ),
        ),
    }
    t0 = time.monotonic()
    procs = {
        name: subprocess.Popen(
            [sys.executable, *cmd],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, (cmd, env) in commands.items()
    }
    logs = {name: p.communicate(timeout=120)[0] for name, p in procs.items()}
    took = time.monotonic() - t0
    codes = {name: p.returncode for name, p in procs.items()}
    assert took < 60, codes
    assert not (tmp_path / "out" / "checkpoints").exists()
    direct = logs["trainer without torchrun"]
    assert codes["trainer without torchrun"] == 129, direct
    assert f"could not join the process group at 127.0.0.1:{direct_port}" in direct
    record("a replica never comes up (timeouts 3 s)", f"exit codes {codes}", took, 0)
    permanent = {name: c for name, c in codes.items() if not 128 <= c <= 255}
    assert not permanent, (permanent, logs)
