"""Real training jobs for the fault tests: 2 ranks (gloo, CPU) started the way the PyTorchJob
starts them (`python -m pipeline.torchrun -m pirl.train ...`), as one pod with 2 processes or as
two pods (Master + Worker) with the operator's environment, each pod its own process group so a
test can signal a whole pod or one rank. Logs go to files; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pirl import checkpoint

from .conftest import free_port, subprocess_env

EPOCHS = 5  # x 2 steps: the fault tests' jobs run 10 steps
STEP_LINE = re.compile(r"\[rank 0\] INFO epoch (\d+) step (\d+)/(\d+) ")


def train_args(out: str, data: Path, *extra: str, nodes: int = 1, procs: int = 2) -> list[str]:
    """The tiny PIRL job every fault test runs: 32 samples, 2 ranks x batch 8 = 2 steps/epoch."""
    return [
        "config=pretrain/pirl/pirl_demo_resnet18",
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}/train]",
        "config.DATA.TRAIN.DATA_LIMIT=32",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=16",
        f"config.OPTIMIZER.num_epochs={EPOCHS}",
        "config.LOG_FREQUENCY=1",
        "config.CHECKPOINT.KEEP_LAST=2",
        f"config.DISTRIBUTED.NUM_NODES={nodes}",
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}",
        "config.DISTRIBUTED.TIMEOUT_SECONDS=60",
        f"config.CHECKPOINT.DIR={out}",
        *extra,
    ]


@dataclass
class Pod:
    name: str
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def code(self) -> int | None:
        """The container's exit code (killed by signal N -> 128 + N), None while running."""
        rc = self.proc.poll()
        return None if rc is None else (128 - rc if rc < 0 else rc)

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the trainer processes torchrun started in this pod."""
        out = {}
        for pid in descendants(self.proc.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"pirl.train" not in cmd:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    out[int(item[5:])] = pid
        return out

    def signal(self, sig: int) -> None:
        """`sig` to the pod's main process (what the kubelet does on deletion / eviction)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL every process of the pod (node loss, OOM kill of the container)."""
        if self.proc.poll() is not None:
            return  # exited and reaped: its pid may be another process's now
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


@dataclass
class Job:
    pods: list[Pod]
    started: float = field(default_factory=time.monotonic)

    def text(self) -> str:
        return "\n".join(f"----- {p.name}\n{p.text()[-6000:]}" for p in self.pods)

    def wait(self, timeout: float) -> list[int]:
        end = time.monotonic() + timeout
        for p in self.pods:
            try:
                p.proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"the job ran past {timeout} s\n{self.text()}") from None
        return [p.code for p in self.pods]

    def kill(self) -> None:
        for p in self.pods:
            p.kill()

    def global_step(self) -> int:
        """The last step rank 0 logged (epoch * steps_per_epoch + step), 0 before any."""
        last = 0
        for m in STEP_LINE.finditer(self.pods[0].text()):
            epoch, step, per_epoch = map(int, m.groups())
            last = epoch * per_epoch + step
        return last

    def wait_for_step(self, step: int, timeout: float = 240) -> float:
        """Block until rank 0 has logged `step`; returns the time it was seen."""
        end = time.monotonic() + timeout
        while self.global_step() < step:
            for p in self.pods:
                assert p.code is None, f"{p.name} exited {p.code} early\n{self.text()}"
            assert time.monotonic() < end, f"step {step} not reached in {timeout} s\n{self.text()}"
            time.sleep(0.05)
        return time.monotonic()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _spawn(name: str, args: list[str], env: dict, logdir: Path) -> Pod:
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.torchrun", *args],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a pod: its own process group
        )
    return Pod(name, proc, log)


def one_pod(out: str, data: Path, logdir: Path, *extra: str, env: dict | None = None) -> Job:
    """One pod running 2 ranks: `pipeline.torchrun --nproc-per-node=2 -m pirl.train ...`."""
    args = [
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "pirl.train",
        *train_args(out, data, *extra),
    ]
    return Job([_spawn(f"pod-{time.monotonic_ns()}", args, subprocess_env(**(env or {})), logdir)])


def pod_env(port: int, node_rank: int, nodes: int = 2, **extra: str) -> dict:
    """What the Training Operator injects into a PyTorchJob pod (docs/pytorchjob-contract.md#environment)."""
    return subprocess_env(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(nodes),
        RANK=str(node_rank),
        PET_MASTER_ADDR="127.0.0.1",
        PET_MASTER_PORT=str(port),
        PET_NNODES=str(nodes),
        PET_NODE_RANK=str(node_rank),
        PET_NPROC_PER_NODE="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )


def two_pods(out: str, data: Path, logdir: Path, *extra: str, env: dict | None = None) -> Job:
    """Master-0 and Worker-0, one rank each, as the operator starts them (no torchrun flags)."""
    port = free_port()
    stamp = time.monotonic_ns()
    pods = []
    for node_rank, role in enumerate(("master", "worker")):
        args = ["-m", "pirl.train", *train_args(out, data, *extra, nodes=2, procs=1)]
        pods.append(
            _spawn(f"{role}-{stamp}", args, pod_env(port, node_rank, **(env or {})), logdir)
        )
    return Job(pods)


_STRAIGHT: dict[str, Path] = {}


def straight_run(tmp_path_factory, data: Path) -> Path:
    """The uninterrupted run the faulted ones are compared with (made once per session)."""
    if str(data) not in _STRAIGHT:
        root = tmp_path_factory.mktemp("straight")
        # only the final checkpoint is compared (saving does not change training)
        job = one_pod(
            str(root / "out"),
            data,
            root / "logs",
            f"config.CHECKPOINT.CHECKPOINT_FREQUENCY={EPOCHS}",
        )
        assert job.wait(300) == [0], job.text()
        _STRAIGHT[str(data)] = root / "out"
    return _STRAIGHT[str(data)]


def final_state(root: str) -> tuple[dict, dict]:
    got = checkpoint.load_latest(root)
    assert got is not None, f"no checkpoint under {root}"
    return got


def assert_same_result(a_root: str, b_root: str) -> None:
    """Same epoch/step, and memory bank, Z and every weight bit-identical (CPU)."""
    a, meta_a = final_state(a_root)
    b, meta_b = final_state(b_root)
    assert (meta_a["epoch"], meta_a["global_step"]) == (meta_b["epoch"], meta_b["global_step"])
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    memory_a, memory_b = a["loss"]["memory.memory"], b["loss"]["memory.memory"]
    rows = (memory_a != memory_b).any(dim=1).nonzero().flatten().tolist()
    assert not rows and not differ and a["loss"]["z"] == b["loss"]["z"], (
        f"{a_root} vs {b_root} at step {meta_a['global_step']}: memory rows {rows} differ, "
        f"z {a['loss']['z']} vs {b['loss']['z']}, {len(differ)} model tensors differ {differ[:5]}"
    )


def resumed_step(log: str) -> int | None:
    m = re.search(
        r"resumed from checkpoint-\d+\.pt: epoch \d+, step \d+ \(global step (\d+)\)", log
    )
    return int(m.group(1)) if m else None


def record(fault: str, what: str, recover_s: float, lost_steps: int) -> None:
    """Append one row of the fault table to $PIRL_FAULT_REPORT (when set)."""
    path = os.environ.get("PIRL_FAULT_REPORT")
    if path:
        row = {"fault": fault, "what": what, "recover_s": round(recover_s, 1), "lost": lost_steps}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
