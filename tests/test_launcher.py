"""The cluster launcher against a Kubernetes API server STAND-IN (not a real API server).

`FakeApiServer` is ~100 lines of http.server on 127.0.0.1 that answers the real REST paths the
launcher uses, with the kubernetes client pointed at it:
    POST/GET/DELETE /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs[/{name}]
    GET /api/v1/namespaces/{ns}/pods?labelSelector=training.kubeflow.org/job-name=<job>
    GET /api/v1/namespaces/{ns}/pods/{pod}/log?container=pytorch&follow=true
It plays no operator: each test scripts the job's conditions (one step per GET of the job) and
can refuse the create with 403. What it proves: the launcher's requests, its reading of
conditions (Succeeded returns, Failed raises, the wait is bounded by wait_timeout), its error
messages, log streaming and its delete policy. What it cannot prove: RBAC, admission webhooks or
the operator's real behaviour (the CRD schema test covers the spec's shape).
"""

from __future__ import annotations

import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client as k8s

from pipeline import launcher
from pipeline.pytorchjob import build_pytorchjob, job_name

JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
FORBIDDEN = (
    'pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:team-a:default-editor" '
    'cannot create resource "pytorchjobs" in API group "kubeflow.org" in the namespace "team-a"'
)


class FakeApiServer:
    """A stand-in for the API server + operator; `script` is a list of (job condition, master pod
    phase) steps, advanced by each GET of the job; the last step repeats."""

    def __init__(self, script, *, forbid_create=False, existing=None, log="hello from master\n"):
        self.script, self.forbid_create, self.log = list(script), forbid_create, log
        self.jobs: dict[str, dict] = dict(existing or {})
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

            def do_POST(self):
                fake.requests.append(("POST", self.path))
                m = JOBS.match(urlparse(self.path).path)
                job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not m or m.group(2):
                    return self.status(404, "NotFound", "no such path")
                if fake.forbid_create:
                    return self.status(403, "Forbidden", FORBIDDEN)
                name = job["metadata"]["name"]
                if name in fake.jobs:
                    return self.status(
                        409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{name}" already exists'
                    )
                job["metadata"]["uid"] = "uid-" + name
                fake.jobs[name] = job
                fake.created.append(job)
                self.reply(201, job)

            def do_DELETE(self):
                fake.requests.append(("DELETE", self.path))
                m = JOBS.match(urlparse(self.path).path)
                if not m or fake.jobs.pop(m.group(2), None) is None:
                    return self.status(404, "NotFound", "not found")
                self.reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

            def do_GET(self):
                url = urlparse(self.path)
                fake.requests.append(("GET", url.path))
                if m := JOBS.match(url.path):
                    job = fake.jobs.get(m.group(2))
                    if job is None:
                        return self.status(404, "NotFound", "not found")
                    fake.step = min(fake.step + 1, len(fake.script) - 1)
                    cond = fake.script[fake.step][0]
                    job["status"] = {
                        "conditions": [
                            {
                                "type": cond,
                                "status": "True",
                                "reason": f"PyTorchJob{cond}",
                                "message": f"job is {cond}",
                            }
                        ]
                    }
                    return self.reply(200, job)
                if m := PODS.match(url.path):
                    selector = parse_qs(url.query).get("labelSelector", [""])[0]
                    name = selector.split("=", 1)[1]
                    phase = fake.script[max(fake.step, 0)][1]
                    items = []
                    if name in fake.jobs and phase:
                        items.append(
                            {
                                "metadata": {
                                    "name": f"{name}-master-0",
                                    "namespace": m.group(1),
                                    "uid": "pod-1",
                                    "labels": {
                                        launcher.JOB_LABEL: name,
                                        launcher.REPLICA_TYPE_LABEL: "master",
                                    },
                                },
                                "status": {"phase": phase},
                            }
                        )
                    return self.reply(
                        200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
                    )
                if LOG.match(url.path):
                    assert parse_qs(url.query)["container"] == ["pytorch"]
                    return self.reply(200, fake.log.encode(), "text/plain")
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


def a_job(name="pirl-run-1", namespace="team-a") -> dict:
    return build_pytorchjob(
        name=name, namespace=namespace, image="img", args=["-m", "pirl.train"], num_nodes=2
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
        "verbs: [create, get, list, watch, delete]",
        "pods/log",
        "namespace 'team-a'",
    ):
        assert needed in text
    assert not [r for r in fake.requests if r[0] == "DELETE"]  # nothing was created


def test_existing_running_job_is_adopted_not_duplicated():
    existing = {"pirl-run-1": a_job()}
    with FakeApiServer(
        [("Running", "Running"), ("Succeeded", "Succeeded")], existing=existing
    ) as fake:
        _, out = run(fake)
    assert "already exists (Running): following it" in out
    assert sum(1 for m, _ in fake.requests if m == "POST") == 1


def test_existing_failed_job_is_replaced():
    existing = {"pirl-run-1": a_job()}
    with FakeApiServer([("Failed", ""), ("Succeeded", "Succeeded")], existing=existing) as fake:
        _, out = run(fake)
    assert "exists and Failed (an earlier attempt): replacing it" in out
    assert [m for m, _ in fake.requests if m in ("POST", "DELETE")] == [
        "POST",
        "DELETE",
        "POST",
        "DELETE",
    ]


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


def test_train_step_submits_to_the_cluster_and_fills_model_and_metrics(tmp_path, monkeypatch):
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
    with FakeApiServer([("Succeeded", "Succeeded")]) as fake:
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
        )
        (posted,) = [r for r in fake.requests if r[0] == "POST"]
        assert posted[1] == "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs"
        (job,) = fake.created
        assert job["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Pod", "name": "run-train-pod", "uid": "uid-123"}
        ]
        assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
        assert not fake.jobs  # deleted on success
    assert open(model.path, "rb").read() == b"weights"
    assert model.metadata["trunk_url"] == f"{ckpt}/trunk.safetensors"
    assert (
        model.metadata["job_name"] == "pirl-6f1c2a9e-run"
        and model.metadata["launcher"] == "cluster"
    )
    assert logged["final_loss"] == 3.5 and logged["train_hours"] == 0.01
