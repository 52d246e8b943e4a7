"""Hardening found by an adversarial pass: damaged run files, hostile values, oversized inputs.
Each test reproduces one finding."""

from __future__ import annotations

import logging
import re

from pirl.errors import EXIT_CONFIG
from pirl.train import main as train_main

from .conftest import npid_tiny


def test_a_damaged_metrics_line_is_skipped_and_another_architecture_is_a_config_error(
    tmp_path, digits_folder, capsys
):
    run = tmp_path / "run"
    assert train_main(npid_tiny(run, digits_folder, "config.MAX_STEPS=1")) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"global_step": 1, "loss": \n[1, 2]\n')
    assert train_main(npid_tiny(run, digits_folder, "config.MAX_STEPS=2")) == 0
    out = capsys.readouterr().out
    assert re.search(r"metrics.jsonl line \d+ is not a JSON record; skipped", out), out

    depth34 = "config.MODEL.TRUNK.RESNETS.DEPTH=34"
    assert train_main(npid_tiny(run, digits_folder, "config.MAX_STEPS=3", depth34)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "checkpoint-0000000002.pt was made by resnet DEPTH=18" in err
    assert "this config builds resnet DEPTH=34" in err


def test_logged_values_cannot_forge_log_lines_nor_show_credentials(caplog):
    from pirl import storage

    storage.fs_and_path("memory://KEYID0042:s3cr3t-value@bucket/x")
    log = logging.getLogger("pirl")
    with caplog.at_level(logging.INFO, logger="pirl"):
        log.info("checkpoint %s", "/tmp/run\n2026-01-01 00:00:00 [rank 0] INFO done\x1b[2J")
        log.warning("bucket %r is wrong", "KEYID0042:s3cr3t-value@bucket")
    first, second = caplog.records
    assert "\n" not in first.getMessage() and "\x1b" not in first.getMessage()
    assert "/tmp/run\\n2026-01-01" in first.getMessage()
    assert "s3cr3t-value" not in second.getMessage() and "KEYID0042" not in second.getMessage()
