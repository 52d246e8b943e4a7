"""VISSL's `disk_filelist` source: a .npy array of image paths, and optionally a .npy of labels.

    config.DATA.TRAIN.DATA_SOURCES=[disk_filelist]
    config.DATA.TRAIN.DATA_PATHS=[/data/in1k/train_images.npy]
    config.DATA.TRAIN.LABEL_PATHS=[/data/in1k/train_labels.npy]  # for labelled use (benchmark)

The lists are what VISSL's `extra_scripts/create_*_data_files.py` write: `np.save` of the image
paths (strings) and of the integer labels, index i of one matching index i of the other. Paths
and the lists themselves may be fsspec URLs; REMOVE_IMG_PATH_PREFIX / NEW_IMG_PATH_PREFIX rewrite
each path's prefix, as in VISSL, for lists made on another machine. Arrays are loaded without
pickle: a list saved as an object array must be re-saved as strings (`np.array(paths, dtype=str)`).
VISSL's LABEL_SOURCES is not read: LABEL_PATHS alone says where the labels are.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pirl import storage
from pirl.errors import DataError


def load_npy(url: str, what: str, mmap: bool) -> np.ndarray:
    """The array in `url` (memory-mapped when local and `mmap`); DataError naming the file."""
    try:
        if mmap and storage.is_local(url):
            return np.load(url.removeprefix("file://"), mmap_mode="r", allow_pickle=False)
        return np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"the {what} list {url!r} does not exist") from None
    except ValueError as exc:
        hint = ""
        if "allow_pickle" in str(exc) or "Python objects" in str(exc):
            hint = (
                "; it holds Python objects: re-save it as a string array, "
                "np.save(path, np.array(paths, dtype=str))"
            )
        raise DataError(
            f"the {what} list {url!r} is not a readable .npy array: {exc}{hint}"
        ) from None


class FileListImages(Dataset):
    """Images by index from a VISSL file list, with their labels (-1 when no label list)."""

    def __init__(
        self,
        paths_url: str,
        labels_url: str = "",
        *,
        mmap: bool = True,
        remove_prefix: str = "",
        new_prefix: str = "",
    ):
        self.paths_url = paths_url
        self.paths = load_npy(paths_url, "image", mmap)
        if self.paths.ndim != 1 or self.paths.dtype.kind not in "US":
            raise DataError(
                f"the image list {paths_url!r} must be a 1-d array of paths, got "
                f"{self.paths.dtype} of shape {self.paths.shape}"
            )
        self.remove_prefix, self.new_prefix = remove_prefix, new_prefix
        self.labels = None
        self.classes: list[str] = []
        if labels_url:
            labels = np.asarray(load_npy(labels_url, "label", mmap))
            if labels.ndim == 2 and labels.shape[1:] == (1,):
                labels = labels[:, 0]  # VISSL's scripts also write N x 1
            if labels.shape != self.paths.shape or labels.dtype.kind not in "iu":
                raise DataError(
                    f"the label list {labels_url!r} must hold one integer per image of "
                    f"{paths_url!r} ({len(self.paths)}), got {labels.dtype} of shape {labels.shape}"
                )
            self.labels = labels.astype(np.int64)
            if len(self.labels) and self.labels.min() < 0:
                raise DataError(f"the label list {labels_url!r} holds negative labels")
            if len(self.labels):
                self.classes = [str(c) for c in range(int(self.labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        path = str(self.paths[i])
        if self.remove_prefix and path.startswith(self.remove_prefix):
            path = self.new_prefix + path[len(self.remove_prefix) :]
        return path

    def label(self, i: int) -> int:
        return int(self.labels[i]) if self.labels is not None else -1

    def _read(self, i: int) -> bytes:
        path = self.path(i)
        try:
            return storage.read_bytes(path)
        except FileNotFoundError:
            raise DataError(
                f"image {i} of {self.paths_url!r}, {path!r}, does not exist "
                "(REMOVE_IMG_PATH_PREFIX / NEW_IMG_PATH_PREFIX rewrite moved paths)"
            ) from None

    def encoded(self, i: int) -> tuple[torch.Tensor, int]:
        """The file's bytes, undecoded (for TRANSFORMS_ON_DEVICE)."""
        return torch.frombuffer(bytearray(self._read(i)), dtype=torch.uint8), self.label(i)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        data = self._read(i)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB"), self.label(i)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot decode {self.path(i)}: {exc}; fix or remove it") from None
