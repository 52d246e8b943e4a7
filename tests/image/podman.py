"""podman for the image tier: the built image's reference, `podman run` as a Kubernetes pod runs
a container, podman's Docker-API service, and a PyTorchJob whose pods are containers.

Every container runs as a restricted pod would: the image's numeric user (uid/gid 1000), a
read-only root filesystem, a writable tmpfs /tmp (an emptyDir), a sized /dev/shm (the pod's
memory emptyDir) and no capabilities.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import tomllib

from pipeline.local_runner import LocalJob
from pipeline.podspec import RUN_AS_USER

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
USER = f"{RUN_AS_USER}:{RUN_AS_USER}"
TMP_SIZE = "2g"
SHM_SIZE = "512m"


def git_sha() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return proc.stdout.strip() or "unknown"


def default_image() -> str:
    """What `images/build.sh --local` tags for this commit: localhost/pirl:VERSION-<sha12>."""
    return f"localhost/pirl:{VERSION}-{git_sha()[:12]}"


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}")
    return proc


def pod_flags(*, network: str = "none") -> list[str]:
    """`podman run` flags for a restricted pod's container (see module doc)."""
    return [
        f"--user={USER}",
        "--read-only",
        f"--tmpfs=/tmp:rw,size={TMP_SIZE},mode=1777",
        f"--shm-size={SHM_SIZE}",
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        f"--network={network}",
    ]


def run_in_image(
    image: str,
    *args: str,
    entrypoint: list[str] | None = None,
    volumes: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`podman run --rm` of `image` as a restricted pod; `entrypoint` replaces the image's (as a
    pod's `command` does)."""
    cmd = ["run", "--rm", *pod_flags()]
    if entrypoint is not None:
        cmd.append(f"--entrypoint={json.dumps(entrypoint)}")
    for host, target in (volumes or {}).items():
        cmd.append(f"--volume={host}:{target}")
    for key, value in (env or {}).items():
        cmd.append(f"--env={key}={value}")
    return podman(*cmd, image, *args, timeout=timeout, check=False)


class DockerAPIService:
    """`podman system service` on a unix socket: the Docker API that the docker SDK (and so
    kfp.local.DockerRunner) talks to through DOCKER_HOST=unix://<socket>."""

    def __init__(self, directory: Path):
        self.socket = directory / "podman.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> DockerAPIService:
        self.proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", self.url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"podman system service did not create {self.socket}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ContainerJob(LocalJob):
    """A PyTorchJob whose pods are podman containers of `image`, one per replica.

    The local runner's pods and rules (the operator's environment for each pod, restartPolicy,
    the Master's exit deciding the job), with each pod's process being `podman run`: the
    container's `command` as the entrypoint, its `args`, exactly the environment `pod_env` gives
    the pod (nothing of this machine's), `volumes` mounted into every pod (the shared store), the
    host network (MASTER_ADDR=localhost reaches the Master's container, as its Service would).
    Container names are `<job>-<pod>`, e.g. `trainer-worker-0`, for `podman kill`.
    """

    def __init__(self, job: dict, *, image: str, volumes: dict[str, str], **kwargs):
        super().__init__(job, base_env={}, python="python", **kwargs)
        specs = job["spec"]["pytorchReplicaSpecs"]
        host_env = dict(os.environ)
        for pod in self.pods:
            container = self._container(specs[pod.role.capitalize()], pod.role)
            name = self.container_name(pod.name)
            run = [
                shutil.which("podman") or "podman",
                "run",
                "--rm",
                "--replace",
                f"--name={name}",
                *pod_flags(network="host"),
                f"--entrypoint={json.dumps(container['command'])}",
            ]
            run += [f"--volume={host}:{target}" for host, target in volumes.items()]
            run += [f"--env={key}={value}" for key, value in sorted(pod.env.items())]
            pod.command = [*run, image, *container.get("args", [])]
            # the `podman run` process needs this machine's PATH; the container gets only --env
            pod.env = {**host_env, **pod.env}

    def container_name(self, pod_name: str) -> str:
        return f"{self.name}-{pod_name}"

    def _kill_tree(self, pod) -> None:
        """The container ends with its pod: remove it (its processes are not below `podman run`)."""
        super()._kill_tree(pod)
        podman("rm", "--force", "--ignore", "--time=0", self.container_name(pod.name), check=False)
