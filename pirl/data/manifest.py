"""The sharded dataset format written by `pirl prep` and read by the streaming loader.

Layout under the dataset root (any fsspec URL):

    manifest.json                 written LAST: the dataset exists once this object does
    report.json                   what prep skipped or converted, and why
    train/shard-000000.tar ...    tar shards, WebDataset-compatible member names
    val/shard-000000.tar ...      (only when the source had, or prep made, a val split)
    _prep/<split>/shard-*.json    prep's resume state, one per shard (not needed for reading)

A shard holds the samples first_index .. first_index+num_samples-1 of its split, in index order;
each sample is four members sharing the key `<index:09d>`:
    <key>.jpg   the image, RGB JPEG
    <key>.cls   the class index, decimal text
    <key>.idx   the sample index within the split (the memory-bank row), decimal text
    <key>.src   the image's path relative to the prep source, UTF-8 text

manifest.json ("format": "pirl-shards/2"):
    {"format", "source", "params": {prep parameters},
     "splits": {"train": {"num_samples", "classes": [...],
                          "shards": [{"name", "num_samples", "size", "sha256", "first_index"}]}}}
Shard names are relative to the root. Indices run 0..num_samples-1 per split without gaps, so a
manifest alone gives the dataset length with no scan. Samples are in a seeded random order
(params.order = "shuffled"), so each shard mixes every class. Format 1 (older `pirl prep`) is
the same layout in sorted (class, file) order: it still loads, with a warning (`class_ordered`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from pirl import storage
from pirl.errors import DataError, StorageError, StorageUnavailable

FORMAT = "pirl-shards/2"
CLASS_ORDERED_FORMAT = "pirl-shards/1"  # still read: same layout, samples sorted by class
MIN_SAMPLE_BYTES = 4 * 512  # four tar members, each at least a 512-byte header
_SHA256 = re.compile(r"[0-9a-f]{64}")
MANIFEST = "manifest.json"
REPORT = "report.json"


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the dataset root, e.g. "train/shard-000000.tar"
    num_samples: int
    size: int  # bytes
    sha256: str
    first_index: int


@dataclass
class Split:
    num_samples: int
    classes: list[str]
    shards: list[Shard] = field(default_factory=list)


@dataclass
class Manifest:
    source: str
    params: dict
    splits: dict[str, Split]
    format: str = FORMAT

    @property
    def class_ordered(self) -> bool:
        """Made by an older prep that wrote samples sorted by class (batches mix few classes)."""
        return self.format == CLASS_ORDERED_FORMAT

    def to_json(self) -> bytes:
        """Deterministic bytes (no timestamps), so an unchanged dataset rewrites nothing."""
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()


def dataset_root(url: str) -> str:
    """The dataset root for `url`, which may be the root itself or its manifest.json."""
    url = url.rstrip("/")
    return url[: -len(MANIFEST) - 1] if url.endswith("/" + MANIFEST) else url


def parse(data: bytes, where: str) -> Manifest:
    """Parse and check manifest bytes; DataError when malformed or self-inconsistent."""
    try:
        raw = json.loads(data)
        if raw.get("format") not in (FORMAT, CLASS_ORDERED_FORMAT):
            raise DataError(
                f"{where}: format {raw.get('format')!r} is not {FORMAT!r} (not made by `pirl prep`, "
                "or by a newer one: upgrade pirl, or re-run `pirl prep`)"
            )
        splits = {
            name: Split(
                num_samples=int(s["num_samples"]),
                classes=list(s["classes"]),
                shards=[Shard(**sh) for sh in s["shards"]],
            )
            for name, s in raw["splits"].items()
        }
        manifest = Manifest(
            source=raw["source"], params=raw["params"], splits=splits, format=raw["format"]
        )
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None
    for name, split in manifest.splits.items():
        for i, shard in enumerate(split.shards):
            check_shard_fields(shard, f"{where} split {name!r}: shards[{i}]")
        check_split(split, f"{where} split {name!r}")
    return manifest


def check_shard_fields(shard: Shard, where: str) -> None:
    """A manifest's fields are used as paths (the shard name, the cache file named by the hash)
    and to size things: anything but a relative path inside the dataset root, a 64-hex sha256
    and counts a shard of that size can hold is refused, naming the field."""
    name = shard.name
    parts = name.split("/") if isinstance(name, str) else []
    if (
        not parts
        or name.startswith("/")
        or "\\" in name
        or ":" in name
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise DataError(
            f"{where}.name {name!r} is not a relative path inside the dataset root (shard names "
            "are like 'train/shard-000000.tar'); re-run `pirl prep`, or fix the manifest"
        )
    if not isinstance(shard.sha256, str) or not _SHA256.fullmatch(shard.sha256):
        raise DataError(f"{where}.sha256 {shard.sha256!r} is not 64 lowercase hex characters")
    for field_name in ("num_samples", "size", "first_index"):
        value = getattr(shard, field_name)
        if type(value) is not int or value < 0:
            raise DataError(f"{where}.{field_name} {value!r} is not a non-negative integer")
    if shard.num_samples * MIN_SAMPLE_BYTES > shard.size:
        raise DataError(
            f"{where}.num_samples {shard.num_samples} cannot fit in its {shard.size} bytes (a "
            f"sample takes at least {MIN_SAMPLE_BYTES}): the manifest is wrong"
        )


def check_split(split: Split, where: str) -> None:
    """Shards must tile 0..num_samples-1 in order; anything else means the manifest is wrong."""
    expected = 0
    for shard in split.shards:
        if shard.first_index != expected or shard.num_samples <= 0:
            raise DataError(
                f"{where}: shard {shard.name} starts at index {shard.first_index} with "
                f"{shard.num_samples} samples, expected a non-empty shard starting at {expected}"
            )
        expected += shard.num_samples
    if expected != split.num_samples:
        raise DataError(
            f"{where}: the shards hold {expected} samples but the manifest says {split.num_samples}"
        )


def load(url: str) -> tuple[str, Manifest]:
    """(dataset root, manifest) for a dataset root or manifest URL; DataError when absent."""
    root = dataset_root(url)
    murl = storage.join(root, MANIFEST)
    try:
        data = storage.read_bytes(murl)
    except FileNotFoundError:
        raise DataError(
            f"no {MANIFEST} at {root!r}: not a dataset made by `pirl prep`, or its prep has not "
            "finished (the manifest is written last)"
        ) from None
    except StorageUnavailable:
        raise  # the store stopped answering: retryable, not a bad dataset
    except StorageError as exc:
        raise DataError(f"cannot read {murl}: {exc}") from None
    except Exception as exc:  # backends raise their own types for missing buckets / credentials
        raise DataError(f"cannot read {murl}: {type(exc).__name__}: {exc}") from None
    return root, parse(data, murl)
