"""The throughput tool and the scaling check run and report every figure (smoke tests: no
timing is asserted); the tool times the trainer's own step."""

from __future__ import annotations

import json
import math

import pytest

from pirl import train
from pirl.cli import main as pirl_main
from pirl.tools import scaling
from pirl.tools.throughput import PHASES, main

pytestmark = pytest.mark.slow

TINY = [
    "config=pretrain/pirl/pirl_demo_resnet18",
    "config.DATA.TRAIN.DATA_SOURCES=[synthetic]",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
    "config.DATA.NUM_DATALOADER_WORKERS=0",
]


def test_throughput_reports_phases_flops_and_efficiency_per_variant(tmp_path):
    out = tmp_path / "bench.json"
    bf16 = "config.MODEL.AMP_PARAMS.USE_AMP=true"
    rc = main([*TINY, "--steps=2", "--warmup=1", f"--json={out}", f"--variant={bf16}"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [row["variant"] for row in report["summary"]] == ["default", bf16]
    default, amp = report["rounds"][0]["default"], report["rounds"][0][bf16]
    for result in (default, amp):
        phases = result["phases_median_seconds"]
        assert set(phases) == set(PHASES)
        assert phases["trunk_patches"] > 0 and phases["trunk_images"] > 0  # the forward hooks
        assert result["batch"] == 4 and result["num_negatives"] == 512  # the demo preset's
        assert result["flops_per_image"] > 0 and result["matmul_peak_flops"] > 0
        assert 0 < result["efficiency"] < 1.5
    assert default["autocast"] == "off" and default["matmul_peak_dtype"] == "float32"
    assert amp["autocast"] == "bfloat16" and amp["matmul_peak_dtype"] == "bfloat16"


def test_throughput_rejects_a_bad_variant_before_running(capsys):
    assert main([*TINY, "--variant=config.MODEL.NO_SUCH_KEY=1"]) == 2
    assert "unknown config key 'config.MODEL.NO_SUCH_KEY'" in capsys.readouterr().err


def test_scaling_validation_predicts_two_ranks_from_one():
    v = scaling.validate(1, TINY)
    assert v["measured_images_per_sec"] > 0 and v["allreduce_seconds"] > 0
    for name in ("alone", "side_by_side"):
        assert v[name]["predicted_images_per_sec"] > 0
        # the error is reported, not bounded: other load on a shared machine moves it freely
        assert math.isfinite(v[name]["error"])


def test_throughput_times_the_trainers_own_step(monkeypatch, tmp_path, capsys):
    calls = []
    real = train.train_step

    def counted(*args, **kwargs):
        calls.append(kwargs.get("timed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", counted)
    assert pirl_main(["bench", *TINY, "--steps=2", "--warmup=1"]) == 0  # the deprecated name
    assert len(calls) == 3 and all(timed is not None for timed in calls)
    assert "'bench' is deprecated; use 'throughput'" in capsys.readouterr().err
