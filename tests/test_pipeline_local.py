"""The whole pipeline with kfp.local (SubprocessRunner, this interpreter): prep -> the PyTorchJob
as local processes (Master + 1 Worker) -> benchmark, on local files and on the S3 server.

Shortened runs (a data limit, one epoch, a short linear evaluation); `make demo` runs the full one.
"""

from __future__ import annotations

import json

import pytest

from pirl import storage
from pirl.demo import demo_arguments

QUICK_TRAIN = [
    "config.OPTIMIZER.num_epochs=1",
    "config.DATA.TRAIN.DATA_LIMIT=512",
    "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=256",
]
QUICK_BENCH = ["config.OPTIMIZER.num_epochs=2"]


def run_pipeline(digits_folder, work, output: str):
    from kfp import local

    from pipeline.pipeline import pirl_pretrain

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(work / "kfp"))
    args = demo_arguments(str(digits_folder), output)
    args["train_overrides"] = QUICK_TRAIN
    args["bench_overrides"] = QUICK_BENCH
    return pirl_pretrain(**args)


def check_outputs(run, output: str, work) -> None:
    report = run.output
    out_dir = report.metadata["output_dir"]
    assert out_dir.startswith(output.rstrip("/") + "/runs/")
    metrics = json.loads(storage.read_bytes(storage.join(out_dir, "metrics.json")))
    assert {"trained", "random_init"} <= set(metrics["trunks"])
    md = open(report.path).read()
    assert "| evaluation |" in md and "data:image/png;base64," in md
    assert storage.exists(storage.join(output, "dataset", "manifest.json"))
    run_dir = out_dir.rsplit("/", 1)[0]
    assert storage.exists(storage.join(run_dir, "pretrain", "trunk.safetensors"))
    # the KFP artifacts: the model file, training and benchmark metrics
    (root,) = [p for p in (work / "kfp").iterdir() if p.name.startswith("pirl-pretrain-")]
    model = root / "train" / "model"
    assert model.stat().st_size > 1_000_000
    train_out = json.loads((root / "train" / "executor_output.json").read_text())
    train_metrics = train_out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert train_metrics["global_steps"] > 0 and "final_loss" in train_metrics
    bench_out = json.loads((root / "benchmark" / "executor_output.json").read_text())
    bench_metrics = bench_out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert any(
        k.startswith("trunks.trained.linear.") and k.endswith(".top1") for k in bench_metrics
    )


@pytest.mark.slow
def test_pipeline_runs_locally_on_files(digits_folder, tmp_path):
    output = str(tmp_path / "out")
    run = run_pipeline(digits_folder, tmp_path, output)
    check_outputs(run, output, tmp_path)


@pytest.mark.slow
def test_pipeline_runs_locally_with_data_and_outputs_on_s3(digits_folder, tmp_path, s3_bucket):
    output = f"{s3_bucket}/demo"
    run = run_pipeline(digits_folder, tmp_path, output)
    check_outputs(run, output, tmp_path)
    assert not (tmp_path / "out").exists()
