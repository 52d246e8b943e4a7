"""The streaming shard loader: coverage per epoch over ranks x workers, reproducible order,
exact mid-epoch resume, per-sample augmentation, damage handling; local disk and S3."""

from __future__ import annotations

import collections
import io
import json
import math
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pirl import prep, storage
from pirl.data import AugmentedSamples, plan, seeded_transform
from pirl.data import manifest as mf
from pirl.data.shardio import evict
from pirl.data.shards import ShardTrainData
from pirl.data.tarshard import unpack
from pirl.errors import DataError
from pirl.transforms import collate_single_view

from ._images import make_clean_folder

# a, b, c with 9 + 8 + 8 images: 2 ranks of batch 4 get 14 each (13 would leave a last batch of
# one sample), three of them padded
N_TRAIN = 25


def tiny_transform():
    return T.Compose([T.RandomResizedCrop(8, scale=(0.3, 1.0)), T.ToTensor()])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    make_clean_folder(src / "train", {"a": 9, "b": 8, "c": 8})
    make_clean_folder(src / "val", {"a": 2, "b": 2, "c": 3})
    dest = tmp_path_factory.mktemp("shards") / "ds"
    assert prep.main([str(src), str(dest), "--shard-size", "4", "--workers", "1"]) == 0
    return dest


def loader(url, **kw) -> ShardTrainData:
    args = dict(
        split="train",
        transform=tiny_transform(),
        collate=collate_single_view("data"),
        rank=0,
        world=1,
        seed=3,
        batch_size=4,
        drop_last=False,
        num_workers=0,
        shuffle_buffer=6,
        cache_dir=None,
        limit=-1,
        pin_memory=False,
    )
    args.update(kw)
    return ShardTrainData(str(url), **args)


def indices(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def epoch_by_rank(url, world=2, workers=2, epoch=0, **kw) -> list[list[list[int]]]:
    return [
        indices(loader(url, rank=r, world=world, num_workers=workers, **kw).batches(epoch))
        for r in range(world)
    ]


def test_two_ranks_two_workers_cover_every_index_once_per_epoch(dataset):
    data = loader(dataset, world=2, num_workers=2)
    assert data.num_samples == N_TRAIN and data.classes == ["a", "b", "c"]
    assert data.steps_per_epoch == math.ceil(math.ceil(N_TRAIN / 2) / 4) == 4
    for epoch in (0, 1):
        ranks = epoch_by_rank(dataset, epoch=epoch)
        assert [len(r) for r in ranks] == [data.steps_per_epoch] * 2  # no rank hangs at the end
        per_rank = [sum(len(b) for b in r) for r in ranks]
        assert per_rank == [14, 14]
        assert [len(r[-1]) for r in ranks] == [2, 2]  # never a last batch of one sample
        counts = collections.Counter(i for r in ranks for b in r for i in b)
        assert set(counts) == set(range(N_TRAIN))
        assert sorted(counts.values()) == [1] * (N_TRAIN - 3) + [2] * 3  # three padded samples


def test_same_seed_same_order_other_epoch_or_seed_another(dataset):
    a = epoch_by_rank(dataset, epoch=0)
    assert epoch_by_rank(dataset, epoch=0) == a
    assert epoch_by_rank(dataset, epoch=1) != a
    assert epoch_by_rank(dataset, epoch=0, seed=4) != a


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers,drop_last", [(2, False), (3, True), (0, False)])
def test_mid_epoch_resume_yields_exactly_the_remaining_batches(dataset, workers, drop_last):
    data = loader(dataset, world=2, rank=1, num_workers=workers, drop_last=drop_last)
    full = indices(data.batches(2))
    assert len(full) == data.steps_per_epoch
    for start in range(len(full) + 1):
        assert indices(data.batches(2, start)) == full[start:]


def test_augmentation_depends_only_on_seed_epoch_and_index(dataset):
    images = {}
    root, manifest = mf.load(str(dataset))
    for shard in manifest.splits["train"].shards:
        for rec in unpack(io.BytesIO(storage.read_bytes(storage.join(root, shard.name)))):
            images[rec.index] = Image.open(io.BytesIO(rec.image)).convert("RGB")
    tf = tiny_transform()
    views = {}
    for workers in (0, 2):
        for batch in loader(dataset, num_workers=workers, world=2, rank=0).batches(5):
            for i, x in zip(batch["index"].tolist(), batch["data"], strict=True):
                expected = seeded_transform(tf, images[i], 3, 5, i)
                assert torch.equal(x, expected)
                views.setdefault(i, x)
    assert len(views) == 14  # rank 0 of 2, batch 4: samples_per_rank(25, 2, 4)
    # the map-style path (disk_folder) augments a sample exactly the same way
    samples = AugmentedSamples([(images[i], 0) for i in range(N_TRAIN)], tf, seed=3)
    samples.epoch = 5
    for i, x in views.items():
        assert torch.equal(samples[i][0], x)


def test_eval_batches_cover_every_sample_exactly_once(dataset):
    seen = []
    sizes = []
    for rank in range(3):
        got = [
            i
            for b in indices(loader(dataset, rank=rank, world=3, num_workers=2).eval_batches())
            for i in b
        ]
        seen += got
        sizes.append(len(got))
    assert sorted(seen) == list(range(N_TRAIN))
    assert max(sizes) - min(sizes) <= 1
    val = loader(dataset, split="val")
    assert val.num_samples == 7
    assert sorted(i for b in indices(val.eval_batches()) for i in b) == list(range(7))


def test_limit_keeps_the_first_samples(dataset):
    data = loader(dataset, limit=10, world=2, num_workers=2)
    assert data.num_samples == 10
    got = [
        i
        for r in range(2)
        for b in indices(loader(dataset, limit=10, world=2, rank=r).batches(0))
        for i in b
    ]
    # 6 per rank, two of them padding: 5 would leave each rank a last batch of one sample
    assert set(got) == set(range(10)) and len(got) == 12


def test_num_samples_comes_from_the_manifest(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    shutil.rmtree(copy / "train")  # no shard is read to build the loader
    data = loader(copy)
    assert data.num_samples == N_TRAIN and data.steps_per_epoch == 7
    with pytest.raises(DataError):
        list(data.batches(0))


def test_errors_for_missing_or_inconsistent_manifests(dataset, tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        loader(tmp_path)
    with pytest.raises(DataError, match="no 'test' split"):
        loader(dataset, split="test")
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["splits"]["train"]["num_samples"] += 1
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="the shards hold 25 samples but the manifest says 26"):
        loader(copy)
    raw["splits"]["train"]["num_samples"] -= 1
    shards = raw["splits"]["train"]["shards"]
    shards[0]["name"], shards[1]["name"] = shards[1]["name"], shards[0]["name"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="disagree"):
        list(loader(copy, num_workers=2).batches(0))


def damage_one_image(shard: Path, index: int) -> None:
    """Overwrite the JPEG bytes of sample `index` in place (the archive stays readable)."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = tar.getmember(f"{index:09d}.jpg")
    data[member.offset_data : member.offset_data + member.size] = b"\0" * member.size
    shard.write_bytes(bytes(data))


def test_a_damaged_sample_is_skipped_unless_there_are_too_many(dataset, tmp_path, caplog):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    damage_one_image(copy / "train/shard-000001.tar", 5)
    got = [i for b in indices(loader(copy, max_bad_fraction=0.1).batches(0)) for i in b]
    assert sorted(set(got)) == [i for i in range(N_TRAIN) if i != 5]
    assert len(got) == 25  # 26 planned (no last batch of one sample), less the damaged one
    assert "damaged sample 5" in caplog.text
    with pytest.raises(DataError, match="damaged") as err:
        list(loader(copy, num_workers=2).batches(0))  # the default allows 1%
    assert "Traceback" not in str(err.value)


def test_a_truncated_shard_counts_its_missing_samples_as_damaged(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    shard = copy / "train/shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    data = loader(copy, max_bad_fraction=0.2)
    got = [i for b in indices(data.batches(0)) for i in b]
    assert set(range(N_TRAIN)) - set(got) <= {8, 9, 10, 11}
    assert len(got) < N_TRAIN


# ---------------------------------------------------------------- planning arithmetic


def test_buffer_shuffle_is_a_bounded_permutation():
    order = plan.buffer_shuffle(200, 10, random.Random(0))
    assert sorted(order) == list(range(200))
    assert all(item <= t + 9 for t, item in enumerate(order))  # never more than 10 reads ahead
    assert plan.buffer_shuffle(5, 1, random.Random(0)) == list(range(5))


def test_interleave_and_cut():
    assert plan.interleave([2, 3, 1], 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2), (2, 0)]
    assert plan.cut([(4, 3), (7, 2)], 4, 3) == [plan.Piece(7, 1, 2), plan.Piece(4, 0, 2)]


@pytest.mark.parametrize("n,world,batch,workers", [(25, 2, 4, 2), (7, 4, 3, 3), (3, 4, 2, 1)])
def test_plans_tile_the_padded_epoch(n, world, batch, workers):
    counts = [4] * (n // 4) + ([n % 4] if n % 4 else [])
    seen = collections.Counter()
    for rank in range(world):
        steps = []
        for w in range(workers):
            wp = plan.train_plan(
                counts,
                seed=0,
                epoch=1,
                rank=rank,
                world=world,
                batch_size=batch,
                drop_last=False,
                workers=workers,
                worker=w,
                interleave_width=2,
                buffer=3,
            )
            steps += wp.batch_ids
            for b in wp.batches:
                for p in b:
                    k, off = wp.reads[p]
                    seen[sum(counts[: wp.pieces[k].shard]) + off] += 1
        per_rank = plan.samples_per_rank(n, world, batch)
        assert sorted(steps) == list(range(math.ceil(per_rank / batch)))
    assert set(seen) == set(range(n))
    assert sum(seen.values()) == world * per_rank


# ---------------------------------------------------------------- S3 (moto server on 127.0.0.1)


def test_reading_from_s3_with_a_bounded_cache(dataset, s3_bucket, tmp_path):
    fs, bucket = storage.fs_and_path(s3_bucket)
    fs.put(str(dataset) + "/", f"{bucket}/ds", recursive=True)
    url = f"{s3_bucket}/ds/manifest.json"  # the manifest URL works as well as the root
    local = epoch_by_rank(dataset)
    assert epoch_by_rank(url) == local
    cache = tmp_path / "cache"
    assert epoch_by_rank(url, cache_dir=str(cache)) == local
    shards = mf.load(url)[1].splits["train"].shards
    assert {p.name for p in cache.iterdir()} == {f"{s.sha256}.tar" for s in shards}
    assert epoch_by_rank(url, cache_dir=str(cache)) == local  # served from the cache
    evict(str(cache), max_bytes=2 * shards[0].size)
    assert len(list(cache.iterdir())) == 2


def test_the_trainer_opens_shards_through_open_train_data(dataset):
    from pirl.data import open_train_data
    from pirl.schema import DataSplit

    split = DataSplit(DATA_SOURCES=["shards"], DATA_PATHS=[str(dataset)], BATCHSIZE_PER_REPLICA=4)
    data = open_train_data(
        split, tiny_transform(), collate_single_view("data"), rank=1, world=2, seed=0, num_workers=0
    )
    assert isinstance(data, ShardTrainData)
    assert (data.num_samples, data.steps_per_epoch) == (N_TRAIN, 4)
    assert sum(len(b) for b in indices(data.batches(0))) == 14


def test_encoded_mode_hands_over_the_undecoded_images(dataset):
    """TRANSFORMS_ON_DEVICE: the loader yields each sample's stored bytes (decoded later on the
    device), in the same order as the decoding path."""
    from torchvision.io import ImageReadMode, decode_image

    from pirl.transforms import collate_encoded

    plain = list(loader(dataset, num_workers=2).batches(0))
    raw = list(
        loader(
            dataset, num_workers=2, transform=None, collate=collate_encoded, encoded=True
        ).batches(0)
    )
    assert indices(raw) == indices(plain)
    by_index = {
        rec.index: rec.image
        for shard in sorted((dataset / "train").glob("shard-*.tar"))
        for rec in unpack(shard.open("rb"))
    }
    for batch in raw:
        for data, i in zip(batch["encoded"], batch["index"].tolist(), strict=True):
            assert data.dtype == torch.uint8 and data.dim() == 1
            assert bytes(data.numpy()) == by_index[i]
            image = decode_image(data, mode=ImageReadMode.RGB)
            assert image.shape[0] == 3


@pytest.mark.parametrize("world,batch", [(2, 4), (1, 4), (3, 4), (2, 6), (4, 3)])
def test_shards_and_folders_split_the_same_way_over_ranks(dataset, world, batch):
    """One per-rank rule (pirl.data.plan) for every source: the same steps and samples per rank,
    and never a last batch of a single sample (BatchNorm cannot train on one)."""
    from pirl.data import IndexedTrainData, samples_per_rank

    per_rank = samples_per_rank(N_TRAIN, world, batch)
    for r in range(world):
        shards = loader(dataset, rank=r, world=world, batch_size=batch, num_workers=0)
        got = indices(shards.batches(0))
        folder = IndexedTrainData(
            samples=list(range(N_TRAIN)),  # only its length is used for the counts
            rank=r,
            world=world,
            batch_size=batch,
            drop_last=False,
            num_workers=0,
            collate=lambda x: x,
            seed=0,
        )
        assert len(got) == shards.steps_per_epoch == folder.steps_per_epoch
        assert sum(len(b) for b in got) == per_rank
        assert len(got[-1]) != 1
