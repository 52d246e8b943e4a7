"""ContainerJob's `podman run` commands, without podman (fast): one container per replica, the
container's command as the entrypoint and its args after the image, exactly the operator's
environment for that pod, the restricted-pod flags, the shared volume."""

from __future__ import annotations

import json

from pipeline.jobspec import job_spec
from pipeline.pytorchjob import build_pytorchjob

from .podman import ContainerJob, pod_flags


def flag_values(command: list[str], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in command if a.startswith(f"--{flag}=")]


def test_each_replica_is_a_restricted_container_with_the_operators_environment(monkeypatch):
    monkeypatch.setenv("SECRET_OF_THIS_MACHINE", "x")
    spec = build_pytorchjob(
        job_spec(
            name="spec-check",
            namespace="",
            image="registry.test/pirl:1",
            args=["-m", "pirl.train", "config=pretrain/pirl/pirl_demo_resnet18"],
            num_nodes=3,
            env={"OMP_NUM_THREADS": "1"},
        )
    )
    job = ContainerJob(spec, image="localhost/pirl:t", volumes={"/srv/store": "/shared"})
    assert [p.name for p in job.pods] == ["master-0", "worker-0", "worker-1"]
    for rank, pod in enumerate(job.pods):
        cmd = pod.command
        assert cmd[1:3] == ["run", "--rm"] and f"--name=spec-check-{pod.name}" in cmd
        assert set(pod_flags(network="host")) <= set(cmd)
        assert json.loads(flag_values(cmd, "entrypoint")[0]) == [
            "python",
            "-m",
            "pipeline.torchrun",
        ]
        image_at = cmd.index("localhost/pirl:t")
        assert (
            cmd[image_at + 1 :]
            == spec["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
                "args"
            ]
        )
        assert flag_values(cmd, "volume") == ["/srv/store:/shared"]
        env = dict(e.split("=", 1) for e in flag_values(cmd, "env"))
        assert env == {
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "MASTER_ADDR": "localhost",
            "PET_MASTER_ADDR": "localhost",
            "MASTER_PORT": str(job.master_port),
            "PET_MASTER_PORT": str(job.master_port),
            "WORLD_SIZE": "3",
            "RANK": str(rank),
            "PET_NODE_RANK": str(rank),
            "PET_NNODES": "3",
            "PET_NPROC_PER_NODE": "1",
        }
        assert "SECRET_OF_THIS_MACHINE" in pod.env  # the podman process's, not the container's
