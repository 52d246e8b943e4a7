"""Checkpoints: published by a sidecar written last, verified on load, never unpickled unsafely."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle

import pytest
import torch

from pirl import checkpoint, storage

from .conftest import plant_checkpoint


def state(x: float) -> dict:
    return {"w": torch.full((3,), x), "epoch": int(x), "name": "s"}


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_roundtrip_and_retention(tmp_path, kind):
    root = str(tmp_path) if kind == "local" else f"memory://ckpt-test-{os.getpid()}"
    for step in range(1, 6):
        checkpoint.save(
            root, state(step), epoch=step, step_in_epoch=0, global_step=step, keep_last=2
        )
    metas = checkpoint.complete(root)
    assert [m["global_step"] for m in metas] == [4, 5]
    names = storage.list_names(storage.join(root, "checkpoints"))
    assert names == sorted(f"checkpoint-{s:010d}.{ext}" for s in (4, 5) for ext in ("json", "pt"))
    loaded, meta = checkpoint.load_latest(root)
    assert meta["global_step"] == 5 and torch.equal(loaded["w"], torch.full((3,), 5.0))


def test_unpublished_checkpoint_is_ignored(tmp_path):
    checkpoint.save(str(tmp_path), state(1), epoch=1, step_in_epoch=0, global_step=1, keep_last=3)
    # a crash after the data object was written but before its sidecar was published
    (tmp_path / "checkpoints" / "checkpoint-0000000002.pt").write_bytes(b"partial")
    _, meta = checkpoint.load_latest(str(tmp_path))
    assert meta["global_step"] == 1


def test_corrupt_newest_falls_back_and_says_so(tmp_path, caplog):
    root = str(tmp_path)
    checkpoint.save(root, state(1), epoch=1, step_in_epoch=0, global_step=1, keep_last=3)
    checkpoint.save(root, state(2), epoch=2, step_in_epoch=0, global_step=2, keep_last=3)
    newest = tmp_path / "checkpoints" / "checkpoint-0000000002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pirl"):
        loaded, meta = checkpoint.load_latest(root)
    assert meta["global_step"] == 1 and loaded["epoch"] == 1
    assert "checkpoint-0000000002.pt does not match its checksum" in caplog.text


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pirl-pwned",))


def test_malicious_pickle_is_refused(tmp_path, caplog):
    root = str(tmp_path)
    checkpoint.save(root, state(1), epoch=1, step_in_epoch=0, global_step=1, keep_last=3)
    # a planted checkpoint whose sidecar matches, but whose payload would run code when unpickled
    buf = io.BytesIO()
    torch.save({"evil": Boom()}, buf, pickle_module=pickle)
    plant_checkpoint(tmp_path / "checkpoints", 9, buf.getvalue())
    if os.path.exists("/tmp/pirl-pwned"):
        os.remove("/tmp/pirl-pwned")
    with caplog.at_level(logging.WARNING, logger="pirl"):
        _, meta = checkpoint.load_latest(root)
    assert meta["global_step"] == 1
    assert not os.path.exists("/tmp/pirl-pwned")
    assert "cannot be loaded safely" in caplog.text


def test_no_checkpoint():
    assert checkpoint.load_latest("memory://nothing-here") is None


def forged_sidecar(checkpoints, step: int, file: str) -> None:
    meta = {"file": file, "size": 1, "sha256": "0", "epoch": 0, "step_in_epoch": 0}
    meta["global_step"] = step
    (checkpoints / f"checkpoint-{step:010d}.json").write_text(json.dumps(meta))


def test_a_sidecar_naming_another_file_is_ignored_and_never_deletes_it(tmp_path, caplog):
    """A sidecar may only name its sibling checkpoint-<step>.pt: retention and the unpublishing
    of newer checkpoints delete what sidecars name."""
    run, victim = tmp_path / "run", tmp_path / "victim"
    victim.mkdir()
    for name in ("important.pt", "other.pt"):
        (victim / name).write_bytes(b"keep me")
    for step in (1, 2):
        checkpoint.save(
            str(run), state(step), epoch=step, step_in_epoch=0, global_step=step, keep_last=3
        )
    forged_sidecar(run / "checkpoints", 0, "../../victim/important.pt")
    forged_sidecar(run / "checkpoints", 50, "../../victim/other.pt")
    forged_sidecar(run / "checkpoints", 60, "checkpoint-0000000002.pt")  # another step's file
    with caplog.at_level(logging.WARNING, logger="pirl"):
        assert [m["global_step"] for m in checkpoint.complete(str(run))] == [1, 2]
        checkpoint.unpublish_newer(str(run), 1)
        checkpoint.prune(str(run), keep_last=1)
    assert (victim / "important.pt").exists() and (victim / "other.pt").exists()
    assert "checkpoint-0000000000.json names '../../victim/important.pt'" in caplog.text
    assert (run / "checkpoints" / "checkpoint-0000000001.pt").exists()
    assert [m["global_step"] for m in checkpoint.complete(str(run))] == [1]


@pytest.mark.parametrize(
    "body",
    [
        "[1, 2]",
        '{"file": "checkpoint-0000000003.pt", "size": 1, "sha256": "0"}',  # no global_step
        '{"file": "checkpoint-0000000003.pt", "size": 1, "sha256": "0", "global_step": "3"}',
        '{"file": "checkpoint-0000000003.pt", "size": "1", "sha256": "0", "global_step": 3}',
    ],
)
def test_a_malformed_sidecar_is_skipped_with_a_warning(tmp_path, caplog, body):
    checkpoint.save(str(tmp_path), state(1), epoch=1, step_in_epoch=0, global_step=1, keep_last=3)
    (tmp_path / "checkpoints" / "checkpoint-0000000003.json").write_text(body)
    with caplog.at_level(logging.WARNING, logger="pirl"):
        assert [m["global_step"] for m in checkpoint.complete(str(tmp_path))] == [1]
        assert checkpoint.load_latest(str(tmp_path))[1]["global_step"] == 1
    assert "ignoring checkpoint sidecar checkpoint-0000000003.json" in caplog.text
