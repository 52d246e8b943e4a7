"""Hardening found by an adversarial pass: damaged run files, hostile values, oversized inputs.
Each test reproduces one finding."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile

import pytest
import torch

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


def flip_bytes_in_an_image(shard, index: int, count: int = 40) -> None:
    """Flip the low bit of `count` bytes inside the JPEG of sample `index`, making no marker:
    the archive stays readable."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = tar.getmember(f"{index:09d}.jpg")
    middle = member.offset_data + member.size // 2
    for i in range(middle, middle + count):
        if data[i] not in (0xFE, 0xFF) and data[i - 1] != 0xFF:
            data[i] ^= 0x01
    shard.write_bytes(bytes(data))


def test_a_shard_that_does_not_match_its_checksum_counts_as_damaged(tmp_path, caplog):
    from pirl import prep
    from pirl.data.shards import ShardTrainData
    from pirl.transforms import collate_single_view

    from ._images import make_clean_folder

    src, ds = tmp_path / "src", tmp_path / "ds"
    make_clean_folder(src / "train", {"a": 8, "b": 8}, size=(48, 48))
    assert prep.main([str(src), str(ds), "--shard-size", "8", "--workers", "1"]) == 0
    flip_bytes_in_an_image(ds / "train/shard-000001.tar", 9)

    def epoch(**kw) -> list[int]:
        data = ShardTrainData(
            str(ds),
            transform=lambda img: torch.zeros(1),
            collate=collate_single_view("data"),
            batch_size=4,
            **kw,
        )
        return [i for b in data.batches(0) for i in b["index"].tolist()]

    with pytest.raises(DataError, match="shard-000001.tar does not match the size and sha256"):
        epoch()  # 1 of 16 is more than the default 1%
    with caplog.at_level(logging.WARNING, logger="pirl"):
        got = epoch(max_bad_fraction=0.2)
    assert set(range(16)) - set(got) <= {9}  # whether the changed JPEG decodes is libjpeg's call
    assert "shard-000001.tar: size or sha256 differs from the manifest" in caplog.text


def test_prep_skips_and_reports_a_file_name_that_is_not_utf8(tmp_path):
    import os

    from pirl import prep

    from ._images import make_clean_folder

    src, ds = tmp_path / "src", tmp_path / "ds"
    make_clean_folder(src / "train", {"a": 3}, size=(16, 16))
    good = next((src / "train" / "a").iterdir())
    os.link(good, os.path.join(os.fsencode(src / "train" / "a"), b"caf\xe9.jpg"))
    assert prep.main([str(src), str(ds), "--workers", "1"]) == 0
    report = json.loads((ds / "report.json").read_text())
    assert report["counts"]["train"]["samples"] == 3
    [skipped] = report["skipped"]
    assert skipped["path"] == "train/a/caf\\xe9.jpg"
    assert "not valid UTF-8" in skipped["reason"]


def test_override_errors_say_what_is_wrong(monkeypatch):
    from pirl import config
    from pirl.errors import ConfigError

    preset = "config=pretrain/npid/npid_demo_resnet18"
    with pytest.raises(ConfigError, match=r"cannot parse the override 'config.CHECKPOINT.DIR=a;b'"):
        config.load([preset, "config.CHECKPOINT.DIR=a;b"])
    monkeypatch.setenv("PIRL_TEST_SECRET", "s3cr3t")
    with pytest.raises(ConfigError, match="holds an interpolation") as err:
        config.load([preset, "config.CHECKPOINT.DIR=/x/${oc.env:PIRL_TEST_SECRET}"])
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'config.CHECKPOINT.NOPE'"):
        config.load([preset, "config.CHECKPOINT.NOPE=1"])


def test_absurd_batch_sizes_and_learning_rates_are_config_errors():
    from pirl import config
    from pirl.errors import ConfigError

    preset = "config=pretrain/pirl/pirl_jigsaw_4node_resnet50"
    with pytest.raises(ConfigError, match=r"BATCHSIZE_PER_REPLICA must be in \[1, 65536\]"):
        config.load([preset, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=1000000000000"])
    base = "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value"
    with pytest.raises(ConfigError, match=r"the learning rate would be 4e\+06 \(global batch 1024"):
        config.load([preset, f"{base}=1000000"])


def test_the_loaders_apply_the_pixel_limit(tmp_path, monkeypatch, digits_folder):
    """Stands in for a PNG that decodes to 12,500 x 12,500: the limit is lowered below the
    images' 32 x 32 instead of writing a 156-Mpx image."""
    from pirl import prep
    from pirl.data import FolderImages, clean
    from pirl.data.shards import ShardTrainData
    from pirl.transforms import collate_single_view

    from ._images import make_clean_folder

    src, ds = tmp_path / "src", tmp_path / "ds"
    make_clean_folder(src / "train", {"a": 4}, size=(48, 48))
    assert prep.main([str(src), str(ds), "--workers", "1"]) == 0
    monkeypatch.setattr(clean, "MAX_PIXELS", 1000)
    data = ShardTrainData(
        str(ds),
        transform=lambda img: torch.zeros(1),
        collate=collate_single_view("data"),
        batch_size=4,
    )
    with pytest.raises(DataError, match="damaged sample"):
        list(data.batches(0))
    with pytest.raises(DataError, match="32x32 pixels, more than the limit of 1000"):
        FolderImages(str(digits_folder / "train"))[0]


def test_a_tiny_weights_file_cannot_make_the_converter_build_a_huge_trunk(tmp_path, capsys):
    """664 bytes of safetensors whose empty stem says 'width 1000' (a 147 GB trunk)."""
    from safetensors.torch import save_file

    from pirl import weights

    fake = {"conv1.weight": torch.zeros(64000, 0, 7, 7), "layer1.0.conv3.weight": torch.zeros(0)}
    fake.update(
        {
            f"layer{i}.{b}.bn1.weight": torch.zeros(0)
            for i, n in ((1, 3), (2, 4), (3, 6), (4, 3))
            for b in range(n)
        }
    )
    save_file(fake, tmp_path / "tiny.safetensors")
    assert weights.main([str(tmp_path / "tiny.safetensors"), str(tmp_path / "out")]) == EXIT_CONFIG
    assert "not a ResNet trunk this tool can rebuild" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env,node_selector,tolerations,message",
    [
        ({"PET_MASTER_ADDR": "evil"}, {}, [], "PET_MASTER_ADDR is set by the operator"),
        ({"MASTER_PORT": "1"}, {}, [], "MASTER_PORT is set by"),
        ({"LD_PRELOAD": "/tmp/x.so"}, {}, [], "LD_PRELOAD is set by"),
        ({"AWS_ENDPOINT_URL": "http://attacker"}, {}, [], "AWS_ENDPOINT_URL is set by"),
        ({"A=B": "1"}, {}, [], "not an environment variable name"),
        ({}, {"gpu": 1}, [], "train_node_selector must map label names to strings"),
        ({}, {}, [{"key": "k", "operator": "Sometimes"}], r"train_tolerations\[0\]"),
        ({}, {}, [{"key": "k", "command": ["sh"]}], "fields must be among"),
        ({}, {}, {"key": "k"}, "must be a list of tolerations"),
    ],
)
def test_the_train_step_refuses_reserved_env_and_malformed_pod_settings(
    tmp_path, env, node_selector, tolerations, message
):
    from pipeline import steps

    with pytest.raises(steps.StepError, match=message):
        steps.train(
            str(tmp_path / "ds"),
            None,
            None,
            config="pretrain/npid/npid_demo_resnet18",
            overrides=[],
            num_nodes=1,
            nproc_per_node=1,
            gpus_per_node=0,
            image="pirl:test",
            run_id="r",
            output_root=str(tmp_path / "out"),
            env=env,
            node_selector=node_selector,
            tolerations=tolerations,
            launcher="local",
        )
    assert not (tmp_path / "out").exists()  # nothing started
    steps.check_pod_settings(
        {"NCCL_DEBUG": "WARN"}, {"pool": "gpu"}, [{"key": "k", "operator": "Exists"}]
    )
