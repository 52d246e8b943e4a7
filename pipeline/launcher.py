"""Submit a PyTorchJob, stream its master's log, wait for it, fail loudly, clean up.

Written against the Kubernetes REST API (kubernetes.client.CustomObjectsApi / CoreV1Api) rather
than kubeflow-training's TrainingClient, to avoid the failure modes listed in
../shared/spec/kubeflow.md §3 and §7:
- `create_job` re-raises every API error as "Failed to create PyTorchJob", hiding the status and
  message: here a 403 names the RBAC the service account lacks, a 404 the missing CRD/namespace;
- `wait_for_job_conditions(timeout=...)` is the per-request timeout (the wait is `wait_timeout`,
  600 s by default), and the retired launcher listed `Failed` as an expected condition, so a
  failed job turned the KFP step green. Here `Succeeded` returns, `Failed` raises JobFailedError,
  and `wait_timeout` (the whole wait) raises JobTimeoutError;
- `get_job_logs(follow=True)` blocks on Pending pods: here the master's log is followed in a
  thread (again after every restart of its pod) while the main loop watches the job's
  conditions and reports pod states (Unschedulable, ImagePullBackOff, ...) as they change.
The job is deleted per `delete` ("always", "on_success", "never") and always when the launcher is
cancelled (SIGTERM from a KFP run termination, Ctrl-C).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import TextIO

import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
RBAC = (
    "  - apiGroups: [kubeflow.org]  resources: [pytorchjobs]  verbs: [create, get, list, watch, delete]\n"
    "  - apiGroups: [kubeflow.org]  resources: [pytorchjobs/status]  verbs: [get]\n"
    '  - apiGroups: [""]  resources: [pods]  verbs: [get, list, watch]\n'
    '  - apiGroups: [""]  resources: [pods/log]  verbs: [get]'
)
TRANSIENT_STATUSES = (0, 429, 500, 502, 503, 504)  # 0: no HTTP answer (connection error)


class LaunchError(RuntimeError):
    """The job could not be submitted or followed (API error, RBAC, missing CRD)."""


class JobFailedError(LaunchError):
    """The PyTorchJob reached the Failed condition."""


class JobTimeoutError(LaunchError, TimeoutError):
    """The PyTorchJob did not finish within wait_timeout."""


class Cancelled(BaseException):
    """SIGTERM: the KFP run was terminated."""


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


def explain(exc: ApiException, action: str, namespace: str) -> str:
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
            f"Role (bound to it with a RoleBinding) with:\n{RBAC}\n"
            "Multi-user Kubeflow grants these through ClusterRole kubeflow-edit only when the "
            "Training Operator was installed with its overlays/kubeflow roles "
            "(kubeflow-training-edit); see manifests/base/rbac."
        )
    elif exc.status == 401:
        text += "\nThe API server rejected the credentials (expired token or wrong kubeconfig)."
    elif exc.status == 404 and PLURAL in action:
        text += (
            f"\nIs the Training Operator installed (CRD pytorchjobs.{GROUP}, version {VERSION}) "
            f"and does namespace {namespace!r} exist?"
        )
    elif exc.status == 422:
        text += "\nThe API server (or the operator's webhook) rejected the PyTorchJob spec."
    return text


def condition(job: dict) -> tuple[str, str, str]:
    """(type, reason, message) of the newest condition whose status is True; ("", "", "")."""
    conds = [
        c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"
    ]
    if not conds:
        return "", "", ""
    for terminal in ("Failed", "Succeeded"):  # a terminal condition wins, whatever its position
        for c in conds:
            if c.get("type") == terminal:
                return terminal, c.get("reason", ""), c.get("message", "")
    c = conds[-1]
    return c.get("type", ""), c.get("reason", ""), c.get("message", "")


def pod_state(pod) -> str:
    """A one-line state: phase, plus why it waits or how it ended."""
    status = pod.status
    parts = [status.phase or "Unknown"]
    for c in status.conditions or []:
        if c.type == "PodScheduled" and c.status == "False" and c.reason:
            parts.append(f"{c.reason}: {c.message or ''}".strip())
    for cs in status.container_statuses or []:
        if cs.name != "pytorch" or cs.state is None:
            continue
        if cs.state.waiting and cs.state.waiting.reason not in (None, "ContainerCreating"):
            parts.append(f"{cs.state.waiting.reason}: {cs.state.waiting.message or ''}".strip())
        if cs.state.terminated:
            parts.append(
                f"exit code {cs.state.terminated.exit_code} ({cs.state.terminated.reason})"
            )
    return ", ".join(parts)


class Launcher:
    def __init__(
        self,
        api_client: k8s.ApiClient | None = None,
        *,
        out: TextIO | None = None,
        poll_interval: float = 10.0,
        request_timeout: float = 60.0,
        log_grace: float = 30.0,
        max_api_errors: int = 30,
    ):
        self.api_client = api_client or load_api_client()
        self.custom = k8s.CustomObjectsApi(self.api_client)
        self.core = k8s.CoreV1Api(self.api_client)
        self.out = out or sys.stdout
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.log_grace = log_grace
        self.max_api_errors = max_api_errors
        self._lock = threading.Lock()
        self._streams: dict[str, threading.Thread] = {}
        self._pod_states: dict[str, str] = {}

    def say(self, message: str) -> None:
        with self._lock:
            self.out.write(f"[launcher] {message}\n")
            self.out.flush()

    # ------------------------------------------------------------------ API calls
    def get(self, name: str, namespace: str) -> dict:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, _request_timeout=self.request_timeout
        )

    def submit(self, job: dict) -> dict:
        """Create the job; if one of that name exists (a retried step), adopt it unless it Failed,
        in which case it is replaced (the new one resumes from the checkpoints)."""
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        try:
            created = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, job, _request_timeout=self.request_timeout
            )
            self.say(f"created PyTorchJob {ns}/{name}")
            return created
        except ApiException as exc:
            if exc.status != 409:
                raise LaunchError(explain(exc, f"creating {PLURAL} {ns}/{name}", ns)) from exc
        try:
            existing = self.get(name, ns)
        except ApiException as exc:
            raise LaunchError(explain(exc, f"reading {PLURAL} {ns}/{name}", ns)) from exc
        state = condition(existing)[0]
        if state != "Failed":
            self.say(
                f"PyTorchJob {ns}/{name} already exists ({state or 'no condition'}): following it"
            )
            return existing
        self.say(f"PyTorchJob {ns}/{name} exists and Failed (an earlier attempt): replacing it")
        self.delete(name, ns)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                return self.custom.create_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, job, _request_timeout=self.request_timeout
                )
            except ApiException as exc:
                if exc.status != 409:
                    raise LaunchError(explain(exc, f"creating {PLURAL} {ns}/{name}", ns)) from exc
            time.sleep(2)
        raise LaunchError(f"the failed PyTorchJob {ns}/{name} was not deleted within 120 s")

    def delete(self, name: str, namespace: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body=k8s.V1DeleteOptions(propagation_policy="Background"),
                _request_timeout=self.request_timeout,
            )
            self.say(f"deleted PyTorchJob {namespace}/{name}")
        except ApiException as exc:
            if exc.status != 404:
                self.say(explain(exc, f"deleting {PLURAL} {namespace}/{name}", namespace))

    # ------------------------------------------------------------------ pods and logs
    def _follow_log(self, pod_name: str, namespace: str, prefix: str) -> None:
        try:
            resp = self.core.read_namespaced_pod_log(
                pod_name, namespace, container="pytorch", follow=True, _preload_content=False
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
            self.say(explain(exc, f"reading the log of pod {namespace}/{pod_name}", namespace))
        except Exception as exc:  # a dropped stream must not stop the wait
            self.say(f"log stream of {pod_name} ended: {type(exc).__name__}: {exc}")

    def _watch_pods(self, name: str, namespace: str) -> None:
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=f"{JOB_LABEL}={name}", _request_timeout=self.request_timeout
        )
        for pod in pods.items:
            pod_name = pod.metadata.name
            state = pod_state(pod)
            if self._pod_states.get(pod_name) != state:
                self._pod_states[pod_name] = state
                self.say(f"pod {pod_name}: {state}")
            role = (pod.metadata.labels or {}).get(REPLICA_TYPE_LABEL, "")
            restarts = sum(
                cs.restart_count or 0
                for cs in pod.status.container_statuses or []
                if cs.name == "pytorch"
            )
            # a recreated pod (ExitCode) has a new uid, a restarted container a new count
            uid = f"{pod.metadata.uid or pod_name}/{restarts}"
            started = pod.status.phase in ("Running", "Succeeded", "Failed")
            if role == "master" and started and uid not in self._streams:
                prefix = pod_name.removeprefix(f"{name}-")
                t = threading.Thread(
                    target=self._follow_log, args=(pod_name, namespace, prefix), daemon=True
                )
                self._streams[uid] = t
                t.start()

    def _drain_logs(self) -> None:
        end = time.monotonic() + self.log_grace
        for t in self._streams.values():
            t.join(timeout=max(0.0, end - time.monotonic()))

    # ------------------------------------------------------------------ the wait
    def wait(self, name: str, namespace: str, wait_timeout: float) -> dict:
        """Until Succeeded (returns the job), Failed (JobFailedError) or wait_timeout seconds
        (JobTimeoutError). Transient API errors are retried; max_api_errors in a row fail."""
        start = time.monotonic()
        errors, last = 0, ""
        while True:
            try:
                job = self.get(name, namespace)
                self._watch_pods(name, namespace)
                errors = 0
            except ApiException as exc:
                if exc.status == 404:
                    raise LaunchError(
                        f"PyTorchJob {namespace}/{name} disappeared (deleted by someone else?)"
                    ) from exc
                if exc.status not in TRANSIENT_STATUSES:
                    raise LaunchError(
                        explain(exc, f"following {PLURAL} {namespace}/{name}", namespace)
                    ) from exc
                errors += 1
                self.say(explain(exc, f"following {namespace}/{name} (retrying)", namespace))
                if errors >= self.max_api_errors:
                    raise LaunchError(
                        f"{errors} API errors in a row following {namespace}/{name}"
                    ) from exc
                job = None
            except (OSError, ConnectionError) as exc:  # urllib3 errors derive from these
                errors += 1
                self.say(f"API server unreachable ({exc}); retrying")
                if errors >= self.max_api_errors:
                    raise LaunchError(f"API server unreachable {errors} times in a row") from exc
                job = None
            if job is not None:
                state, reason, message = condition(job)
                if state and state != last:
                    self.say(
                        f"PyTorchJob {namespace}/{name}: {state} ({reason}) {message}".rstrip()
                    )
                    last = state
                if state == "Succeeded":
                    self._drain_logs()
                    return job
                if state == "Failed":
                    self._drain_logs()
                    raise JobFailedError(
                        f"PyTorchJob {namespace}/{name} Failed: {reason}: {message}\n"
                        f"Pods: {json.dumps(self._pod_states)}\n"
                        f"(kubectl -n {namespace} describe pytorchjob {name}; "
                        f"kubectl -n {namespace} logs {name}-master-0)"
                    )
            elapsed = time.monotonic() - start
            if elapsed >= wait_timeout:
                raise JobTimeoutError(
                    f"PyTorchJob {namespace}/{name} did not finish within {wait_timeout:.0f} s "
                    f"(last condition: {last or 'none'}; pods: {json.dumps(self._pod_states)})"
                )
            time.sleep(min(self.poll_interval, max(0.0, wait_timeout - elapsed)))


def run_job(
    job: dict,
    *,
    wait_timeout: float,
    delete: str = "on_success",
    api_client: k8s.ApiClient | None = None,
    out: TextIO | None = None,
    poll_interval: float = 10.0,
    log_grace: float = 30.0,
) -> dict:
    """Submit `job`, follow it to the end, delete it per `delete`; returns the Succeeded job.

    Raises LaunchError (API/RBAC), JobFailedError, JobTimeoutError. SIGTERM (KFP terminating the
    run) deletes the job and exits 143.
    """
    if delete not in ("always", "on_success", "never"):
        raise ValueError(f"delete must be always, on_success or never, got {delete!r}")
    launcher = Launcher(api_client, out=out, poll_interval=poll_interval, log_grace=log_grace)
    name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_sigterm(signum, frame):
            raise Cancelled()

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    submitted, succeeded = False, False
    try:
        launcher.submit(job)
        submitted = True
        result = launcher.wait(name, ns, wait_timeout)
        succeeded = True
        return result
    except (Cancelled, KeyboardInterrupt):
        launcher.say("cancelled: deleting the job")
        delete = "always"
        raise SystemExit(143) from None
    finally:
        if submitted and (delete == "always" or (delete == "on_success" and succeeded)):
            launcher.delete(name, ns)
        elif submitted:
            launcher.say(f"kept PyTorchJob {ns}/{name} (delete={delete})")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
