"""The cluster launcher against a Kubernetes API server STAND-IN (not a real API server).

`FakeApiServer` is a small http.server on 127.0.0.1 that answers the real REST paths the
launcher uses, with the kubernetes client pointed at it:
    POST/GET/DELETE /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs[/{name}]
    POST/GET/DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs[/{name}]
    POST/DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainingruntimes[/{name}]
    GET /apis/jobset.x-k8s.io/v1alpha2/namespaces/{ns}/jobsets/{name}
    GET /api/v1/namespaces/{ns}/pods?labelSelector=<the job's pod label>=<job>
    GET /api/v1/namespaces/{ns}/pods/{pod}/log?container=<pytorch|node>&follow=true
    GET /api/v1/namespaces/{ns}/events
It plays no operator: each test scripts the job's conditions (one step per GET of the job) and
can refuse the create with 403. What it proves: the launcher's requests, its reading of
conditions (success returns, Failed raises, the wait is bounded by wait_timeout), its error
messages, log streaming, Events, and its delete policy. What it cannot prove: RBAC, admission
webhooks or the operators' real behaviour (the CRD schema tests cover the specs' shape; the
TrainJob objects it returns, status included, are checked against the vendored v2.3.0 CRD).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client as k8s

from pipeline import launcher
from pipeline.jobspec import job_spec
from pipeline.pytorchjob import build_pytorchjob, job_name

JOBS = re.compile(
    r"^/apis/(kubeflow\.org/v1|trainer\.kubeflow\.org/v1alpha1)/namespaces/([^/]+)/"
    r"(pytorchjobs|trainjobs|trainingruntimes)(?:/([^/]+))?$"
)
JOBSETS = re.compile(r"^/apis/jobset\.x-k8s\.io/v1alpha2/namespaces/([^/]+)/jobsets/([^/]+)$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
POD = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")
EVENTS = re.compile(r"^/api/v1/namespaces/([^/]+)/events$")
STAMP = "2026-09-01T10:00:00Z"
FORBIDDEN = (
    'pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:team-a:default-editor" '
    'cannot create resource "pytorchjobs" in API group "kubeflow.org" in the namespace "team-a"'
)


@dataclass
class V2Step:
    """One step of a TrainJob script: the TrainJob's and its JobSet's terminal condition (""
    for none), the JobSet's restarts, node 0's pod phase ("" for no pod) and uid."""

    trainjob: str = ""
    jobset: str = ""
    restarts: int = 0
    phase: str = ""
    pod_uid: str = "pod-1"


# The condition a JobSet sets, with its reasons and messages, which the TrainJob copies (type
# Completed -> Complete): the shapes of a v2.3.0 TrainJob status (checked against its CRD below).
JOBSET_CONDITIONS = {
    "Completed": ("AllJobsCompleted", "jobset completed successfully"),
    "Failed": ("FailedJobs", "jobset failed due to one or more job failures"),
}
TRAINJOB_TYPES = {"Complete": "Completed", "Failed": "Failed"}


def v2_condition(jobset_type: str, as_type: str) -> dict:
    reason, message = JOBSET_CONDITIONS[jobset_type]
    return {
        "type": as_type,
        "status": "True",
        "observedGeneration": 1,
        "lastTransitionTime": STAMP,
        "reason": reason,
        "message": message,
    }


class FakeApiServer:
    """A stand-in for the API server + operator; `script` is a list of steps, advanced by each
    GET of the job; the last step repeats. A PyTorchJob step is (job condition, master pod
    phase), a TrainJob step a V2Step. `events` are the namespace's Events (dicts as the API
    returns them)."""

    def __init__(
        self,
        script,
        *,
        forbid_create=False,
        existing=None,
        log="hello from master\n",
        events=(),
        forbid_jobsets=False,
        launcher_pod=None,
        growing_events=False,
    ):
        self.script, self.forbid_create, self.log = list(script), forbid_create, log
        self.forbid_jobsets = forbid_jobsets
        self.events = list(events)
        self.growing_events = growing_events  # FailedCreate events repeat at every list
        self.launcher_pod = launcher_pod  # the launcher's own pod (a dict), read at SIGTERM
        self.jobs: dict[str, dict] = dict(existing or {})
        self.runtimes: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.step = -1
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def status(self, code, reason, message):
                self.reply(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def store(self, plural):
                return fake.runtimes if plural == "trainingruntimes" else fake.jobs

            def do_POST(self):
                fake.requests.append(("POST", self.path))
                m = JOBS.match(urlparse(self.path).path)
                obj = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not m or m.group(4):
                    return self.status(404, "NotFound", "no such path")
                if fake.forbid_create:
                    return self.status(403, "Forbidden", FORBIDDEN)
                name, store = obj["metadata"]["name"], self.store(m.group(3))
                if name in store:
                    group = m.group(1).split("/")[0]
                    return self.status(
                        409, "AlreadyExists", f'{m.group(3)}.{group} "{name}" already exists'
                    )
                obj["metadata"]["uid"] = "uid-" + name
                obj["metadata"]["creationTimestamp"] = STAMP
                store[name] = obj
                fake.created.append(obj)
                self.reply(201, obj)

            def do_DELETE(self):
                fake.requests.append(("DELETE", self.path))
                m = JOBS.match(urlparse(self.path).path)
                if not m or self.store(m.group(3)).pop(m.group(4), None) is None:
                    return self.status(404, "NotFound", "not found")
                self.reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

            def current(self):
                return fake.script[max(fake.step, 0)]

            def do_GET(self):
                url = urlparse(self.path)
                fake.requests.append(("GET", url.path))
                if m := JOBS.match(url.path):
                    job = fake.jobs.get(m.group(4))
                    if job is None:
                        return self.status(404, "NotFound", "not found")
                    fake.step = min(fake.step + 1, len(fake.script) - 1)
                    step = self.current()
                    if job["kind"] == "TrainJob":
                        job["status"] = trainjob_status(step)
                    else:
                        job["status"] = {
                            "conditions": [
                                {
                                    "type": step[0],
                                    "status": "True",
                                    "reason": f"PyTorchJob{step[0]}",
                                    "message": f"job is {step[0]}",
                                }
                            ]
                        }
                    return self.reply(200, job)
                if m := JOBSETS.match(url.path):
                    if fake.forbid_jobsets:
                        return self.status(403, "Forbidden", "jobsets is forbidden")
                    if m.group(2) not in fake.jobs:
                        return self.status(404, "NotFound", "not found")
                    return self.reply(200, jobset_object(m.group(2), m.group(1), self.current()))
                if m := PODS.match(url.path):
                    selector = parse_qs(url.query).get("labelSelector", [""])[0]
                    label, name = selector.split("=", 1)
                    items = []
                    if name in fake.jobs:
                        pod = pod_object(name, m.group(1), label, self.current())
                        items = [pod] if pod else []
                    return self.reply(
                        200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
                    )
                if m := LOG.match(url.path):
                    kind = "TrainJob" if "-node-0-0-" in m.group(2) else "PyTorchJob"
                    expected = launcher.BACKENDS[kind].container
                    assert parse_qs(url.query)["container"] == [expected]
                    return self.reply(200, fake.log.encode(), "text/plain")
                if m := POD.match(url.path):
                    pod = fake.launcher_pod
                    if pod is None or pod["metadata"]["name"] != m.group(2):
                        return self.status(404, "NotFound", f'pods "{m.group(2)}" not found')
                    return self.reply(200, pod)
                if EVENTS.match(url.path):
                    if fake.growing_events:
                        for e in fake.events:
                            if e["reason"] in launcher.FAILED_CREATE_REASONS:
                                e["count"] += 1
                    return self.reply(
                        200,
                        {
                            "kind": "EventList",
                            "apiVersion": "v1",
                            "metadata": {},
                            "items": fake.events,
                        },
                    )
                self.status(404, "NotFound", f"no such path {url.path}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def api_client(self) -> k8s.ApiClient:
        cfg = k8s.Configuration()
        cfg.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        return k8s.ApiClient(cfg)


def trainjob_status(step: V2Step) -> dict:
    """A TrainJob's status as Trainer v2.3.0 writes it: the JobSet's terminal condition copied
    (Completed -> Complete), and the replicated jobs' counts."""
    status = {
        "jobsStatus": [
            {"name": "node", "ready": 0, "succeeded": 0, "failed": 0, "active": 1, "suspended": 0}
        ]
    }
    if step.trainjob:
        status["conditions"] = [v2_condition(TRAINJOB_TYPES[step.trainjob], step.trainjob)]
    return status


def jobset_object(name: str, namespace: str, step: V2Step) -> dict:
    status = {
        "restarts": step.restarts,
        "restartsCountTowardsMax": step.restarts,
        "replicatedJobsStatus": [
            {"name": "node", "ready": 1, "succeeded": 0, "failed": 0, "active": 1, "suspended": 0}
        ],
    }
    if step.jobset:
        status["conditions"] = [v2_condition(step.jobset, step.jobset)]
        status["terminalState"] = step.jobset
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "namespace": namespace, "uid": "jobset-" + name},
        "spec": {"replicatedJobs": []},
        "status": status,
    }


def pod_object(name: str, namespace: str, label: str, step) -> dict | None:
    """The rank-0 pod of job `name` with the labels its controller sets: the Training
    Operator's (`<job>-master-0`) or JobSet's and the Indexed Job's (`<job>-node-0-0-<hash>`)."""
    if label == launcher.JOBSET_NAME_LABEL:
        if not step.phase:
            return None
        pod_name, uid, phase = f"{name}-node-0-0-x7k2p", step.pod_uid, step.phase
        labels = {
            launcher.JOBSET_NAME_LABEL: name,
            launcher.REPLICATED_JOB_LABEL: "node",
            launcher.COMPLETION_INDEX_LABEL: "0",
            "jobset.sigs.k8s.io/job-index": "0",
            "batch.kubernetes.io/job-name": f"{name}-node-0",
        }
    else:
        if not step[1]:
            return None
        pod_name, uid, phase = f"{name}-master-0", "pod-1", step[1]
        labels = {launcher.JOB_LABEL: name, launcher.REPLICA_TYPE_LABEL: "master"}
    return {
        "metadata": {"name": pod_name, "namespace": namespace, "uid": uid, "labels": labels},
        "status": {"phase": phase},
    }


def event(kind: str, name: str, reason: str, message: str, type_="Warning", count=1) -> dict:
    """An Event as the API returns it (core/v1)."""
    return {
        "metadata": {"name": f"{name}.17f0a1", "namespace": "team-a", "uid": f"ev-{name}-{reason}"},
        "involvedObject": {"kind": kind, "name": name, "namespace": "team-a"},
        "reason": reason,
        "message": message,
        "type": type_,
        "count": count,
        "firstTimestamp": STAMP,
        "lastTimestamp": STAMP,
        "source": {"component": "default-scheduler"},
    }


def a_job(name="pirl-run-1", namespace="team-a") -> dict:
    return build_pytorchjob(
        job_spec(
            name=name, namespace=namespace, image="img", args=["-m", "pirl.train"], num_nodes=2
        )
    )


def run(fake, job=None, *, wait_timeout=30.0, delete="on_success"):
    out = io.StringIO()
    try:
        return launcher.run_job(
            job or a_job(),
            wait_timeout=wait_timeout,
            delete=delete,
            api_client=fake.api_client(),
            out=out,
            poll_interval=0.05,
            log_grace=5,
        ), out.getvalue()
    except launcher.LaunchError as exc:
        exc.output = out.getvalue()
        raise


def test_submit_watch_succeed_streams_the_master_log_and_deletes():
    script = [
        ("Created", ""),
        ("Running", "Pending"),
        ("Running", "Running"),
        ("Succeeded", "Succeeded"),
    ]
    with FakeApiServer(script) as fake:
        job, out = run(fake)
    assert launcher.condition(job)[0] == "Succeeded"
    assert ("POST", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs") in fake.requests
    assert "[master-0] hello from master" in out
    assert "pod pirl-run-1-master-0: Running" in out
    assert fake.requests[-1] == (
        "DELETE",
        "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs/pirl-run-1",
    )
    assert not fake.jobs


def test_failed_job_fails_the_step_and_keeps_the_job():
    with FakeApiServer([("Created", ""), ("Running", "Running"), ("Failed", "Failed")]) as fake:
        with pytest.raises(
            launcher.JobFailedError, match="Failed: PyTorchJobFailed: job is Failed"
        ) as err:
            run(fake)
        assert "pirl-run-1" in fake.jobs  # delete=on_success keeps it for `kubectl describe`
    assert "kept PyTorchJob team-a/pirl-run-1" in err.value.output


def test_failed_job_is_deleted_with_delete_always():
    with FakeApiServer([("Failed", "Failed")]) as fake:
        with pytest.raises(launcher.JobFailedError):
            run(fake, delete="always")
        assert not fake.jobs


def test_wait_timeout_bounds_the_whole_wait():
    with FakeApiServer([("Created", ""), ("Running", "Running")]) as fake:
        with pytest.raises(
            launcher.JobTimeoutError, match=r"did not finish within 1 s \(last condition: Running"
        ):
            run(fake, wait_timeout=1.0)
        gets = sum(
            1 for m, p in fake.requests if m == "GET" and p.endswith("/pytorchjobs/pirl-run-1")
        )
        assert gets > 3  # it polled for the whole second, then stopped
        assert "pirl-run-1" in fake.jobs


def test_forbidden_names_the_missing_rbac():
    with FakeApiServer([("Created", "")], forbid_create=True) as fake:
        with pytest.raises(launcher.LaunchError) as err:
            run(fake)
    text = str(err.value)
    assert "HTTP 403" in text and FORBIDDEN in text
    for needed in (
        "resources: [pytorchjobs]",
        "verbs: [create, get, delete]",
        "pods/log",
        "namespace 'team-a'",
        "manifests/overlays/kfp/multi-user",  # where the Role comes from (the RBAC overlays)
    ):
        assert needed in text
    for overlay in ("overlays/kfp/multi-user", "overlays/kfp/standalone", "overlays/rbac"):
        assert (Path(__file__).parents[1] / "manifests" / overlay / "kustomization.yaml").is_file()
    assert not [r for r in fake.requests if r[0] == "DELETE"]  # nothing was created


def test_existing_running_job_is_adopted_not_duplicated():
    existing = {"pirl-run-1": a_job()}
    with FakeApiServer(
        [("Running", "Running"), ("Succeeded", "Succeeded")], existing=existing
    ) as fake:
        _, out = run(fake)
    assert "already exists (Running): following it" in out
    assert sum(1 for m, _ in fake.requests if m == "POST") == 1


def test_existing_failed_job_fails_the_retried_step_at_once():
    """A retried step (the launcher evicted, or the step failed) never reruns a Failed job."""
    existing = {"pirl-run-1": a_job()}
    with FakeApiServer([("Failed", ""), ("Succeeded", "Succeeded")], existing=existing) as fake:
        with pytest.raises(launcher.JobFailedError, match="already Failed in an earlier attempt"):
            run(fake)
        assert "pirl-run-1" in fake.jobs  # kept for kubectl describe
    assert [m for m, _ in fake.requests if m in ("POST", "DELETE")] == ["POST"]


def test_explain_404_points_at_the_crd():
    exc = k8s.ApiException(status=404, reason="Not Found")
    exc.body = json.dumps({"message": "the server could not find the requested resource"})
    text = launcher.explain(exc, "creating pytorchjobs ns/x", "ns")
    assert "HTTP 404" in text and "pytorchjobs.kubeflow.org" in text


def test_job_name_is_dns_1035_and_short():
    name = job_name("pirl", "0F5A2B7C-1234-5678-9ABC-DEF012345678-extra-long-suffix")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 50
    assert job_name("pirl", "123") == "pirl-123"
    assert job_name("9x", "")[0].isalpha()


# ------------------------------------------------------------------------------ TrainJob (v2)
def a_trainjob_run(name="pirl-run-1", namespace="team-a") -> tuple[dict, dict]:
    from pipeline.trainjob import build_run

    return build_run(
        job_spec(
            name=name, namespace=namespace, image="img", args=["-m", "pirl.train"], num_nodes=2
        )
    )


def run_v2(fake, *, wait_timeout=30.0, delete="on_success"):
    runtime, job = a_trainjob_run()
    out = io.StringIO()
    try:
        return launcher.run_job(
            job,
            runtime=runtime,
            wait_timeout=wait_timeout,
            delete=delete,
            api_client=fake.api_client(),
            out=out,
            poll_interval=0.05,
            log_grace=5,
        ), out.getvalue()
    except launcher.LaunchError as exc:
        exc.output = out.getvalue()
        raise


V2_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a"


def test_trainjob_runtime_then_job_complete_streams_node0_and_deletes_both():
    from .k8s_helpers import trainer_v2_errors

    script = [
        V2Step(),
        V2Step(phase="Pending"),
        V2Step(phase="Running"),
        V2Step(trainjob="Complete", jobset="Completed", phase="Succeeded"),
    ]
    with FakeApiServer(script, log="hello from node 0\n") as fake:
        job, out = run_v2(fake)
    posts = [path for method, path in fake.requests if method == "POST"]
    assert posts == [f"{V2_PATH}/trainingruntimes", f"{V2_PATH}/trainjobs"]
    assert launcher.condition(job, "Complete")[:2] == ("Complete", "AllJobsCompleted")
    assert trainer_v2_errors(job) == []  # the stand-in's TrainJob, status included, is v2.3.0's
    assert "[node-0-0-x7k2p] hello from node 0" in out
    assert "pod pirl-run-1-node-0-0-x7k2p: Running" in out
    assert "TrainJob team-a/pirl-run-1: Complete (AllJobsCompleted)" in out
    deletes = [path for method, path in fake.requests if method == "DELETE"]
    assert deletes == [f"{V2_PATH}/trainjobs/pirl-run-1", f"{V2_PATH}/trainingruntimes/pirl-run-1"]
    assert not fake.jobs and not fake.runtimes


def test_failed_trainjob_fails_the_step_and_keeps_job_and_runtime():
    script = [V2Step(phase="Running"), V2Step(trainjob="Failed", jobset="Failed", phase="Failed")]
    with FakeApiServer(script) as fake:
        with pytest.raises(launcher.JobFailedError) as err:
            run_v2(fake)
        assert "pirl-run-1" in fake.jobs and "pirl-run-1" in fake.runtimes
    text = str(err.value)
    assert "TrainJob team-a/pirl-run-1 Failed: FailedJobs: jobset failed" in text
    assert "describe trainjob pirl-run-1" in text
    assert "batch.kubernetes.io/job-completion-index=0" in text
    assert "kept TrainJob team-a/pirl-run-1 and its TrainingRuntime" in err.value.output


def test_a_jobset_condition_counts_before_the_trainjob_copies_it():
    with FakeApiServer([V2Step(phase="Running"), V2Step(jobset="Completed")]) as fake:
        _, out = run_v2(fake)
    assert "TrainJob team-a/pirl-run-1: Complete (AllJobsCompleted)" in out
    with FakeApiServer([V2Step(phase="Running"), V2Step(jobset="Failed")]) as fake:
        with pytest.raises(launcher.JobFailedError, match="FailedJobs"):
            run_v2(fake)


def test_jobset_restarts_are_reported_and_the_new_node0_log_followed():
    script = [
        V2Step(phase="Running"),
        V2Step(phase="Running"),
        V2Step(restarts=1, phase="Running", pod_uid="pod-2"),
        V2Step(restarts=1, phase="Running", pod_uid="pod-2"),
        V2Step(
            trainjob="Complete", jobset="Completed", restarts=1, phase="Succeeded", pod_uid="pod-2"
        ),
    ]
    with FakeApiServer(script, log="resumed\n") as fake:
        _, out = run_v2(fake)
    assert "JobSet team-a/pirl-run-1: restarted 1 time(s) (all pods recreated)" in out
    assert out.count("[node-0-0-x7k2p] resumed") == 2  # both lives of node 0


def test_jobsets_not_readable_is_said_once_and_the_trainjob_decides():
    script = [V2Step(phase="Running"), V2Step(trainjob="Complete", phase="Succeeded")]
    with FakeApiServer(script, forbid_jobsets=True) as fake:
        _, out = run_v2(fake)
    assert out.count("HTTP 403") == 1 and "resources: [jobsets]" in out
    assert "Complete" in out


def test_forbidden_trainjob_names_the_v2_rbac():
    with FakeApiServer([V2Step()], forbid_create=True) as fake:
        with pytest.raises(launcher.LaunchError) as err:
            run_v2(fake)
    text = str(err.value)
    assert "HTTP 403" in text and "creating trainingruntimes team-a/pirl-run-1" in text
    for needed in (
        "resources: [trainjobs]",
        "resources: [trainingruntimes]",
        "resources: [jobsets]",
    ):
        assert needed in text
    assert not [r for r in fake.requests if r[0] == "DELETE"]  # nothing was created


def test_events_of_the_job_and_its_pods_are_surfaced_once():
    events = [
        event(
            "Pod",
            "pirl-run-1-node-0-0-x7k2p",
            "FailedScheduling",
            "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
            count=3,
        ),
        event("Pod", "pirl-run-1-node-0-0-x7k2p", "Scheduled", "assigned", type_="Normal"),
        event(
            "Job",
            "pirl-run-1-node-0",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ),
        event("JobSet", "pirl-run-1", "RestartJobSet", "restarting", type_="Normal"),
        event("Pod", "other-job-node-0-0-abcde", "FailedScheduling", "not ours"),
    ]
    script = [V2Step(phase="Pending"), V2Step(phase="Pending"), V2Step(trainjob="Complete")]
    with FakeApiServer(script, events=events) as fake:
        _, out = run_v2(fake)
    assert (
        "event Pod/pirl-run-1-node-0-0-x7k2p: Warning FailedScheduling (x3): 0/4 nodes are "
        "available: 4 Insufficient nvidia.com/gpu." in out
    )
    assert out.count("FailedScheduling") == 1  # reported once, though listed at every poll
    assert "event Job/pirl-run-1-node-0: Warning BackoffLimitExceeded" in out
    assert "event JobSet/pirl-run-1: Normal RestartJobSet: restarting" in out
    assert "Scheduled: assigned" not in out and "not ours" not in out


def test_pytorchjob_events_are_surfaced_too():
    events = [event("Pod", "pirl-run-1-master-0", "FailedMount", 'secret "x" not found')]
    with FakeApiServer([("Created", "Pending"), ("Succeeded", "Succeeded")], events=events) as fake:
        _, out = run(fake)
    assert 'event Pod/pirl-run-1-master-0: Warning FailedMount: secret "x" not found' in out


def test_a_trainjob_needs_its_runtime():
    runtime, job = a_trainjob_run()
    with pytest.raises(ValueError, match="TrainingRuntime"):
        launcher.run_job(job, wait_timeout=1, api_client=k8s.ApiClient())
    with pytest.raises(ValueError, match="TrainingRuntime"):
        launcher.run_job(a_job(), runtime=runtime, wait_timeout=1, api_client=k8s.ApiClient())


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_train_step_submits_to_the_cluster_and_fills_model_and_metrics(
    tmp_path, monkeypatch, backend
):
    """The `train` component's cluster path: job built from the step's parameters, submitted,
    followed; the Model and Metrics come from what the job wrote (pre-written here)."""
    from types import SimpleNamespace

    from pipeline import steps

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "trunk.safetensors").write_bytes(b"weights")
    (ckpt / "metrics.jsonl").write_text(
        json.dumps({"global_step": 5, "loss": 3.5, "images_per_sec": 10.0})
        + "\n"
        + json.dumps({"global_step": 5, "epoch": 0, "epoch_loss": 4.0, "epoch_seconds": 36})
        + "\n"
    )
    monkeypatch.setenv("KFP_POD_NAME", "run-train-pod")
    monkeypatch.setenv("KFP_POD_UID", "uid-123")
    monkeypatch.setattr(steps, "pod_namespace", lambda: "team-a")  # the step's pod runs there
    logged = {}
    model = SimpleNamespace(path=str(tmp_path / "model"), metadata={})
    metrics = SimpleNamespace(log_metric=logged.__setitem__)
    step = ("Succeeded", "Succeeded") if backend == "pytorchjob" else V2Step(trainjob="Complete")
    with FakeApiServer([step]) as fake:
        monkeypatch.setattr(launcher, "load_api_client", fake.api_client)
        steps.train(
            "s3://pirl/datasets/x",
            model,
            metrics,
            config="pretrain/pirl/pirl_jigsaw_4node_resnet50",
            overrides=[],
            num_nodes=4,
            nproc_per_node=8,
            gpus_per_node=8,
            image="img:1",
            run_id="6F1C2A9E-run",
            output_root=str(tmp_path),
            checkpoint_dir=str(ckpt),
            namespace="team-a",
            secret_name="pirl-s3-credentials",
            launcher="cluster",
            backend=backend,
        )
        posted = [path for method, path in fake.requests if method == "POST"]
        owner = [{"apiVersion": "v1", "kind": "Pod", "name": "run-train-pod", "uid": "uid-123"}]
        if backend == "pytorchjob":
            assert posted == ["/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs"]
            (job,) = fake.created
            assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
        else:
            assert posted == [f"{V2_PATH}/trainingruntimes", f"{V2_PATH}/trainjobs"]
            runtime, job = fake.created
            assert runtime["metadata"]["ownerReferences"] == owner
            assert job["spec"]["trainer"]["numNodes"] == 4
            assert job["spec"]["trainer"]["numProcPerNode"] == 8
        assert job["metadata"]["ownerReferences"] == owner
        assert not fake.jobs and not fake.runtimes  # deleted on success
    assert open(model.path, "rb").read() == b"weights"
    assert model.metadata["trunk_url"] == f"{ckpt}/trunk.safetensors"
    assert model.metadata["job_name"] == "pirl-6f1c2a9e-run"
    assert model.metadata["launcher"] == "cluster" and model.metadata["backend"] == backend
    assert logged["final_loss"] == 3.5 and logged["train_hours"] == 0.01


# ------------------------------------------------------------------------------ what the cluster says
def launcher_pod(evicted: bool) -> dict:
    """The launcher's own pod as the API returns it: an evicted one (node drain, autoscaler) has
    a DisruptionTarget condition and a deletionTimestamp; one whose run KFP terminates has not."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "pirl-pretrain-train-abc12", "namespace": "team-a", "uid": "p-1"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    if evicted:
        pod["metadata"]["deletionTimestamp"] = STAMP
        pod["metadata"]["deletionGracePeriodSeconds"] = 30
        pod["status"]["conditions"].append(
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting",
                "lastTransitionTime": STAMP,
            }
        )
    return pod


def sigterm_soon(seconds: float = 0.5) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    return timer


def run_until_sigterm(fake, job=None, **kwargs):
    out = io.StringIO()
    sigterm_soon()
    with pytest.raises(SystemExit) as exit_info:
        launcher.run_job(
            job or a_job(),
            wait_timeout=30,
            api_client=fake.api_client(),
            out=out,
            poll_interval=0.05,
            log_grace=1,
            launcher_pod=("pirl-pretrain-train-abc12", "team-a"),
            **kwargs,
        )
    assert exit_info.value.code == 143
    return out.getvalue()


def test_sigterm_of_a_terminated_run_deletes_the_job():
    with FakeApiServer([("Running", "Running")], launcher_pod=launcher_pod(False)) as fake:
        out = run_until_sigterm(fake)
        assert not fake.jobs
    assert "cancelled (the run was terminated): deleting the job" in out
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_sigterm_of_an_evicted_launcher_keeps_the_job_and_a_retry_reattaches():
    script = [("Running", "Running")] * 20 + [("Succeeded", "Succeeded")]
    with FakeApiServer(script, launcher_pod=launcher_pod(True)) as fake:
        out = run_until_sigterm(fake)
        assert "pirl-run-1" in fake.jobs  # still running for the retry
        assert "DisruptionTarget: EvictionByEvictionAPI" in out
        assert "kept PyTorchJob team-a/pirl-run-1 (delete=never)" in out
        _, retry = run(fake)  # the step's retry, in a new pod
    assert "already exists (Running): following it" in retry
    assert sum(1 for m, _ in fake.requests if m == "POST") == 2  # one create, one 409


def test_sigterm_of_a_trainjob_run_deletes_job_and_runtime():
    runtime, job = a_trainjob_run()
    with FakeApiServer([V2Step(phase="Running")], launcher_pod=launcher_pod(False)) as fake:
        run_until_sigterm(fake, job, runtime=runtime)
        assert not fake.jobs and not fake.runtimes


def test_pods_that_cannot_be_created_fail_the_step_after_the_bound():
    quota = (
        'Error creating: pods "pirl-run-1-node-0-0-x7k2p" is forbidden: exceeded quota: gpu, '
        "requested: requests.nvidia.com/gpu=8, used: requests.nvidia.com/gpu=0, limited: "
        "requests.nvidia.com/gpu=4"
    )
    events = [event("Job", "pirl-run-1-node-0", "FailedCreate", quota)]
    runtime, job = a_trainjob_run()
    with FakeApiServer([V2Step()], events=events, growing_events=True) as fake:
        out = io.StringIO()
        with pytest.raises(launcher.PodCreationError, match="could not be created for") as err:
            launcher.run_job(
                job,
                runtime=runtime,
                wait_timeout=30,
                api_client=fake.api_client(),
                out=out,
                poll_interval=0.05,
                log_grace=1,
                create_failure_timeout=0.5,
            )
    assert "exceeded quota: gpu" in str(err.value)
    assert "event Job/pirl-run-1-node-0: Warning FailedCreate" in out.getvalue()


def test_a_single_failed_create_is_reported_but_does_not_fail_the_step():
    events = [
        event("PyTorchJob", "pirl-run-1", "FailedCreatePod", "Error creating: webhook timeout")
    ]
    script = [("Created", ""), ("Created", ""), ("Running", "Running"), ("Succeeded", "Succeeded")]
    with FakeApiServer(script, events=events) as fake:
        _, out = run(fake)
    assert "Warning FailedCreatePod: Error creating: webhook timeout" in out


def test_being_evicted_reads_the_pod():
    assert launcher.being_evicted(k8s_pod(launcher_pod(True))).startswith("DisruptionTarget")
    assert launcher.being_evicted(k8s_pod(launcher_pod(False))) == ""
    deleted = launcher_pod(False)
    deleted["metadata"]["deletionTimestamp"] = STAMP
    assert launcher.being_evicted(k8s_pod(deleted)) == "the pod is being deleted"


def k8s_pod(data: dict):
    """A pod dict as the kubernetes client's V1Pod (as read_namespaced_pod returns it)."""
    from types import SimpleNamespace

    response = SimpleNamespace(data=json.dumps(data))
    return k8s.ApiClient().deserialize(response, "V1Pod")


def test_a_job_kueue_holds_suspended_is_waited_for_not_failed():
    """A queued job (label kueue.x-k8s.io/queue-name) is Suspended, with no pods and no
    FailedCreate, until Kueue admits it: the step says so and waits past the pod-creation bound."""
    script = [("Created", "")] + [("Suspended", "")] * 12 + [("Running", "Running")] * 2
    script.append(("Succeeded", "Succeeded"))
    queued = build_pytorchjob(
        job_spec(name="pirl-run-1", namespace="team-a", image="img", args=[], queue_name="pirl")
    )
    out = io.StringIO()
    with FakeApiServer(script) as fake:
        job = launcher.run_job(
            queued,
            wait_timeout=30.0,
            delete="on_success",
            api_client=fake.api_client(),
            out=out,
            poll_interval=0.05,
            log_grace=5,
            create_failure_timeout=0.2,
        )
    assert launcher.condition(job)[0] == "Succeeded"
    (created,) = fake.created
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "pirl"
    assert "PyTorchJob team-a/pirl-run-1: Suspended" in out.getvalue()
