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

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
import torch
import yaml

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
    assert "checkpoint-0000000009.pt cannot be loaded safely" in out
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
        name="pirl-security",
        namespace="team",
        image="registry.example.com/ml/pirl:0",
        args=["-m", "pirl.train", *args],
        num_nodes=2,
        secret_name="pirl-s3-credentials",
        env={"AWS_ENDPOINT_URL": "http://minio:9000"},
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
