"""Security: nothing executes from a planted pickle, and no secret leaks.

- A malicious pickle planted as the newest checkpoint (its sidecar matching) is refused by the
  trainer's resume, which falls back, and unpublished; one planted as trunk.pt is refused by
  pirl.weights. Nothing in them runs (tests/test_checkpoint.py and tests/test_weights.py test
  the loaders alone).
- Recognisable fake credentials in the environment of a real training run against the local S3
  server (prep, then `pipeline.torchrun -m pirl.train`, the pods' command) appear nowhere: not in
  its logs, nor in any object it wrote (checkpoints and their sidecars, metrics, config dump,
  trunk, the dataset's manifest and report), nor in `--dry-run`, the KFP metrics summary, the
  compiled pipeline YAML (committed and fresh), a PyTorchJob the launcher builds, or the rendered
  manifests.
(Non-root containers, no privilege escalation and the launcher's RBAC are tests/test_manifests.py's
test_pod_policy and test_rbac_is_the_launchers_and_namespaced, and tests/test_images.py.)
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import s3fs
import torch
import yaml

from pipeline.jobspec import job_spec
from pirl import checkpoint, prep
from pirl.train import main as train_main

from ._images import make_clean_folder
from .conftest import REPO, npid_tiny, plant_checkpoint, subprocess_env

FAKE = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEPIRLSECURITY",
    "AWS_SECRET_ACCESS_KEY": "FAKE-SECRET-xyz-5b7c0e1d9a4f",
    "AWS_SESSION_TOKEN": "FAKE-TOKEN-0d3f9b2c8e7a",
}


class Payload:
    """Unpickling this would create `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {"model": {"w": torch.zeros(1)}, "x": Payload(str(marker))}, buf, pickle_module=pickle
    )
    return buf.getvalue()


def test_a_planted_pickle_never_runs(tmp_path, digits_folder, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    assert train_main(npid_tiny(run, digits_folder, "config.MAX_STEPS=1")) == 0
    data = evil_bytes(marker)
    plant_checkpoint(run / "checkpoints", 9, data)
    assert train_main(npid_tiny(run, digits_folder, "config.MAX_STEPS=2")) == 0
    out = capsys.readouterr().out
    assert "checkpoint-0000000009.pt cannot be loaded safely (refused to load: unpickling it" in out
    assert "weights_only=False" not in out and "`False`" not in out and "corrupt" not in out
    assert "resumed from checkpoint-0000000001.pt" in out
    assert "unpublished checkpoint-0000000009.pt" in out  # it cannot crowd out good ones
    assert [m["global_step"] for m in checkpoint.complete(str(run))] == [1, 2]
    assert not marker.exists()

    from pirl.weights import WeightsError, load_trunk_weights

    (run / "trunk.pt").write_bytes(data)
    with pytest.raises(WeightsError, match="refused to load"):
        load_trunk_weights(str(run / "trunk.pt"))
    assert not marker.exists()


def leaks(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        return [k for k, v in FAKE.items() if v.encode() in text]
    return [k for k, v in FAKE.items() if v in text]


def test_no_secret_in_logs_outputs_configs_pipeline_or_manifests(
    s3_bucket, monkeypatch, tmp_path, capsys
):
    for key, value in FAKE.items():
        monkeypatch.setenv(key, value)  # moto accepts any credentials
    s3fs.S3FileSystem.clear_instance_cache()
    src = tmp_path / "src"
    make_clean_folder(src / "train", {"a": 8, "b": 8}, size=(48, 48))
    data, out = f"{s3_bucket}/ds", f"{s3_bucket}/run"
    assert prep.main([str(src), data, "--shard-size", "8", "--workers", "1"]) == 0
    args = [
        "config=pretrain/pirl/pirl_demo_resnet18",
        "config.DATA.TRAIN.DATA_SOURCES=[shards]",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8",
        "config.OPTIMIZER.num_epochs=1",
        "config.LOG_FREQUENCY=1",
        "config.VERBOSE=true",
        f"config.CHECKPOINT.DIR={out}",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.torchrun",
            "--nproc-per-node=1",
            "-m",
            "pirl.train",
            *args,
        ],
        env=subprocess_env(**FAKE),
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs
    assert "checkpoint s3://" in logs and "done: trunk exported" in logs
    found = {"logs": leaks(logs)}

    fs = s3fs.S3FileSystem()
    objects = [p for p in fs.find(s3_bucket.removeprefix("s3://"))]
    names = {Path(p).name for p in objects}
    assert {"manifest.json", "report.json", "metrics.jsonl", "train_config.yaml"} <= names
    assert {"trunk.pt", "trunk.safetensors", "checkpoint-0000000002.pt"} <= names
    for path in objects:
        found[path] = leaks(fs.cat_file(path))

    assert train_main([*args, "--dry-run"]) == 0
    found["--dry-run"] = leaks(capsys.readouterr().out)

    from pipeline import steps
    from pipeline.compile import OUTPUT, compile_pipeline
    from pipeline.pytorchjob import build_pytorchjob

    records = [json.loads(x) for x in fs.cat_file(f"{out}/metrics.jsonl").decode().splitlines()]
    found["KFP metrics summary"] = leaks(json.dumps(steps.training_summary(records)))
    found["pipeline/pirl_pipeline.yaml"] = leaks(OUTPUT.read_text())
    found["fresh compile"] = leaks(compile_pipeline(tmp_path / "pipeline.yaml").read_text())
    job = build_pytorchjob(
        job_spec(
            name="pirl-security",
            namespace="team",
            image="registry.example.com/ml/pirl:0",
            args=["-m", "pirl.train", *args],
            num_nodes=2,
            secret_name="pirl-s3-credentials",
            env={"AWS_ENDPOINT_URL": "http://minio:9000"},
        )
    )
    found["PyTorchJob"] = leaks(yaml.safe_dump(job))

    from .k8s_helpers import find_kubectl, kustomize_build

    if find_kubectl():
        for kustomization in sorted((REPO / "manifests").rglob("kustomization.yaml")):
            rendered = yaml.safe_dump_all(kustomize_build(kustomization.parent))
            found[str(kustomization.parent.relative_to(REPO))] = leaks(rendered)
    bad = {where: keys for where, keys in found.items() if keys}
    assert not bad, f"secret values found: {bad}"
    assert len(found) > 15, sorted(found)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE["AWS_SECRET_ACCESS_KEY"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_server(folder: Path):
    """A plain HTTP server for `folder` on 127.0.0.1 (it ignores credentials); yields its URL."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


URL_SECRET = "PIRL-URL-PASSWORD-7f3a9c"


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_a_password_in_a_dataset_url_appears_in_no_log_message_or_file(tmp_path, capsys):
    """An http://user:password@host dataset works; its password must not reach the train and
    benchmark logs, their error messages, train_config.yaml, the checkpoints, metrics.json,
    report.md or report.html."""
    from pirl.benchmark.cli import main as benchmark_main

    src, served = tmp_path / "src", tmp_path / "served"
    make_clean_folder(src / "train", {"a": 8, "b": 8}, size=(48, 48))
    make_clean_folder(src / "val", {"a": 4, "b": 4}, size=(48, 48))
    assert prep.main([str(src), str(served / "ds"), "--shard-size", "8", "--workers", "1"]) == 0
    run, bench = tmp_path / "run", tmp_path / "bench"
    with http_server(served) as base:
        data = base.replace("http://", f"http://pirl:{URL_SECRET}@") + "/ds"
        train_args = [
            "config=pretrain/npid/npid_demo_resnet18",
            "config.DATA.TRAIN.DATA_SOURCES=[shards]",
            f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
            "config.DATA.NUM_DATALOADER_WORKERS=0",
            "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8",
            "config.OPTIMIZER.num_epochs=1",
            f"config.CHECKPOINT.DIR={run}",
        ]
        assert train_main(train_args) == 0
        assert train_main([*train_args, "--dry-run"]) == 0
        missing = [a.replace("/ds]", "/nope]") for a in train_args]
        assert train_main(missing) == 3  # the error names the URL
        assert (
            benchmark_main(
                [
                    "config=benchmark/linear_image_classification/demo/eval_resnet18_demo_linear",
                    "config.DATA.TRAIN.DATA_SOURCES=[shards]",
                    "config.DATA.TEST.DATA_SOURCES=[shards]",
                    f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
                    f"config.DATA.TEST.DATA_PATHS=[{data}]",
                    "config.DATA.NUM_DATALOADER_WORKERS=0",
                    f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={run}",
                    f"config.PRETRAIN_METRICS={run}/metrics.jsonl",
                    "config.OPTIMIZER.num_epochs=1",
                    f"config.OUTPUT_DIR={bench}",
                    "config.MACHINE.DEVICE=cpu",
                ]
            )
            == 0
        )
    out = capsys.readouterr()
    assert URL_SECRET not in out.out + out.err, out.out + out.err
    assert (bench / "report.html").exists() and (run / "train_config.yaml").exists()
    assert files_holding(tmp_path / "run", URL_SECRET) == []
    assert files_holding(tmp_path / "bench", URL_SECRET) == []


def test_credentials_in_an_s3_url_appear_in_no_error(s3_bucket, tmp_path, capsys):
    """s3fs does not take credentials from a URL: they end up in the bucket name, and botocore
    quotes that name in its error."""
    src = tmp_path / "src"
    make_clean_folder(src / "train", {"a": 2}, size=(16, 16))
    url = f"s3://AKIAPIRLURLKEY0042:{URL_SECRET}@{s3_bucket.removeprefix('s3://')}/ds"
    assert prep.main([str(src), url, "--workers", "1"]) != 0
    assert (
        train_main(npid_tiny(tmp_path / "run", src, f"config.DATA.TRAIN.DATA_PATHS=[{url}]")) != 0
    )
    out = capsys.readouterr()
    for secret in (URL_SECRET, "AKIAPIRLURLKEY0042"):
        assert secret not in out.out + out.err, out.out + out.err
