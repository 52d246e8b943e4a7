"""Submit a PyTorchJob (Training Operator v1) or a TrainJob (Kubeflow Trainer v2, with the
TrainingRuntime it runs on), stream the log of its rank-0 pod, wait for it, fail loudly, clean up.

Both backends go through one `Launcher`; what differs (API group, the condition that means
success, how its pods are labelled, which container logs) is a `Backend`. A TrainJob's JobSet is
read too: its restarts are reported, and its Completed/Failed condition counts when the TrainJob
has not copied it yet. Events of the job's objects and pods (FailedScheduling, FailedCreate,
BackoffLimitExceeded, ...) are streamed into the step's log.

Written against the Kubernetes REST API (kubernetes.client.CustomObjectsApi / CoreV1Api) rather
than kubeflow-training's TrainingClient or the `kubeflow` SDK's TrainerClient, which re-raise API
errors as a generic "Failed to create ..." and whose waits have their own pitfalls:
- `create_job` re-raises every API error as "Failed to create PyTorchJob", hiding the status and
  message: here a 403 names the RBAC the service account lacks, a 404 the missing CRD/namespace;
- `wait_for_job_conditions(timeout=...)` is the per-request timeout (the wait is `wait_timeout`,
  600 s by default), and the retired launcher listed `Failed` as an expected condition, so a
  failed job turned the KFP step green. Here `Succeeded` returns, `Failed` raises JobFailedError,
  and `wait_timeout` (the whole wait) raises JobTimeoutError;
- `get_job_logs(follow=True)` blocks on Pending pods: here the rank-0 pod's log is followed in a
  thread (again after every restart of its pod) while the main loop watches the job's
  conditions and reports pod states (Unschedulable, ImagePullBackOff, ...) as they change.
The job is deleted per `delete` ("always", "on_success", "never"), and when the KFP run is
terminated (SIGTERM, Ctrl-C); but when the SIGTERM comes from an eviction of the launcher's own
pod (a node drain, autoscaler consolidation: a DisruptionTarget condition or a deletion of the
pod) the job is left running, and the step's retry re-attaches to it (`submit` adopts a job of
its name). Pods that cannot be created (FailedCreate events: quota, Pod Security admission, a
webhook) fail the step after `create_failure_timeout` instead of waiting for the deadline.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from pipeline.jobspec import DELETE_POLICIES
from pipeline.pytorchjob import CONTAINER
from pipeline.trainjob import NODE

JOB_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
COMMON_RBAC = (
    '  - apiGroups: [""]  resources: [pods]  verbs: [get, list]\n'
    '  - apiGroups: [""]  resources: [pods/log]  verbs: [get]\n'
    '  - apiGroups: [""]  resources: [events]  verbs: [list]'
)
# Event reasons of a controller that cannot create the job's pods (the Training Operator's, the
# Job controller's): quota, Pod Security admission, a webhook.
FAILED_CREATE_REASONS = ("FailedCreate", "FailedCreatePod")
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
TRANSIENT_STATUSES = (0, 429, 500, 502, 503, 504)  # 0: no HTTP answer (connection error)
# Kinds whose Normal events are reported (a pod's Normal events repeat what its state says).
JOB_EVENT_KINDS = ("PyTorchJob", "TrainJob", "TrainingRuntime", "JobSet", "Job")


@dataclass(frozen=True)
class Backend:
    """What the launcher needs to know about one job kind."""

    kind: str
    group: str
    version: str
    plural: str
    success: str  # the condition type of a finished job
    container: str  # the training container (its log is streamed)
    rbac: str  # the Role rules the launcher needs for this kind, for 403 messages
    operator: str  # what must be installed, for 404 messages

    def pod_selector(self, name: str) -> str:
        if self.kind == "TrainJob":
            return f"{JOBSET_NAME_LABEL}={name}"
        return f"{JOB_LABEL}={name}"

    def is_rank0_pod(self, pod) -> bool:
        """The PyTorchJob's Master, the TrainJob's node with completion index 0."""
        labels = pod.metadata.labels or {}
        if self.kind == "TrainJob":
            return labels.get(REPLICATED_JOB_LABEL) == NODE and (
                labels.get(COMPLETION_INDEX_LABEL) == "0"
            )
        return labels.get(REPLICA_TYPE_LABEL) == "master"

    def log_hint(self, name: str, namespace: str) -> str:
        pod = (
            f"-l {JOBSET_NAME_LABEL}={name},{COMPLETION_INDEX_LABEL}=0"
            if self.kind == "TrainJob"
            else f"{name}-master-0"
        )
        return (
            f"kubectl -n {namespace} describe {self.kind.lower()} {name}; "
            f"kubectl -n {namespace} logs {pod}"
        )


PYTORCHJOB = Backend(
    kind="PyTorchJob",
    group="kubeflow.org",
    version="v1",
    plural="pytorchjobs",
    success="Succeeded",
    container=CONTAINER,
    rbac=(
        "  - apiGroups: [kubeflow.org]  resources: [pytorchjobs]  verbs: [create, get, delete]\n"
        + COMMON_RBAC
    ),
    operator="the Training Operator (CRD pytorchjobs.kubeflow.org, version v1)",
)
TRAINJOB = Backend(
    kind="TrainJob",
    group="trainer.kubeflow.org",
    version="v1alpha1",
    plural="trainjobs",
    success="Complete",
    container=NODE,
    rbac=(
        "  - apiGroups: [trainer.kubeflow.org]  resources: [trainjobs]  verbs: [create, get, delete]\n"
        "  - apiGroups: [trainer.kubeflow.org]  resources: [trainingruntimes]  verbs: [create, delete]\n"
        "  - apiGroups: [jobset.x-k8s.io]  resources: [jobsets]  verbs: [get]\n" + COMMON_RBAC
    ),
    operator="Kubeflow Trainer v2 (CRD trainjobs.trainer.kubeflow.org, version v1alpha1)",
)
BACKENDS = {b.kind: b for b in (PYTORCHJOB, TRAINJOB)}
# For messages about a TrainJob's runtime: same API group as the TrainJob
RUNTIME_PLURAL = "trainingruntimes"


class LaunchError(RuntimeError):
    """The job could not be submitted or followed (API error, RBAC, missing CRD)."""


class JobFailedError(LaunchError):
    """The job reached the Failed condition."""


class JobTimeoutError(LaunchError, TimeoutError):
    """The job did not finish within wait_timeout."""


class PodCreationError(LaunchError):
    """The job's pods could not be created (FailedCreate events) for longer than the bound."""


class Cancelled(BaseException):
    """SIGTERM: the KFP run was terminated, or the launcher's pod is being evicted."""


def to_yaml(job: dict) -> str:
    return yaml.safe_dump(job, sort_keys=False)


def default_namespace() -> str:
    """The current kube context's namespace (outside a pod), else "default"."""
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts()
        return active["context"].get("namespace") or "default"
    except Exception:  # no kubeconfig
        return "default"


def load_api_client() -> k8s.ApiClient:
    """In a pod: its service account; elsewhere: the kubeconfig's current context."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return k8s.ApiClient()


def owner_from_env() -> dict | None:
    """An ownerReference to the launcher's pod (KFP_POD_NAME / KFP_POD_UID from the downward API),
    so deleting the run's pods also deletes the job; None outside a pod."""
    import os

    name, uid = os.environ.get("KFP_POD_NAME"), os.environ.get("KFP_POD_UID")
    if not (name and uid):
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def own_pod() -> tuple[str, str] | None:
    """(name, namespace) of the launcher's pod (KFP_POD_NAME and the service account's
    namespace); None outside a pod."""
    import os

    name = os.environ.get("KFP_POD_NAME")
    try:
        with open(SA_NAMESPACE) as f:
            namespace = f.read().strip()
    except OSError:
        return None
    return (name, namespace) if name and namespace else None


def being_evicted(pod) -> str:
    """Why `pod` (a V1Pod) is going away other than by its run's termination: a DisruptionTarget
    condition (eviction, preemption, node drain or pressure) or a deletion; "" when neither (KFP
    terminates a run by stopping its pods' containers, without deleting them)."""
    for c in (pod.status.conditions if pod.status else None) or []:
        if c.type == "DisruptionTarget" and c.status == "True":
            return f"DisruptionTarget: {c.reason or ''} {c.message or ''}".strip()
    if pod.metadata.deletion_timestamp is not None:
        return "the pod is being deleted"
    return ""


def explain(exc: ApiException, action: str, namespace: str, backend: Backend = PYTORCHJOB) -> str:
    """`action`: HTTP <status> <reason>: <the API server's message> + what to do about it."""
    message = exc.reason or ""
    try:
        body = json.loads(exc.body or "{}")
        message = body.get("message") or message
    except (ValueError, TypeError, AttributeError):
        if exc.body:
            message = str(exc.body)[:500]
    text = f"{action}: HTTP {exc.status} {exc.reason}: {message}"
    if exc.status == 403:
        text += (
            f"\nThe launcher's service account lacks RBAC in namespace {namespace!r}. It needs a "
            f"Role (bound to it with a RoleBinding) with:\n{backend.rbac}\n"
            "Multi-user Kubeflow grants these through ClusterRole kubeflow-edit only when the "
            "operator was installed with its kubeflow roles. An admin applies the Role and its "
            "binding once: manifests/overlays/kfp/multi-user (a profile's default-editor), "
            "overlays/kfp/standalone (pipeline-runner) or overlays/rbac (other launchers)."
        )
    elif exc.status == 401:
        text += "\nThe API server rejected the credentials (expired token or wrong kubeconfig)."
    elif exc.status == 404 and (backend.plural in action or RUNTIME_PLURAL in action):
        text += f"\nIs {backend.operator} installed and does namespace {namespace!r} exist?"
    elif exc.status == 422:
        text += f"\nThe API server (or the operator's webhook) rejected the {backend.kind} spec."
    return text


def condition(job: dict, success: str = "Succeeded") -> tuple[str, str, str]:
    """(type, reason, message) of the newest condition whose status is True; ("", "", "").
    `success`: the condition type that ends the job well (Succeeded, Complete, Completed)."""
    conds = [
        c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"
    ]
    if not conds:
        return "", "", ""
    for terminal in ("Failed", success):  # a terminal condition wins, whatever its position
        for c in conds:
            if c.get("type") == terminal:
                return terminal, c.get("reason", ""), c.get("message", "")
    c = conds[-1]
    return c.get("type", ""), c.get("reason", ""), c.get("message", "")


def pod_state(pod, container: str = CONTAINER) -> str:
    """A one-line state: phase, plus why it waits or how `container` ended."""
    status = pod.status
    parts = [status.phase or "Unknown"]
    for c in status.conditions or []:
        if c.type == "PodScheduled" and c.status == "False" and c.reason:
            parts.append(f"{c.reason}: {c.message or ''}".strip())
    for cs in status.container_statuses or []:
        if cs.name != container or cs.state is None:
            continue
        if cs.state.waiting and cs.state.waiting.reason not in (None, "ContainerCreating"):
            parts.append(f"{cs.state.waiting.reason}: {cs.state.waiting.message or ''}".strip())
        if cs.state.terminated:
            parts.append(
                f"exit code {cs.state.terminated.exit_code} ({cs.state.terminated.reason})"
            )
    return ", ".join(parts)


class Launcher:
    """Follows one job of `backend`'s kind: `submit`, `wait`, `delete` (and, for a TrainJob, the
    TrainingRuntime it runs on: `submit_runtime`, `delete_runtime`)."""

    def __init__(
        self,
        api_client: k8s.ApiClient | None = None,
        *,
        backend: Backend = PYTORCHJOB,
        out: TextIO | None = None,
        poll_interval: float = 10.0,
        request_timeout: float = 60.0,
        log_grace: float = 30.0,
        max_api_errors: int = 30,
        create_failure_timeout: float = 900.0,
    ):
        self.api_client = api_client or load_api_client()
        self.custom = k8s.CustomObjectsApi(self.api_client)
        self.core = k8s.CoreV1Api(self.api_client)
        self.backend = backend
        self.out = out or sys.stdout
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.log_grace = log_grace
        self.max_api_errors = max_api_errors
        self._lock = threading.Lock()
        self._streams: dict[str, threading.Thread] = {}
        self._pod_states: dict[str, str] = {}
        self._events_seen: dict[str, int] = {}  # event uid -> count already reported
        self._jobset_readable = backend is TRAINJOB
        self._jobset_restarts = 0
        self.create_failure_timeout = create_failure_timeout
        self._failed_create: tuple[float, float, str] | None = None  # first, last seen, message

    def say(self, message: str) -> None:
        with self._lock:
            self.out.write(f"[launcher] {message}\n")
            self.out.flush()

    def _explain(self, exc: ApiException, action: str, namespace: str) -> str:
        return explain(exc, action, namespace, self.backend)

    # ------------------------------------------------------------------ API calls
    def _create(self, plural: str, obj: dict) -> dict:
        b = self.backend
        return self.custom.create_namespaced_custom_object(
            b.group,
            b.version,
            obj["metadata"]["namespace"],
            plural,
            obj,
            _request_timeout=self.request_timeout,
        )

    def _delete(self, plural: str, kind: str, name: str, namespace: str) -> None:
        b = self.backend
        try:
            self.custom.delete_namespaced_custom_object(
                b.group,
                b.version,
                namespace,
                plural,
                name,
                body=k8s.V1DeleteOptions(propagation_policy="Background"),
                _request_timeout=self.request_timeout,
            )
            self.say(f"deleted {kind} {namespace}/{name}")
        except ApiException as exc:
            if exc.status != 404:
                self.say(self._explain(exc, f"deleting {plural} {namespace}/{name}", namespace))

    def get(self, name: str, namespace: str) -> dict:
        b = self.backend
        return self.custom.get_namespaced_custom_object(
            b.group, b.version, namespace, b.plural, name, _request_timeout=self.request_timeout
        )

    def submit_runtime(self, runtime: dict) -> None:
        """Create a TrainJob's TrainingRuntime; one of that name (an earlier attempt of the same
        run, hence the same spec) is reused."""
        name, ns = runtime["metadata"]["name"], runtime["metadata"]["namespace"]
        try:
            self._create(RUNTIME_PLURAL, runtime)
            self.say(f"created TrainingRuntime {ns}/{name}")
        except ApiException as exc:
            if exc.status != 409:
                action = f"creating {RUNTIME_PLURAL} {ns}/{name}"
                raise LaunchError(self._explain(exc, action, ns)) from exc
            self.say(f"TrainingRuntime {ns}/{name} already exists: using it")

    def delete_runtime(self, name: str, namespace: str) -> None:
        self._delete(RUNTIME_PLURAL, "TrainingRuntime", name, namespace)

    def submit(self, job: dict) -> dict:
        """Create the job; if one of that name exists (the step's retry after its launcher was
        evicted), adopt it. One that already Failed fails the step again at once (JobFailedError)
        instead of being replaced: automatic retries must not rerun a failed 32-GPU job."""
        b = self.backend
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        try:
            created = self._create(b.plural, job)
            self.say(f"created {b.kind} {ns}/{name}")
            return created
        except ApiException as exc:
            if exc.status != 409:
                raise LaunchError(
                    self._explain(exc, f"creating {b.plural} {ns}/{name}", ns)
                ) from exc
        try:
            existing = self.get(name, ns)
        except ApiException as exc:
            raise LaunchError(self._explain(exc, f"reading {b.plural} {ns}/{name}", ns)) from exc
        state, reason, message = condition(existing, b.success)
        if state == "Failed":
            raise JobFailedError(
                f"{b.kind} {ns}/{name} already Failed in an earlier attempt of this step: "
                f"{reason}: {message}\nTo run it again in this run, delete it first "
                f"(kubectl -n {ns} delete {b.kind.lower()} {name}) and retry the run; or start "
                "a new run with train_checkpoint_dir set to resume its checkpoints."
            )
        self.say(f"{b.kind} {ns}/{name} already exists ({state or 'no condition'}): following it")
        return existing

    def delete(self, name: str, namespace: str) -> None:
        self._delete(self.backend.plural, self.backend.kind, name, namespace)

    # ------------------------------------------------------------------ pods, logs, events
    def _follow_log(self, pod_name: str, namespace: str, prefix: str) -> None:
        try:
            resp = self.core.read_namespaced_pod_log(
                pod_name,
                namespace,
                container=self.backend.container,
                follow=True,
                _preload_content=False,
            )
            buf = b""
            for chunk in resp.stream(4096):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                if lines:
                    with self._lock:
                        for line in lines:
                            self.out.write(f"[{prefix}] {line.decode(errors='replace')}\n")
                        self.out.flush()
            if buf:
                with self._lock:
                    self.out.write(f"[{prefix}] {buf.decode(errors='replace')}\n")
            resp.release_conn()
        except ApiException as exc:
            action = f"reading the log of pod {namespace}/{pod_name}"
            self.say(self._explain(exc, action, namespace))
        except Exception as exc:  # a dropped stream must not stop the wait
            self.say(f"log stream of {pod_name} ended: {type(exc).__name__}: {exc}")

    def _watch_pods(self, name: str, namespace: str) -> list[str]:
        """Report pod states as they change, follow the rank-0 pod's log; the pods' names."""
        b = self.backend
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=b.pod_selector(name), _request_timeout=self.request_timeout
        )
        for pod in pods.items:
            pod_name = pod.metadata.name
            state = pod_state(pod, b.container)
            if self._pod_states.get(pod_name) != state:
                self._pod_states[pod_name] = state
                self.say(f"pod {pod_name}: {state}")
            restarts = sum(
                cs.restart_count or 0
                for cs in pod.status.container_statuses or []
                if cs.name == b.container
            )
            # a recreated pod (ExitCode, a JobSet restart) has a new uid, a restarted container
            # a new count
            uid = f"{pod.metadata.uid or pod_name}/{restarts}"
            started = pod.status.phase in ("Running", "Succeeded", "Failed")
            if b.is_rank0_pod(pod) and started and uid not in self._streams:
                prefix = pod_name.removeprefix(f"{name}-")
                t = threading.Thread(
                    target=self._follow_log, args=(pod_name, namespace, prefix), daemon=True
                )
                self._streams[uid] = t
                t.start()
        return [pod.metadata.name for pod in pods.items]

    def _watch_events(self, name: str, namespace: str, pod_names: list[str]) -> None:
        """Report new Events of the job's objects (Warning and Normal) and of its pods (Warning:
        FailedScheduling, FailedCreate, BackOff, ...) once each, again when they repeat."""
        try:
            events = self.core.list_namespaced_event(
                namespace, _request_timeout=self.request_timeout
            )
        except ApiException as exc:
            if exc.status == 403 and "events" not in self._events_seen:
                self._events_seen["events"] = 0
                self.say(self._explain(exc, f"listing events in {namespace}", namespace))
            return
        pods = set(pod_names)
        for event in events.items:
            obj = event.involved_object
            if obj is None or not (obj.name == name or (obj.name or "").startswith(f"{name}-")):
                continue
            ours = obj.kind in JOB_EVENT_KINDS or (obj.kind == "Pod" and obj.name in pods)
            if not ours or (obj.kind == "Pod" and event.type == "Normal"):
                continue
            key = event.metadata.uid or f"{obj.kind}/{obj.name}/{event.reason}"
            count = event.count or 1
            if self._events_seen.get(key, 0) >= count:
                continue
            self._events_seen[key] = count
            if event.type == "Warning" and event.reason in FAILED_CREATE_REASONS:
                self._note_failed_create(f"{obj.kind}/{obj.name}: {event.message or ''}".strip())
            times = f" (x{count})" if count > 1 else ""
            self.say(
                f"event {obj.kind}/{obj.name}: {event.type} {event.reason}{times}: "
                f"{(event.message or '').strip()}"
            )

    def _note_failed_create(self, message: str) -> None:
        now = time.monotonic()
        first = self._failed_create[0] if self._failed_create else now
        if self._failed_create and now - self._failed_create[1] > self.create_failure_timeout:
            first = now  # creation had recovered since: a new episode
        self._failed_create = (first, now, message)

    def _check_pod_creation(self, kind: str, name: str, namespace: str) -> None:
        """PodCreationError once pods have kept failing to be created (new or repeated
        FailedCreate events) for create_failure_timeout seconds."""
        if self._failed_create is None:
            return
        first, last, message = self._failed_create
        if last - first >= self.create_failure_timeout:
            raise PodCreationError(
                f"the pods of {kind} {namespace}/{name} could not be created for "
                f"{last - first:.0f} s (ResourceQuota, Pod Security admission, a webhook?): "
                f"{message}\n(kubectl -n {namespace} get events "
                f"--field-selector reason=FailedCreate)"
            )

    def _jobset_state(self, name: str, namespace: str) -> tuple[str, str, str]:
        """A TrainJob's JobSet: report its restarts; its terminal condition as the TrainJob's
        (Completed -> Complete), or ("", "", "") while it has none or cannot be read."""
        if not self._jobset_readable:
            return "", "", ""
        try:
            jobset = self.custom.get_namespaced_custom_object(
                JOBSET_GROUP,
                JOBSET_VERSION,
                namespace,
                JOBSET_PLURAL,
                name,
                _request_timeout=self.request_timeout,
            )
        except ApiException as exc:
            if exc.status == 403:
                self._jobset_readable = False
                self.say(self._explain(exc, f"reading jobsets {namespace}/{name}", namespace))
            elif exc.status not in (404,) + TRANSIENT_STATUSES:
                raise
            return "", "", ""
        restarts = int((jobset.get("status") or {}).get("restarts") or 0)
        if restarts != self._jobset_restarts:
            self._jobset_restarts = restarts
            self.say(
                f"JobSet {namespace}/{name}: restarted {restarts} time(s) (all pods recreated)"
            )
        state, reason, message = condition(jobset, "Completed")
        if state == "Completed":
            return TRAINJOB.success, reason, message
        return (state, reason, message) if state == "Failed" else ("", "", "")

    def launcher_evicted(self, pod: tuple[str, str] | None) -> str:
        """being_evicted() of the launcher's pod `pod` (name, namespace); "" when there is no
        such pod or it cannot be read (then SIGTERM is taken as the run's termination)."""
        if pod is None:
            return ""
        try:
            return being_evicted(self.core.read_namespaced_pod(pod[0], pod[1], _request_timeout=10))
        except (ApiException, OSError) as exc:
            self.say(f"SIGTERM: cannot read this launcher's pod {pod[1]}/{pod[0]} ({exc})")
            return ""

    def _drain_logs(self) -> None:
        end = time.monotonic() + self.log_grace
        for t in self._streams.values():
            t.join(timeout=max(0.0, end - time.monotonic()))

    # ------------------------------------------------------------------ the wait
    def _poll(self, name: str, namespace: str) -> tuple[dict, str, str, str]:
        """One look at the job, its JobSet, pods and events: the job and its condition."""
        job = self.get(name, namespace)
        pod_names = self._watch_pods(name, namespace)
        self._watch_events(name, namespace, pod_names)
        state, reason, message = condition(job, self.backend.success)
        if self.backend is TRAINJOB:
            jobset = self._jobset_state(name, namespace)
            if jobset[0] and state not in ("Failed", TRAINJOB.success):
                state, reason, message = jobset
        return job, state, reason, message

    def wait(self, name: str, namespace: str, wait_timeout: float) -> dict:
        """Until the job's success condition (returns the job), Failed (JobFailedError) or
        wait_timeout seconds (JobTimeoutError). Transient API errors are retried;
        max_api_errors in a row fail."""
        b = self.backend
        start = time.monotonic()
        errors, last = 0, ""
        while True:
            state = ""
            try:
                job, state, reason, message = self._poll(name, namespace)
                errors = 0
            except ApiException as exc:
                if exc.status == 404:
                    raise LaunchError(
                        f"{b.kind} {namespace}/{name} disappeared (deleted by someone else?)"
                    ) from exc
                if exc.status not in TRANSIENT_STATUSES:
                    action = f"following {b.plural} {namespace}/{name}"
                    raise LaunchError(self._explain(exc, action, namespace)) from exc
                errors += 1
                action = f"following {namespace}/{name} (retrying)"
                self.say(self._explain(exc, action, namespace))
                if errors >= self.max_api_errors:
                    raise LaunchError(
                        f"{errors} API errors in a row following {namespace}/{name}"
                    ) from exc
            except (OSError, ConnectionError) as exc:  # urllib3 errors derive from these
                errors += 1
                self.say(f"API server unreachable ({exc}); retrying")
                if errors >= self.max_api_errors:
                    raise LaunchError(f"API server unreachable {errors} times in a row") from exc
            if state and state != last:
                self.say(f"{b.kind} {namespace}/{name}: {state} ({reason}) {message}".rstrip())
                last = state
            if state not in (b.success, "Failed"):
                self._check_pod_creation(b.kind, name, namespace)
            if state == b.success:
                self._drain_logs()
                return job
            if state == "Failed":
                self._drain_logs()
                raise JobFailedError(
                    f"{b.kind} {namespace}/{name} Failed: {reason}: {message}\n"
                    f"Pods: {json.dumps(self._pod_states)}\n({b.log_hint(name, namespace)})"
                )
            elapsed = time.monotonic() - start
            if elapsed >= wait_timeout:
                raise JobTimeoutError(
                    f"{b.kind} {namespace}/{name} did not finish within {wait_timeout:.0f} s "
                    f"(last condition: {last or 'none'}; pods: {json.dumps(self._pod_states)})"
                )
            time.sleep(min(self.poll_interval, max(0.0, wait_timeout - elapsed)))


def run_job(
    job: dict,
    *,
    wait_timeout: float,
    runtime: dict | None = None,
    delete: str = "on_success",
    api_client: k8s.ApiClient | None = None,
    out: TextIO | None = None,
    poll_interval: float = 10.0,
    log_grace: float = 30.0,
    create_failure_timeout: float = 900.0,
    launcher_pod: tuple[str, str] | None = None,
) -> dict:
    """Submit `job` (a PyTorchJob, or a TrainJob with the TrainingRuntime `runtime` it runs on,
    created first), follow it to the end, delete it (and the runtime) per `delete`; returns the
    finished job (its success condition: Succeeded, or Complete for a TrainJob, perhaps still
    only on its JobSet).

    Raises LaunchError (API/RBAC), JobFailedError, JobTimeoutError, PodCreationError (pods not
    created for create_failure_timeout seconds). SIGTERM exits 143: when KFP terminates the run
    the job is deleted; when the launcher's own pod (`launcher_pod`, (name, namespace), by
    default own_pod()) is being evicted or deleted the job is left running, for a retry of the
    step to re-attach to.
    """
    if delete not in DELETE_POLICIES:
        raise ValueError(f"delete must be one of {DELETE_POLICIES}, got {delete!r}")
    backend = BACKENDS[job["kind"]]
    if (runtime is not None) != (backend is TRAINJOB):
        raise ValueError("a TrainJob needs its TrainingRuntime (runtime=), a PyTorchJob none")
    launcher = Launcher(
        api_client,
        backend=backend,
        out=out,
        poll_interval=poll_interval,
        log_grace=log_grace,
        create_failure_timeout=create_failure_timeout,
    )
    name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_sigterm(signum, frame):
            raise Cancelled()

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    submitted, succeeded = [], False
    try:
        if runtime is not None:
            launcher.submit_runtime(runtime)
            submitted.append(runtime)
        launcher.submit(job)
        submitted.append(job)
        result = launcher.wait(name, ns, wait_timeout)
        succeeded = True
        return result
    except (Cancelled, KeyboardInterrupt):
        evicted = launcher.launcher_evicted(launcher_pod or own_pod())
        if evicted:
            launcher.say(
                f"SIGTERM: this launcher's pod is going away ({evicted}), not the run: leaving "
                f"the {backend.kind} running; a retry of this step re-attaches to it"
            )
            delete = "never"
        else:
            launcher.say("cancelled (the run was terminated): deleting the job")
            delete = "always"
        raise SystemExit(143) from None
    finally:
        if submitted and (delete == "always" or (delete == "on_success" and succeeded)):
            if job in submitted:
                launcher.delete(name, ns)
            if runtime is not None:
                launcher.delete_runtime(runtime["metadata"]["name"], ns)
        elif submitted:
            kept = " and its TrainingRuntime" if runtime is not None else ""
            launcher.say(f"kept {backend.kind} {ns}/{name}{kept} (delete={delete})")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
