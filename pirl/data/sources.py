"""List what `pirl prep` will read: the inputs of each split, their class and their order.

A source is one of:
- an ImageFolder tree with splits: SOURCE/train/<class>/<image> and optionally SOURCE/val/<class>/<image>
  (ImageNet-1K's layout); anything else at the top level (e.g. test/) is not read;
- an ImageFolder tree without splits: SOURCE/<class>/<image> (all of it is the train split);
- a list file: one sample per line, `relative/path label`, the path relative to the list file's
  folder (it may contain spaces; the label is the last whitespace-separated field and may not).
  Labels are class names; when every label is a non-negative integer they are class indices and
  the classes are "0".."max". Blank lines and lines starting with '#' are ignored.
Files may be nested below a class folder. Class indices follow the sorted class names of the
train split (torchvision's ImageFolder order); samples are in (class, path) order, which fixes the
sample indices. Without a val/ folder, `val_fraction` moves a seeded random fraction of each class
to a val split.
"""

from __future__ import annotations

import posixpath
import random
from dataclasses import dataclass, field

from pirl import storage
from pirl.errors import ConfigError, DataError, StorageError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Input:
    path: str  # relative to the source root, '/'-separated
    label: int
    size: int  # bytes from the listing; -1 when unknown (list files)


@dataclass
class Listing:
    root: str  # the URL input paths are relative to: the folder, or the list file's folder
    classes: list[str]
    splits: dict[str, list[Input]]
    ignored: list[tuple[str, str, str]] = field(default_factory=list)  # (split, path, reason)


def list_source(url: str, *, val_fraction: float = 0.0, seed: int = 0) -> Listing:
    """Inputs per split, in index order. DataError for a missing or empty source, StorageError for
    a store that cannot be read (credentials, permissions); nothing is written here."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    fs, root = storage.fs_and_path(url)
    root = root.rstrip("/") or "/"
    try:
        info = storage.retry(f"reading {url}", lambda: fs.info(root))
    except FileNotFoundError:
        raise DataError(f"the source {url!r} does not exist") from None
    except StorageError:
        raise
    except Exception as exc:  # botocore / gcsfs raise their own types for credentials, buckets
        raise StorageError(f"cannot read the source {url!r}: {type(exc).__name__}: {exc}") from None
    if info.get("type") == "file":
        listing = _from_list_file(url)
    else:
        listing = _from_folder(url, fs, root)
    if not listing.splits.get("train"):
        raise DataError(
            f"no images found in the source {url!r}: expected {url}/train/<class>/<image>, "
            f"{url}/<class>/<image>, or a list file of 'relative/path label' lines"
        )
    if val_fraction > 0:
        if "val" in listing.splits:
            raise ConfigError(
                f"the source {url!r} has its own val split; --val-fraction is for sources without one"
            )
        listing.splits["train"], listing.splits["val"] = _split_off(
            listing.splits["train"], val_fraction, seed
        )
    return listing


def _from_folder(url: str, fs, root: str) -> Listing:
    try:
        found = storage.retry(f"listing {url}", lambda: fs.find(root, detail=True))
    except StorageError:
        raise
    except FileNotFoundError:
        found = {}
    except Exception as exc:
        raise StorageError(f"cannot list the source {url!r}: {type(exc).__name__}: {exc}") from None
    prefix = root.rstrip("/") + "/"
    files = {
        p[len(prefix) :]: int(i.get("size") or 0)
        for p, i in found.items()
        if p.startswith(prefix) and i.get("type", "file") == "file"
    }
    has_splits = any(rel.startswith("train/") for rel in files)
    by_split: dict[str, dict[str, int]] = {}
    for rel, size in files.items():
        if has_splits:
            top, _, inner = rel.partition("/")
            if top in SPLITS and inner:
                by_split.setdefault(top, {})[inner] = size
        else:
            by_split.setdefault("train", {})[rel] = size
    listing = Listing(root=url.rstrip("/"), classes=[], splits={})
    train = by_split.get("train", {})
    listing.classes = sorted({rel.split("/", 1)[0] for rel in train if "/" in rel})
    label_of = {name: i for i, name in enumerate(listing.classes)}
    for split in SPLITS:
        if split not in by_split:
            continue
        base = f"{split}/" if has_splits else ""
        inputs = []
        for rel, size in by_split[split].items():
            cls, sep, _ = rel.partition("/")
            if not _is_utf8(rel):
                shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                listing.ignored.append((split, base + shown, "its name is not valid UTF-8"))
            elif not sep:
                listing.ignored.append((split, base + rel, "not inside a class folder"))
            elif cls not in label_of:
                listing.ignored.append((split, base + rel, f"class {cls!r} is not in train"))
            else:
                inputs.append(Input(base + rel, label_of[cls], size))
        listing.splits[split] = sorted(inputs, key=lambda x: (x.label, x.path))
    listing.ignored.sort()
    return listing


def _is_utf8(name: str) -> bool:
    """Local names that are not UTF-8 come back with surrogate escapes; shards store names as
    UTF-8 text, so such a file is skipped and reported like any other bad input."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _from_list_file(url: str) -> Listing:
    try:
        text = storage.read_bytes(url).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"the list file {url!r} is not UTF-8 text: {exc}") from None
    rows: list[tuple[str, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{url}:{lineno}: expected 'relative/path label', got {line!r}")
        rows.append((parts[0], parts[1]))
    names = {label for _, label in rows}
    if names and all(n.isdigit() for n in names):
        classes = [str(i) for i in range(max(int(n) for n in names) + 1)]
        label_of = {n: int(n) for n in names}
    else:
        classes = sorted(names)
        label_of = {n: i for i, n in enumerate(classes)}
    inputs = [Input(path.lstrip("/"), label_of[label], -1) for path, label in rows]
    return Listing(
        root=posixpath.dirname(url.rstrip("/")) or ".",
        classes=classes,
        splits={"train": sorted(inputs, key=lambda x: (x.label, x.path))},
    )


def _split_off(inputs: list[Input], fraction: float, seed: int) -> tuple[list[Input], list[Input]]:
    """Move round(fraction * n) inputs of each class, drawn with a per-class seeded RNG, to val."""
    by_class: dict[int, list[Input]] = {}
    for x in inputs:
        by_class.setdefault(x.label, []).append(x)
    train: list[Input] = []
    val: list[Input] = []
    for label, items in sorted(by_class.items()):
        n_val = round(fraction * len(items))
        chosen = set(random.Random(f"pirl-val/{seed}/{label}").sample(range(len(items)), n_val))
        for i, x in enumerate(items):
            (val if i in chosen else train).append(x)
    return train, val
