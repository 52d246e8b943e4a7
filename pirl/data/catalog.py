"""VISSL's dataset catalog: DATASET_NAMES resolved to paths when DATA_PATHS is empty.

A catalog is a JSON file (a path or any fsspec URL) in the format of VISSL's
`dataset_catalog.json`, one entry per dataset name, one [images, labels] pair per split:

    {"imagenet1k_folder": {"train": ["/data/in1k/train", "<lbl_path>"],
                           "val": ["/data/in1k/val", "<lbl_path>"]}}

The split's SPLIT (train, val) picks the pair; the first path becomes DATA_PATHS, the second
LABEL_PATHS for a disk_filelist source (folders and shards carry their own labels). The catalog
is config.DATA.DATASET_CATALOG, or else the file named by the environment variable
PIRL_DATASET_CATALOG, so that, as with VISSL, it is written once and a command line only names
the dataset. Paths given in DATA_PATHS always win.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from pirl import storage
from pirl.errors import ConfigError, StorageError
from pirl.schema import DataSplit

CATALOG_ENV = "PIRL_DATASET_CATALOG"


def catalog_url(configured: str) -> str:
    return configured or os.environ.get(CATALOG_ENV, "")


def read_catalog(url: str) -> dict:
    try:
        catalog = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise ConfigError(f"the dataset catalog {url} does not exist") from None
    except StorageError as exc:
        raise ConfigError(f"cannot read the dataset catalog {url}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"the dataset catalog {url} is not valid JSON: {exc}") from None
    if not isinstance(catalog, dict):
        raise ConfigError(f"the dataset catalog {url} must map dataset names to splits")
    return catalog


def fill_paths(split, where: str, catalog: dict, url: str) -> str | None:
    """Set `split`'s DATA_PATHS (and LABEL_PATHS for disk_filelist) from the catalog entry of its
    DATASET_NAMES; a note saying so, or None when DATA_PATHS was already given."""
    source = split.DATA_SOURCES[0]
    if split.DATA_PATHS or source == "synthetic":
        return None
    names = split.DATASET_NAMES
    if len(names) != 1:
        raise ConfigError(
            f"{where}.DATASET_NAMES={names}: one dataset per split (give {where}.DATA_PATHS)"
        )
    name = names[0]
    if name not in catalog:
        raise ConfigError(
            f"{where}.DATASET_NAMES=[{name}] is not in the dataset catalog {url} (it has "
            f"{sorted(catalog)}): add it there, or give {where}.DATA_PATHS"
        )
    pair = catalog[name].get(split.SPLIT) if isinstance(catalog[name], dict) else None
    if not (
        isinstance(pair, list) and 1 <= len(pair) <= 2 and all(isinstance(p, str) for p in pair)
    ):
        raise ConfigError(
            f"the dataset catalog {url} has no usable '{split.SPLIT}' entry for {name}: want "
            f'"{split.SPLIT}": ["<images path>", "<labels path>"], got {pair!r}'
        )
    if pair[0].startswith("<"):
        raise ConfigError(
            f"the dataset catalog {url} still holds the placeholder {pair[0]!r} for "
            f"{name}/{split.SPLIT}: write the real path there, or give {where}.DATA_PATHS"
        )
    split.DATA_PATHS = [pair[0]]
    note = f"{where}.DATA_PATHS -> [{pair[0]}] ({name}/{split.SPLIT} in {url})"
    if source == "disk_filelist" and not split.LABEL_PATHS and len(pair) == 2:
        if not pair[1].startswith("<"):
            split.LABEL_PATHS = [pair[1]]
            note += f", LABEL_PATHS -> [{pair[1]}]"
    return note


def resolve(configured: str, splits: Sequence[tuple[DataSplit, str]]) -> list[str]:
    """Fill every (split, config path) whose DATA_PATHS is empty from the catalog, if one is
    set; the notes say what was filled."""
    url = catalog_url(configured)
    pending = [(s, where) for s, where in splits if not s.DATA_PATHS]
    if not url or not pending:
        return []
    catalog = read_catalog(url)
    notes = [fill_paths(s, where, catalog, url) for s, where in pending]
    return [n for n in notes if n]
