"""Run a PyTorchJob spec on this machine, as the Training Operator would run it on a cluster.

Each replica pod (`master-0`, `worker-<i>`) becomes a local process tree started with the
`pytorch` container's command + args and the environment the operator gives that pod:

    PYTHONUNBUFFERED=1
    MASTER_ADDR = PET_MASTER_ADDR = localhost        (the cluster: the `<job>-master-0` Service)
    MASTER_PORT = PET_MASTER_PORT = a free port       (the cluster: the master's pytorchjob-port)
    WORLD_SIZE  = replicas x int(nprocPerNode)        (non-integer nprocPerNode counts as 1)
    RANK = PET_NODE_RANK = pod index                  (master 0, worker i -> i + 1)
    PET_NNODES = replicas, PET_NPROC_PER_NODE = nprocPerNode (when set)

on top of this machine's environment (which stands in for the image's, and for the `envFrom`
Secrets, which do not exist here) minus any launcher variables it carries, plus the container's
own `env`. A process that exits is handled per its replica's `restartPolicy`:
- ExitCode: 0 done; 1-127 permanent -> job Failed; >=128 (a signal: 137 SIGKILL, 143 SIGTERM)
  retryable -> the pod is recreated (no backoffLimit, as in the operator: issue #2045);
- OnFailure: non-zero -> restarted in place, counted against runPolicy.backoffLimit;
- Never: non-zero -> job Failed;  Always: any exit -> restarted, non-zero counted.
The job Succeeds when the Master exits 0 (remaining Workers are then stopped), and Fails at
runPolicy.activeDeadlineSeconds. Logs are streamed line by line with a `[master-0]` prefix.

Not modelled: GPUs and other resources (logged and ignored), volumes, the init container that
waits for the master's DNS name, elasticPolicy.

The process machinery (`LocalPods`) is shared with the TrainJob runner (`local_trainjob`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TextIO

from pipeline.pytorchjob import CONTAINER
from pirl.dist import free_port

# Variables a launcher (torchrun, an outer PyTorchJob, SLURM) may have left in this process's
# environment; a pod starts without them.
LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
LAUNCHER_PREFIXES = ("PET_", "TORCHELASTIC_", "TORCH_ELASTIC_", "SLURM_")


class JobFailed(RuntimeError):
    """The local PyTorchJob ended Failed (permanent exit code, backoff limit, deadline)."""


def exit_code(returncode: int) -> int:
    """Popen's returncode as a container's exit code: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def retryable(policy: str, code: int) -> bool:
    """Whether the operator restarts a pod that exited with `code` under restart `policy`."""
    if policy == "ExitCode":
        return code >= 128
    if policy in ("OnFailure", "Always"):
        return True
    return False  # Never


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of this machine's processes, from /proc (Linux; {} when
    there is no /proc)."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()  # fields 3.. of proc(5): state, ppid, ...
        table[int(entry)] = (int(fields[1]), int(fields[19]))  # ppid, starttime
    return table


def descendants(root: int, table: dict[int, tuple[int, int]]) -> set[tuple[int, int]]:
    """(pid, start time) of every process below `root`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add((child, table[child][1]))
            stack.append(child)
    return found


@dataclass
class Pod:
    """One replica pod: `<role>-<index>` (e.g. master-0), its rank and its current process."""

    role: str
    index: int
    rank: int
    command: list[str]
    env: dict[str, str]
    restart_policy: str
    proc: subprocess.Popen | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    done: bool = False  # exited 0 under a policy that does not restart it
    # Every process seen below the pod's command: torchrun starts its workers in new sessions,
    # so the process group is not the pod; a container's processes all die with it.
    tree: set[tuple[int, int]] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass
class JobResult:
    name: str
    status: str  # "Succeeded" (a PyTorchJob), "Complete" (a TrainJob) or "Failed"
    reason: str
    message: str
    restarts: dict[str, int]
    exit_codes: dict[str, list[int]]
    seconds: float
    run_restarts: int = 0  # a TrainJob's JobSet restarts (every pod recreated together)

    @property
    def succeeded(self) -> bool:
        return self.status in ("Succeeded", "Complete")


def local_command(command: list[str], python: str = sys.executable) -> list[str]:
    """The container command as a local one: `torchrun` -> this Python's torch.distributed.run,
    `python`/`python3` -> this Python (the image's interpreter is the venv's here)."""
    if not command:
        raise ValueError("the pytorch container has no command; the image's entrypoint is unknown")
    head, rest = command[0], list(command[1:])
    if os.path.basename(head) == "torchrun":
        return [python, "-m", "torch.distributed.run", *rest]
    if os.path.basename(head) in ("python", "python3"):
        return [python, *rest]
    return list(command)


def pod_env(
    job: dict,
    role: str,
    index: int,
    rank: int,
    *,
    master_port: int,
    base_env: dict[str, str],
    container_env: list[dict],
) -> dict[str, str]:
    """The environment of one replica pod's container (the operator's contract, see module doc)."""
    spec = job["spec"]
    total = sum(int(r.get("replicas", 1)) for r in spec["pytorchReplicaSpecs"].values())
    nproc = spec.get("nprocPerNode")
    try:
        per_node = int(nproc) if nproc is not None else 1
    except ValueError:  # "auto", "gpu", "cpu": the operator counts 1
        per_node = 1
    env = {
        k: v
        for k, v in base_env.items()
        if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)
    }
    pod_name = f"{job['metadata']['name']}-{role}-{index}"
    for item in container_env:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "MASTER_ADDR": "localhost",
            "MASTER_PORT": str(master_port),
            "PET_MASTER_ADDR": "localhost",
            "PET_MASTER_PORT": str(master_port),
            "WORLD_SIZE": str(total * per_node),
            "RANK": str(rank),
            "PET_NODE_RANK": str(rank),
            "PET_NNODES": str(total),
        }
    )
    if nproc is not None:
        env["PET_NPROC_PER_NODE"] = str(nproc)
    return env


def notes(say, container: dict) -> None:
    """Say what of a pod's container a local run does not provide (GPUs, the Secret)."""
    res = (container.get("resources") or {}).get("limits") or {}
    gpus = {k: v for k, v in res.items() if k.endswith("/gpu")}
    if gpus:
        say(f"{gpus} per pod requested; not allocated locally (all pods share the host)")
    for src in container.get("envFrom") or []:
        if "secretRef" in src:
            say(
                f"envFrom Secret {src['secretRef'].get('name')!r}: the pods use this "
                "machine's environment instead (set AWS_* etc. here)"
            )


class LocalPods(ABC):
    """Pods as local process trees: start, stream their logs, kill, stop, and the wait loop
    around a subclass's `_step` (which applies the job kind's restart and success rules).

    `start()` + `wait()` split `run()` so a caller (a test) can act on `pods` while it runs.
    """

    kind = ""  # the job's kind, in messages

    def __init__(
        self,
        name: str,
        *,
        out: TextIO | None,
        cwd: str | None,
        deadline_seconds: float | None,
        poll_interval: float,
        grace_seconds: float,
    ):
        self.name = name
        self.out = out or sys.stdout
        self.cwd = cwd
        self.deadline_seconds = deadline_seconds
        self.poll_interval = poll_interval
        self.grace_seconds = grace_seconds
        self.pods: list[Pod] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._start_time = 0.0

    def _say(self, message: str) -> None:
        with self._lock:
            self.out.write(f"[local-runner] {message}\n")
            self.out.flush()

    # ---------------------------------------------------------------- processes
    def _spawn(self, pod: Pod) -> None:
        pod.proc = subprocess.Popen(
            pod.command,
            env=pod.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a pod is torchrun + its workers
        )
        t = threading.Thread(target=self._pump, args=(pod.name, pod.proc), daemon=True)
        t.start()
        self._threads.append(t)

    def _pump(self, name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.out.write(f"[{name}] {line}\n")
                self.out.flush()
        proc.stdout.close()

    def _track(self) -> None:
        """Remember the processes of every running pod (they may outlive its command)."""
        running = [p for p in self.pods if p.proc is not None and p.proc.poll() is None]
        if running:
            table = process_table()
            for pod in running:
                pod.tree |= descendants(pod.proc.pid, table)

    def _signal(self, pod: Pod, sig: int) -> None:
        """`sig` to the pod's command (as the kubelet signals the container's main process)."""
        if pod.proc is not None and pod.proc.poll() is None:
            try:
                os.killpg(pod.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _kill_tree(self, pod: Pod) -> None:
        """SIGKILL everything the pod ran (its command and all it started, wherever they moved):
        what an OOM kill or the end of a container does."""
        self._track()
        self._signal(pod, signal.SIGKILL)
        table = process_table()
        for pid, start in pod.tree:
            if table.get(pid, (0, -1))[1] == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        pod.tree = set()

    def kill_pod(self, name: str, sig: int = signal.SIGKILL) -> None:
        """SIGKILL: kill the pod's every process (OOM kill, node loss); other signals go to its
        command only (SIGTERM: an eviction, which torchrun forwards to its workers)."""
        pod = next(p for p in self.pods if p.name == name)
        if sig == signal.SIGKILL:
            self._kill_tree(pod)
        else:
            self._signal(pod, sig)

    def _stop_all(self) -> None:
        """Delete the pods: SIGTERM, then SIGKILL after the grace period (as the kubelet)."""
        self._track()
        running = [p for p in self.pods if p.proc is not None and p.proc.poll() is None]
        for p in running:
            self._signal(p, signal.SIGTERM)
        end = time.monotonic() + self.grace_seconds
        for p in running:
            try:
                p.proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.pods:  # whatever is left, as when the containers are removed
            self._kill_tree(p)
            if p.proc is not None:
                p.proc.wait()

    # ---------------------------------------------------------------- lifecycle
    def _banner(self) -> str:
        """What start() says about the job (its size, address, deadline)."""
        return f"{len(self.pods)} pod(s), deadline {self.deadline_seconds or 'none'} s"

    def start(self) -> LocalPods:
        self._start_time = time.monotonic()
        self._say(f"{self.kind} {self.name}: {self._banner()}")
        for pod in self.pods:
            self._say(f"{pod.name}: {' '.join(pod.command)}")
            self._spawn(pod)
        return self

    def _deadline_passed(self) -> bool:
        return bool(self.deadline_seconds) and (
            time.monotonic() - self._start_time > self.deadline_seconds
        )

    def _result(self, status: str, reason: str, message: str, run_restarts: int = 0) -> JobResult:
        self._say(f"{self.kind} {self.name} {status}: {reason}: {message}")
        return JobResult(
            name=self.name,
            status=status,
            reason=reason,
            message=message,
            restarts={p.name: p.restarts for p in self.pods},
            exit_codes={p.name: list(p.exit_codes) for p in self.pods},
            seconds=time.monotonic() - self._start_time,
            run_restarts=run_restarts,
        )

    @abstractmethod
    def _step(self) -> JobResult | None:
        """Handle the pods that exited since the last poll, per the job kind's rules; a
        JobResult once the job ended."""

    def wait(self) -> JobResult:
        """Until the job ends; the pods are stopped on the way out, also on Ctrl-C or SIGTERM."""
        previous = None
        if threading.current_thread() is threading.main_thread():

            def on_sigterm(signum, frame):
                raise SystemExit(128 + signum)

            previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            while True:
                result = self._step()
                if result is not None:
                    return result
                time.sleep(self.poll_interval)
        finally:
            self._stop_all()
            for t in self._threads:
                t.join(timeout=5)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def run(self) -> JobResult:
        if self._start_time:
            raise RuntimeError("this LocalJob was already started")
        return self.start().wait()


class LocalJob(LocalPods):
    """A PyTorchJob run as local processes: `LocalJob(job).run()` -> JobResult."""

    kind = "PyTorchJob"

    def __init__(
        self,
        job: dict,
        *,
        out: TextIO | None = None,
        base_env: dict[str, str] | None = None,
        cwd: str | None = None,
        python: str = sys.executable,
        timeout: float | None = None,
        poll_interval: float = 0.2,
        grace_seconds: float = 10.0,
    ):
        run_policy = job["spec"].get("runPolicy", {})
        limits = [t for t in (run_policy.get("activeDeadlineSeconds"), timeout) if t]
        super().__init__(
            job["metadata"]["name"],
            out=out,
            cwd=cwd,
            deadline_seconds=min(limits) if limits else None,
            poll_interval=poll_interval,
            grace_seconds=grace_seconds,
        )
        self.job = job
        self.backoff_limit = run_policy.get("backoffLimit")
        self.master_port = free_port()
        self._counted = 0  # restarts that count against backoffLimit
        base = dict(os.environ if base_env is None else base_env)
        replicas = job["spec"]["pytorchReplicaSpecs"]
        if "Master" not in replicas or int(replicas["Master"].get("replicas", 1)) != 1:
            raise ValueError("the local runner needs exactly one Master replica (as the operator)")
        rank = 0
        for role in ("Master", "Worker"):
            spec = replicas.get(role)
            if not spec:
                continue
            container = self._container(spec, role)
            policy = spec.get("restartPolicy", "OnFailure")  # the operator's default
            for index in range(int(spec.get("replicas", 1))):
                env = pod_env(
                    job,
                    role.lower(),
                    index,
                    rank,
                    master_port=self.master_port,
                    base_env=base,
                    container_env=container.get("env", []),
                )
                command = local_command(
                    list(container.get("command", [])) + list(container.get("args", [])), python
                )
                self.pods.append(Pod(role.lower(), index, rank, command, env, policy))
                rank += 1
        notes(self._say, self._container(replicas["Master"], "Master"))

    @staticmethod
    def _container(spec: dict, role: str) -> dict:
        for c in spec["template"]["spec"]["containers"]:
            if c.get("name") == CONTAINER:
                return c
        raise ValueError(f"the {role} replica has no container named {CONTAINER!r}")

    def _banner(self) -> str:
        return (
            f"{len(self.pods)} pod(s), MASTER_ADDR=localhost MASTER_PORT={self.master_port}"
            f" WORLD_SIZE={self.pods[0].env['WORLD_SIZE']}, deadline "
            f"{self.deadline_seconds or 'none'} s"
        )

    def _step(self) -> JobResult | None:
        """Handle every pod that exited since the last poll; a JobResult once the job ended.
        Workers first, so a Worker that ended just before the Master is on the record."""
        self._track()
        for pod in self.pods[1:] + self.pods[:1]:
            if pod.done or pod.proc is None:
                continue
            rc = pod.proc.poll()
            if rc is None:
                continue
            self._kill_tree(pod)  # the container ended: nothing it started survives it
            code = exit_code(rc)
            pod.exit_codes.append(code)
            if code == 0 and pod.role == "master" and pod.restart_policy != "Always":
                pod.done = True
                return self._result("Succeeded", "JobSucceeded", f"{pod.name} exited 0")
            if code == 0 and pod.restart_policy != "Always":
                pod.done = True
                self._say(f"{pod.name} exited 0 (Succeeded)")
                continue
            if not retryable(pod.restart_policy, code):
                return self._result(
                    "Failed",
                    "JobFailed",
                    f"{pod.name} exited {code} (permanent under restartPolicy "
                    f"{pod.restart_policy})",
                )
            if pod.restart_policy in ("OnFailure", "Always") and code != 0:
                # kubelet restarts in place; backoffLimit counts them over all pods
                if self.backoff_limit is not None and self._counted >= self.backoff_limit:
                    return self._result(
                        "Failed",
                        "BackoffLimitExceeded",
                        f"{pod.name} exited {code}; backoffLimit {self.backoff_limit} reached",
                    )
                self._counted += 1
            pod.restarts += 1
            self._say(
                f"{pod.name} exited {code} (retryable under restartPolicy {pod.restart_policy}): "
                f"restarting it (restart {pod.restarts})"
            )
            self._spawn(pod)
        if self._deadline_passed():
            return self._result(
                "Failed",
                "DeadlineExceeded",
                f"still running after activeDeadlineSeconds={self.deadline_seconds}",
            )
        return None


def run_pytorchjob(job: dict, **kwargs) -> JobResult:
    """Run `job` locally to the end; raises JobFailed unless it Succeeded."""
    result = LocalJob(job, **kwargs).run()
    if not result.succeeded:
        raise JobFailed(
            f"PyTorchJob {result.name} {result.status}: {result.reason}: {result.message}"
        )
    return result
