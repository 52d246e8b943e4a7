"""Bad data end to end, through the trainer (tests/test_shards.py and tests/test_prep.py cover
the loader and prep themselves): records in a shard that decode to nothing (0x0), to a
100,000 x 100,000 decompression bomb, or to non-RGB modes; a manifest whose counts disagree with
its shards. Non-RGB images are converted; undecodable ones are skipped and counted, up to 1% of a
worker's samples (ShardTrainData's max_bad_fraction); past that, one clear line and exit 3.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pirl import prep
from pirl.data.tarshard import Record, pack, unpack
from pirl.errors import EXIT_DATA
from pirl.train import main as train_main

from ._images import encode, make_clean_folder, picture, png_bomb
from .conftest import first_limited_image

N = 128  # 1 damaged sample is 0.8% (skipped), 2 are 1.6% (over the 1% allowed)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    make_clean_folder(src / "train", {"a": N // 2, "b": N // 2})
    dest = tmp_path_factory.mktemp("shards") / "ds"
    assert prep.main([str(src), str(dest), "--shard-size", "64", "--workers", "1"]) == 0
    return dest


def copy_with(dataset: Path, dest: Path, replace: dict[int, bytes]) -> Path:
    """A copy of `dataset` whose samples `replace` have other image bytes (shard and manifest
    rewritten consistently, as a tool other than `pirl prep` could have made them)."""
    import shutil

    shutil.copytree(dataset, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        path = dest / shard["name"]
        records = list(unpack(io.BytesIO(path.read_bytes())))
        assert all(isinstance(r, Record) for r in records)
        records = [
            Record(r.index, r.label, replace.get(r.index, r.image), r.source) for r in records
        ]
        data = pack(records)
        path.write_bytes(data)
        shard["size"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def args(root: Path, data: Path, *extra: str) -> list[str]:
    return [
        "config=pretrain/npid/npid_demo_resnet18",
        "config.DATA.TRAIN.DATA_SOURCES=[shards]",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=16",
        "config.OPTIMIZER.num_epochs=1",
        "config.LOG_FREQUENCY=1",
        f"config.CHECKPOINT.DIR={root}",
        *extra,
    ]


def odd_modes() -> dict[int, bytes]:
    rgb = picture(7, (24, 20))
    grey16 = Image.fromarray((np.arange(24 * 20).reshape(20, 24) * 100).astype(np.uint16))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return {
        5: encode(rgb.convert("CMYK"), "JPEG"),
        7: encode(rgb.convert("L"), "PNG"),
        9: encode(grey16, "PNG"),
        11: encode(palette, "GIF", transparency=0),
        13: encode(rgb.convert("RGBA"), "PNG"),
    }


def test_a_bomb_is_skipped_and_counted_and_odd_modes_are_converted(dataset, tmp_path, capsys):
    data = copy_with(dataset, tmp_path / "ds", {3: png_bomb(100_000, 100_000), **odd_modes()})
    assert train_main(args(tmp_path / "run", data)) == 0
    out = capsys.readouterr().out
    assert "damaged sample 3 in train/shard-000000.tar skipped" in out
    assert "1 damaged sample(s) skipped in this worker's part of the epoch" in out
    assert out.count("damaged sample ") == 1  # the CMYK, grey, 16-bit, palette, RGBA ones trained
    assert "epoch 0 done" in out


def test_past_the_allowed_fraction_it_is_one_clear_line_and_exit_3(dataset, tmp_path, capsys):
    zero = png_bomb(0, 0)  # a 0 x 0 image: Pillow cannot decode it
    data = copy_with(dataset, tmp_path / "ds", {3: png_bomb(100_000, 100_000), 70: zero})
    assert train_main(args(tmp_path / "run", data)) == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert (
        "2 damaged sample(s) among the 128 this worker reads (more than the 1.00% allowed)" in err
    )
    named = [
        f"sample 3 in {data}/train/shard-000000.tar",
        f"sample 70 in {data}/train/shard-000001.tar",
    ]
    assert any(n in err for n in named), err  # whichever the shuffled order met second
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_manifest_that_disagrees_with_its_shards_stops_before_training(dataset, tmp_path, capsys):
    data = copy_with(dataset, tmp_path / "ds", {})
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["num_samples"] += 5
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert train_main(args(tmp_path / "run", data)) == EXIT_DATA
    err = capsys.readouterr().err
    assert f"the shards hold {N} samples but the manifest says {N + 5}" in err
    # a shard shorter than the manifest says: its missing samples count as damaged
    manifest["splits"]["train"]["num_samples"] -= 5
    (data / "manifest.json").write_text(json.dumps(manifest))
    shard = data / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert train_main(args(tmp_path / "run", data)) == EXIT_DATA
    err = capsys.readouterr().err
    assert "damaged sample(s) among the 128" in err and "shard-000001.tar" in err


def test_prep_skips_0x0_and_100k_images_with_a_count_and_converts_modes(tmp_path):
    src = tmp_path / "src" / "train"
    make_clean_folder(src, {"a": 4, "b": 4})
    (src / "a" / "zero.png").write_bytes(png_bomb(0, 0))
    (src / "a" / "huge.png").write_bytes(png_bomb(100_000, 100_000))
    ext = {5: "jpg", 7: "png", 9: "png", 11: "gif", 13: "png"}
    for n, raw in odd_modes().items():
        (src / "b" / f"odd{n}.{ext[n]}").write_bytes(raw)
    dest = tmp_path / "ds"
    assert prep.main([str(tmp_path / "src"), str(dest), "--workers", "1"]) == 0
    report = json.loads((dest / "report.json").read_text())
    assert report["counts"]["train"] == {
        "inputs": 15,
        "samples": 13,
        "skipped": 2,
        "converted": 5,
        "stored_unchanged": 8,
    }
    reasons = {Path(e["path"]).name: e["reason"] for e in report["skipped"]}
    assert reasons["zero.png"] == "not an image (unrecognised format)"
    assert reasons["huge.png"].startswith("decompression bomb")


def test_a_corrupt_image_in_a_disk_folder_is_a_clear_data_error(digits_folder, tmp_path, capsys):
    import shutil

    folder = tmp_path / "digits"
    shutil.copytree(digits_folder / "train", folder / "train")
    victim = first_limited_image(folder / "train", 64)  # one the run reads
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    a = args(tmp_path / "run", folder)
    a[1:3] = [
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TRAIN.DATA_PATHS=[{folder}/train]",
    ]
    rc = train_main([*a, "config.DATA.TRAIN.DATA_LIMIT=64"])
    assert rc == EXIT_DATA
    assert str(victim) in capsys.readouterr().err
