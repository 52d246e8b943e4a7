"""The benchmark harness runs and reports every figure (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from pirl.bench import PHASES, main

pytestmark = pytest.mark.slow


def test_bench_reports_phases_flops_and_efficiency(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "config=pretrain/pirl/pirl_demo_resnet18",
            "config.DATA.TRAIN.DATA_SOURCES=[synthetic]",
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
            "config.DATA.NUM_DATALOADER_WORKERS=0",
            "--steps=2",
            "--warmup=1",
            f"--json={out}",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result["phases_median_seconds"]) == set(PHASES)
    assert result["batch"] == 4 and result["num_negatives"] == 1024
    assert result["flops_per_image"] > 0 and result["matmul_peak_flops"] > 0
    assert 0 < result["efficiency"] < 1.5
