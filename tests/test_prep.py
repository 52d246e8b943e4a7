"""`pirl prep`: bad inputs listed, every good image in exactly one shard, gapless indices,
idempotent reruns, resume after a crash, clear errors before any write; local disk and S3."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pirl import prep, storage
from pirl.data import manifest as mf
from pirl.data.shapes import SHAPES
from pirl.data.sources import list_source
from pirl.data.tarshard import Record, unpack
from pirl.redaction import redact

from ._images import make_clean_folder, make_messy_folder
from .conftest import subprocess_env


def read_dataset(url: str) -> tuple[mf.Manifest, dict[str, list[tuple[str, Record]]]]:
    """The manifest and, per split, (shard name, record) for every record of every shard,
    checking each shard's size and sha256 against the manifest."""
    root, manifest = mf.load(url)
    out = {}
    for name, split in manifest.splits.items():
        out[name] = []
        for shard in split.shards:
            data = storage.read_bytes(storage.join(root, shard.name))
            assert len(data) == shard.size
            assert hashlib.sha256(data).hexdigest() == shard.sha256
            records = list(unpack(io.BytesIO(data)))
            assert all(isinstance(r, Record) for r in records)
            assert [r.index for r in records] == list(
                range(shard.first_index, shard.first_index + shard.num_samples)
            )
            out[name] += [(shard.name, r) for r in records]
    return manifest, out


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[Path, dict[str, set[str]]]:
    root = tmp_path_factory.mktemp("messy")
    return root, make_messy_folder(root)


@pytest.fixture(scope="module")
def prepped(messy, tmp_path_factory) -> Path:
    src, _ = messy
    dest = tmp_path_factory.mktemp("prepped") / "ds"
    assert prep.main([str(src), str(dest), "--shard-size", "4", "--workers", "1"]) == 0
    return dest


def test_report_lists_exactly_the_bad_files(messy, prepped):
    _, expected = messy
    report = json.loads((prepped / "report.json").read_text())
    assert {e["path"] for e in report["skipped"]} == expected["skipped"]
    assert {e["path"] for e in report["converted"]} == expected["converted"]
    reasons = {e["path"]: e["reason"] for e in report["skipped"]}
    assert reasons["train/dog/empty.jpg"] == "empty file"
    assert "decompression bomb" in reasons["train/eel/bomb.png"]
    assert "not an image" in reasons["train/dog/notes.txt"]
    assert "not inside a class folder" in reasons["train/README.txt"]
    assert "not in train" in reasons["val/fox/unknown_class.jpg"]
    changes = {e["path"]: e["change"] for e in report["converted"]}
    assert "EXIF orientation 6" in changes["train/eel/rotated.jpg"]
    assert changes["train/cat/cmyk.jpg"] == "CMYK -> RGB"
    assert "I;16" in changes["train/eel/sixteen_bit.png"]
    for split in ("train", "val"):
        c = report["counts"][split]
        assert c["inputs"] == c["samples"] + c["skipped"]
    assert sum(c["skipped"] for c in report["counts"].values()) == len(expected["skipped"])


def test_every_good_image_is_in_exactly_one_shard_with_gapless_indices(messy, prepped):
    src, expected = messy
    manifest, records = read_dataset(str(prepped))
    listing = list_source(str(src))
    assert manifest.splits["train"].classes == ["cat", "dog", "eel"]
    sources = [r.source for split in records.values() for _, r in split]
    assert sorted(sources) == sorted(expected["good"])  # each exactly once, nothing else
    for name, split in manifest.splits.items():
        recs = [r for _, r in records[name]]
        assert [r.index for r in recs] == list(range(split.num_samples))
        # index order is the seeded random order of prep.iid_order (classes mixed), and the
        # label is the class folder's index
        order = [i.path for i in prep.iid_order(listing.splits[name], 0, name)]
        assert [r.source for r in recs] == [p for p in order if p in set(expected["good"])]
        assert [r.label for r in recs] != sorted(r.label for r in recs)
        for r in recs:
            assert split.classes[r.label] == r.source.split("/")[1]
            with Image.open(io.BytesIO(r.image)) as img:
                assert img.format == "JPEG" and img.mode == "RGB"
                img.load()
    by_src = {r.source: r for split in records.values() for _, r in split}
    with Image.open(io.BytesIO(by_src["train/eel/rotated.jpg"].image)) as img:
        assert img.size == (16, 30)  # stored 30x16 with orientation 6: turned upright
    with Image.open(io.BytesIO(by_src["train/eel/alpha.png"].image)) as img:
        assert img.mode == "RGB"
    good_jpeg = (messy[0] / "train/cat/00.jpg").read_bytes()
    assert by_src["train/cat/00.jpg"].image == good_jpeg  # upright RGB JPEG: stored as is


def test_a_process_pool_writes_the_same_bytes(messy, prepped, tmp_path):
    src, _ = messy
    dest = tmp_path / "pooled"
    assert prep.main([str(src), str(dest), "--shard-size", "4", "--workers", "2"]) == 0
    assert (dest / "manifest.json").read_bytes() == (prepped / "manifest.json").read_bytes()
    assert (dest / "report.json").read_bytes() == (prepped / "report.json").read_bytes()


def test_rerun_with_the_same_inputs_writes_nothing(messy, prepped, capsys):
    src, _ = messy
    before = snapshot(prepped)
    assert prep.main([str(src), str(prepped), "--shard-size", "4", "--workers", "1"]) == 0
    assert snapshot(prepped) == before


def test_a_rerun_after_a_crash_resumes(messy, tmp_path, monkeypatch):
    src, _ = messy
    dest = tmp_path / "ds"
    real_write, calls = prep._write_chunk, []

    def crash_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt("the pod was killed")
        calls.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prep, "_write_chunk", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prep.prep(str(src), str(dest), prep.Options(shard_size=4))
    assert not (dest / "manifest.json").exists()  # half a dataset never looks finished
    written = snapshot(dest)
    assert sorted(p for p in written if p.endswith(".tar")) == [
        f"train/shard-00000{k}.tar" for k in range(3)
    ]
    monkeypatch.setattr(prep, "_write_chunk", real_write)
    manifest = prep.prep(str(src), str(dest), prep.Options(shard_size=4))
    after = snapshot(dest)
    assert all(after[p] == written[p] for p in written)  # the first three shards were kept
    assert len(manifest.splits["train"].shards) == 8
    read_dataset(str(dest))


def test_damaged_or_missing_shards_are_rewritten(messy, prepped, tmp_path):
    src, _ = messy
    dest = tmp_path / "ds"
    shutil.copytree(prepped, dest)
    (dest / "train/shard-000002.tar").unlink()
    damaged = dest / "train/shard-000004.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1024] + b"\1" * 1024)
    before = snapshot(dest)
    assert prep.main([str(src), str(dest), "--shard-size", "4", "--workers", "1"]) == 0
    after = snapshot(dest)
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed == {
        "train/shard-000002.tar",
        "_prep/train/shard-000002.json",
        "train/shard-000004.tar",
        "_prep/train/shard-000004.json",
        "manifest.json",  # removed before the first write, rewritten last
    }
    assert (dest / "manifest.json").read_bytes() == (prepped / "manifest.json").read_bytes()


def test_other_parameters_rewrite_the_dataset(messy, prepped, tmp_path):
    src, _ = messy
    dest = tmp_path / "ds"
    shutil.copytree(prepped, dest)
    assert prep.main([str(src), str(dest), "--shard-size", "4", "--resize", "8"]) == 0
    manifest, records = read_dataset(str(dest))
    assert manifest.params["resize"] == 8
    for split in records.values():
        for _, r in split:
            with Image.open(io.BytesIO(r.image)) as img:
                assert min(img.size) <= 8


@pytest.mark.parametrize("case", ["missing", "empty", "not-a-dataset"])
def test_an_unusable_source_is_a_clear_error_before_any_write(tmp_path, capsys, case):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    if case == "not-a-dataset":
        (src / "train").mkdir()
    dest = tmp_path / "out"
    assert prep.main([str(src), str(dest)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("pirl prep: error: ")
    assert ("does not exist" if case == "missing" else "no images found") in err
    assert not dest.exists()


def test_a_source_of_only_bad_files_reports_them_and_publishes_nothing(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a/x.jpg").write_bytes(b"")
    (src / "a/y.jpg").write_bytes(b"garbage")
    dest = tmp_path / "out"
    assert prep.main([str(src), str(dest)]) == 3
    assert "no usable images" in capsys.readouterr().err
    assert not (dest / "manifest.json").exists()
    report = json.loads((dest / "report.json").read_text())
    assert {e["path"] for e in report["skipped"]} == {"a/x.jpg", "a/y.jpg"}


def test_usage_errors_exit_2(capsys):
    assert prep.main([]) == 2
    assert prep.main(["only-source"]) == 2
    assert prep.main(["--demo"]) == 2


def test_flat_folder_list_file_and_val_fraction(tmp_path, capsys):
    flat = tmp_path / "flat"
    rels = make_clean_folder(flat, {"b": 5, "a": 5})
    lst = tmp_path / "list.txt"
    lst.write_text("# path label\n" + "".join(f"flat/{r} {r.split('/')[0]}\n" for r in rels) + "\n")
    args = ["--shard-size", "3", "--val-fraction", "0.4", "--seed", "7"]
    assert prep.main([str(flat / "a"), str(tmp_path / "x")]) == 3  # images but no class folders
    assert "no images found" in capsys.readouterr().err
    dest1, dest2 = tmp_path / "from-folder", tmp_path / "from-list"
    assert prep.main([str(flat), str(dest1), *args]) == 0
    assert prep.main([str(lst), str(dest2), *args]) == 0
    m1, r1 = read_dataset(str(dest1))
    m2, r2 = read_dataset(str(dest2))
    assert m1.splits["train"].classes == m2.splits["train"].classes == ["a", "b"]
    assert m1.splits["val"].num_samples == m2.splits["val"].num_samples == 4  # 2 of 5 per class
    assert m1.splits["train"].num_samples == 6
    assert [r.image for _, r in r1["val"]] == [r.image for _, r in r2["val"]]
    assert prep.main([str(flat), str(dest1), "--val-fraction", "1.5"]) == 2


@pytest.mark.parametrize(
    "dataset,train,val,classes",
    [
        ("shapes", 1000, 500, sorted(SHAPES)),
        ("digits", 1498, 299, [str(d) for d in range(10)]),
    ],
)
def test_demo_dataset(tmp_path, dataset, train, val, classes):
    dest = tmp_path / "demo"
    assert prep.main(["--demo", str(dest), "--demo-dataset", dataset, "--workers", "1"]) == 0
    manifest, records = read_dataset(str(dest))
    assert manifest.splits["train"].num_samples == train
    assert manifest.splits["val"].num_samples == val
    assert manifest.splits["train"].classes == classes
    assert manifest.source.startswith("demo:")
    report = json.loads((dest / "report.json").read_text())
    assert report["skipped"] == [] and report["converted"] == []
    with Image.open(io.BytesIO(records["train"][0][1].image)) as img:
        assert img.size == (64, 64)


def test_python_m_pirl_prep_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pirl.prep", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 3
    assert "pirl prep: error: the source" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- S3 (moto server on 127.0.0.1)


def s3_objects(url: str) -> dict[str, tuple[str, int]]:
    fs, path = storage.fs_and_path(url)
    fs.invalidate_cache()
    return {
        p: (str(i.get("LastModified")), i["size"]) for p, i in fs.find(path, detail=True).items()
    }


def test_prep_from_and_to_s3(messy, prepped, s3_bucket):
    src, expected = messy
    fs, bucket = storage.fs_and_path(s3_bucket)
    fs.put(str(src) + "/", f"{bucket}/src", recursive=True)
    dest = f"{s3_bucket}/shards"
    args = ["--shard-size", "4", "--workers", "2"]
    assert prep.main([f"{s3_bucket}/src", dest, *args]) == 0
    manifest, records = read_dataset(dest)
    local = mf.parse((prepped / "manifest.json").read_bytes(), "local")
    assert manifest.splits == local.splits  # the same shards, byte for byte
    report = json.loads(storage.read_bytes(f"{dest}/report.json"))
    assert {e["path"] for e in report["skipped"]} == expected["skipped"]
    before = s3_objects(dest)
    assert prep.main([f"{s3_bucket}/src", dest, *args]) == 0  # idempotent
    assert s3_objects(dest) == before


def test_s3_errors_before_any_write(messy, s3_bucket, capsys):
    src, _ = messy
    assert prep.main([str(src), "s3://no-such-bucket-here/shards"]) == 5
    assert "not writable" in capsys.readouterr().err
    assert prep.main([f"{s3_bucket}/missing", f"{s3_bucket}/out"]) == 3
    assert "does not exist" in capsys.readouterr().err
    assert s3_objects(s3_bucket) == {}


def test_credentials_in_a_url_never_reach_the_manifest():
    # prep records its source through pirl.redaction, the one redaction function
    assert redact("s3://AKIA:secret@bucket/x") == "s3://bucket/x"
    assert redact("/data/x") == "/data/x"
