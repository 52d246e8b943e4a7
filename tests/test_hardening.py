"""Hardening found by an adversarial pass: damaged run files, hostile values, oversized inputs.
Each test reproduces one finding."""

from __future__ import annotations

import json
import logging
import re

import pytest

from pirl.data import manifest as mf
from pirl.errors import EXIT_CONFIG, DataError
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


def manifest_bytes(**shard_fields) -> bytes:
    shard = {
        "name": "train/shard-000000.tar",
        "num_samples": 2,
        "size": 10240,
        "sha256": "ab" * 32,
        "first_index": 0,
        **shard_fields,
    }
    split = {"num_samples": shard["num_samples"], "classes": ["a"], "shards": [shard]}
    return json.dumps(
        {"format": mf.FORMAT, "source": "s", "params": {}, "splits": {"train": split}}
    ).encode()


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "../outside/secret-shard.tar"),
        ("name", "../../../etc/passwd"),
        ("name", "/etc/passwd"),
        ("name", "train/../../x.tar"),
        ("name", "s3://other-bucket/x.tar"),
        ("sha256", "/../../../tmp/x"),
        ("sha256", "AB" * 32 + "0"),
        ("num_samples", 10**10),  # a tar member header alone takes 512 bytes
        ("size", -1),
    ],
)
def test_manifest_fields_are_checked_before_use(field, value):
    with pytest.raises(DataError, match=rf"shards\[0\]\.{field}"):
        mf.parse(manifest_bytes(**{field: value}), "m.json")


def test_a_shard_name_outside_the_dataset_is_never_opened(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret-shard.tar").write_bytes(b"secret")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_bytes(
        manifest_bytes(name="../outside/secret-shard.tar")
    )
    with pytest.raises(DataError, match="inside the dataset"):
        mf.load(str(tmp_path / "ds"))
