"""Run a TrainJob and its TrainingRuntime on this machine, as Kubeflow Trainer v2 (JobSet, Job)
would run them on a cluster.

Each pod of the runtime's `node` Job (`node-0-<i>`, i = the job-completion index) becomes a local
process tree started with the `node` container's command and the TrainJob's args, with the
environment its pod gets:

    PET_NNODES          = trainer.numNodes (else the runtime's mlPolicy.numNodes)
    PET_NPROC_PER_NODE  = trainer.numProcPerNode (else "auto")
    PET_NODE_RANK       = JOB_COMPLETION_INDEX = i
    PET_MASTER_ADDR     = localhost                (the cluster: <trainjob>-node-0-0.<trainjob>)
    PET_MASTER_PORT     = 29400                    (a free port if 29400 is taken here)

(the torch plugin's TORCH_PLUGIN_ENV, and the Job controller's JOB_COMPLETION_INDEX) on top of
this machine's environment (which stands in for the image's and the `envFrom` Secret's) minus any
launcher variables it carries, plus the container's `env` and the TrainJob's `trainer.env`.
Nothing else: no MASTER_ADDR, RANK or WORLD_SIZE as the v1 operator sets.

Failures follow the runtime's policies (pipeline/trainjob.py writes them):
- a pod that exits non-zero is matched against the Job's `podFailurePolicy` rules in order
  (`onExitCodes` In/NotIn): FailJob fails the Job at once (reason PodFailurePolicy), Ignore
  replaces the pod without counting, Count (and no match) counts it against `backoffLimit`,
  beyond which the Job fails (BackoffLimitExceeded); within it the pod alone is replaced;
- a failed Job is matched against the JobSet's `failurePolicy.rules` (onJobFailureReasons):
  FailJobSet fails the run, RestartJobSet (also the default) stops every pod and starts them all
  again, at most `maxRestarts` times (then Failed, ReachedMaxRestarts);
- the run is Complete when every pod exited 0, Failed (DeadlineExceeded) after
  `spec.activeDeadlineSeconds`.
Logs are streamed line by line with a `[node-0-0]` prefix.

Not modelled: GPUs and other resources (logged and ignored), volumes, `onPodConditions` rules
(pod conditions such as DisruptionTarget do not exist here), onJobFailureMessagePatterns,
initializer jobs, JobSet success policies other than "every pod succeeded".
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TextIO

from pipeline import trainjob as tj
from pipeline.local_runner import (
    LAUNCHER_PREFIXES,
    LAUNCHER_VARS,
    JobFailed,
    JobResult,
    LocalPods,
    Pod,
    exit_code,
    free_port,
    local_command,
    notes,
)

JOB_CONTROLLER_ENV = ("JOB_COMPLETION_INDEX",)  # what an Indexed Job gives each of its pods
COMPLETE, FAILED = "Complete", "Failed"


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def node_env(
    index: int,
    *,
    num_nodes: int,
    nproc_per_node: int | str,
    master_port: int,
    base_env: dict[str, str],
    container_env: list[dict],
) -> dict[str, str]:
    """The environment of the `node` container of pod `index` (see the module doc)."""
    env = {
        k: v
        for k, v in base_env.items()
        if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)
    }
    for item in container_env:
        if "value" in item:
            env[item["name"]] = str(item["value"])
    env.update(
        {
            "PET_NNODES": str(num_nodes),
            "PET_NPROC_PER_NODE": str(nproc_per_node),
            "PET_NODE_RANK": str(index),
            "PET_MASTER_ADDR": "localhost",
            "PET_MASTER_PORT": str(master_port),
            "JOB_COMPLETION_INDEX": str(index),
        }
    )
    return env


def pod_failure_action(rules: list[dict], container: str, code: int) -> str:
    """The podFailurePolicy action for a pod whose `container` exited `code` (non-zero): the
    first matching rule's, else "Count"."""
    for rule in rules:
        on_codes = rule.get("onExitCodes")
        if not on_codes or on_codes.get("containerName") not in (None, container):
            continue
        values = set(on_codes.get("values", []))
        matched = code in values if on_codes.get("operator") == "In" else code not in values
        if matched:
            return rule["action"]
    return "Count"


def jobset_failure_action(rules: list[dict], reason: str) -> tuple[str, str]:
    """(action, rule name) of the JobSet failurePolicy for a Job that failed with `reason`:
    the first rule whose onJobFailureReasons is empty or lists it, else RestartJobSet."""
    for rule in rules:
        reasons = rule.get("onJobFailureReasons") or []
        if not reasons or reason in reasons:
            return rule["action"], rule.get("name", "")
    return "RestartJobSet", ""


class LocalTrainJob(LocalPods):
    """A TrainJob on its TrainingRuntime run as local processes:
    `LocalTrainJob(trainjob, runtime).run()` -> JobResult (status Complete or Failed)."""

    kind = "TrainJob"

    def __init__(
        self,
        trainjob: dict,
        runtime: dict,
        *,
        out: TextIO | None = None,
        base_env: dict[str, str] | None = None,
        cwd: str | None = None,
        python: str = sys.executable,
        timeout: float | None = None,
        poll_interval: float = 0.2,
        grace_seconds: float = 10.0,
        master_port: int | None = None,
    ):
        ref = trainjob["spec"]["runtimeRef"]
        if ref["name"] != runtime["metadata"]["name"]:
            raise ValueError(
                f"TrainJob {trainjob['metadata']['name']} runs on {ref['name']!r}, "
                f"not on the TrainingRuntime {runtime['metadata']['name']!r} given"
            )
        limits = [t for t in (trainjob["spec"].get("activeDeadlineSeconds"), timeout) if t]
        super().__init__(
            trainjob["metadata"]["name"],
            out=out,
            cwd=cwd,
            deadline_seconds=min(limits) if limits else None,
            poll_interval=poll_interval,
            grace_seconds=grace_seconds,
        )
        trainer = trainjob["spec"].get("trainer") or {}
        job = tj.node_job(runtime)
        container = tj.node_container(runtime)
        jobset_policy = runtime["spec"]["template"]["spec"].get("failurePolicy") or {}
        self.backoff_limit = int(job.get("backoffLimit", 6))  # Kubernetes' default
        self.pod_rules = (job.get("podFailurePolicy") or {}).get("rules", [])
        self.max_restarts = int(jobset_policy.get("maxRestarts", 0))
        self.jobset_rules = jobset_policy.get("rules", [])
        self.failed_pods = 0  # of the current Job, against backoffLimit
        self.run_restarts = 0  # JobSet restarts that count against maxRestarts
        if master_port is None:
            master_port = tj.MASTER_PORT if port_is_free(tj.MASTER_PORT) else free_port()
        self.master_port = master_port
        num_nodes = int(trainer.get("numNodes") or runtime["spec"]["mlPolicy"].get("numNodes", 1))
        nproc = trainer.get("numProcPerNode") or "auto"
        # The TrainJob's trainer fields override the runtime's `node` container.
        command = list(trainer.get("command") or container.get("command", []))
        args = list(trainer.get("args") or container.get("args", []))
        env_items = {e["name"]: e for e in container.get("env", [])}
        env_items.update({e["name"]: e for e in trainer.get("env", [])})
        base = dict(os.environ if base_env is None else base_env)
        for index in range(num_nodes):
            env = node_env(
                index,
                num_nodes=num_nodes,
                nproc_per_node=nproc,
                master_port=master_port,
                base_env=base,
                container_env=list(env_items.values()),
            )
            self.pods.append(
                Pod(
                    f"{tj.NODE}-0",
                    index,
                    index,
                    local_command(command + args, python),
                    env,
                    "Never",
                )
            )
        notes(self._say, {**container, "resources": trainer.get("resourcesPerNode") or {}})

    def _banner(self) -> str:
        env = self.pods[0].env
        return (
            f"{len(self.pods)} pod(s) x PET_NPROC_PER_NODE={env['PET_NPROC_PER_NODE']}, "
            f"PET_MASTER_ADDR=localhost PET_MASTER_PORT={self.master_port}, backoffLimit "
            f"{self.backoff_limit}, maxRestarts {self.max_restarts}, deadline "
            f"{self.deadline_seconds or 'none'} s"
        )

    def _result(self, status: str, reason: str, message: str, run_restarts: int = 0) -> JobResult:
        return super()._result(status, reason, message, run_restarts or self.run_restarts)

    def _job_failed(self, reason: str, message: str) -> JobResult | None:
        """The `node` Job failed: the JobSet's failurePolicy decides (a JobResult if the run
        ends, None after a restart of every pod)."""
        action, rule = jobset_failure_action(self.jobset_rules, reason)
        why = f"Job failed ({reason}: {message})"
        if action == "FailJobSet":
            return self._result(FAILED, reason, f"{why}; failurePolicy rule {rule}: FailJobSet")
        counted = action != "RestartJobSetAndIgnoreMaxRestarts"
        if counted and self.run_restarts >= self.max_restarts:
            return self._result(
                FAILED, "ReachedMaxRestarts", f"{why}; maxRestarts {self.max_restarts} reached"
            )
        self.run_restarts += counted
        self._say(f"{why}: restarting every pod (JobSet restart {self.run_restarts})")
        self._stop_all()
        self.failed_pods = 0
        for pod in self.pods:
            pod.done = False
            pod.restarts += 1
            self._spawn(pod)
        return None

    def _step(self) -> JobResult | None:
        """Handle every pod that exited since the last poll (highest index first, so a node that
        ended just before node 0 is on the record)."""
        self._track()
        for pod in reversed(self.pods):
            if pod.done or pod.proc is None:
                continue
            rc = pod.proc.poll()
            if rc is None:
                continue
            self._kill_tree(pod)  # the container ended: nothing it started survives it
            code = exit_code(rc)
            pod.exit_codes.append(code)
            if code == 0:
                pod.done = True
                self._say(f"{pod.name} exited 0 (Succeeded)")
                continue
            action = pod_failure_action(self.pod_rules, tj.NODE, code)
            if action == "FailJob":
                return self._job_failed(
                    "PodFailurePolicy", f"{pod.name} exited {code}, a podFailurePolicy FailJob code"
                )
            if action != "Ignore":
                self.failed_pods += 1
                if self.failed_pods > self.backoff_limit:
                    return self._job_failed(
                        "BackoffLimitExceeded",
                        f"{pod.name} exited {code}; backoffLimit {self.backoff_limit} reached",
                    )
            pod.restarts += 1
            self._say(f"{pod.name} exited {code} ({action}): replacing the pod")
            self._spawn(pod)
        if all(p.done for p in self.pods):
            return self._result(COMPLETE, "AllJobsCompleted", "every node exited 0")
        if self._deadline_passed():
            return self._result(
                FAILED,
                "DeadlineExceeded",
                f"still running after activeDeadlineSeconds={self.deadline_seconds}",
            )
        return None


def run_trainjob(trainjob: dict, runtime: dict, **kwargs) -> JobResult:
    """Run `trainjob` on `runtime` locally to the end; raises JobFailed unless it is Complete."""
    result = LocalTrainJob(trainjob, runtime, **kwargs).run()
    if not result.succeeded:
        raise JobFailed(
            f"TrainJob {result.name} {result.status}: {result.reason}: {result.message}"
        )
    return result
