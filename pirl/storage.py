"""fsspec I/O: paths or URLs (file://, s3://, gs://, memory://), whole-object writes, retried reads.

S3-compatible stores (MinIO, Ceph, SeaweedFS) are reached with the standard AWS variables,
including AWS_ENDPOINT_URL; credentials are read by the backends from their usual places and
never pass through this module's messages.
"""

from __future__ import annotations

import os
import time
import uuid

import fsspec
from fsspec.core import url_to_fs

from pirl.errors import StorageError

TRANSIENT = (ConnectionError, TimeoutError, OSError)


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {url!r}: {exc}") from None


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def retry(what: str, fn, *, attempts: int = 5, first_delay: float = 0.5, max_total: float = 60.0):
    """Call fn(); on a transient error retry with exponential backoff, bounded in count and time."""
    start, delay = time.monotonic(), first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except PermissionError as exc:
            raise StorageError(f"{what}: permission denied ({exc})") from None
        except TRANSIENT as exc:
            if attempt == attempts or time.monotonic() - start + delay > max_total:
                raise StorageError(f"{what}: failed after {attempt} attempt(s): {exc}") from None
            time.sleep(delay)
            delay *= 2


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    return retry(f"reading {url}", lambda: fs.cat_file(path))


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object. Local files go through a temporary name and an atomic rename; an
    object store PUT is already all-or-nothing (the object appears only when complete)."""
    fs, path = fs_and_path(url)
    try:
        if is_local(url):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            retry(f"writing {url}", lambda: fs.pipe_file(path, data))
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"writing {url}: {exc}") from None


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return bool(retry(f"checking {url}", lambda: fs.exists(path)))


def list_names(url: str) -> list[str]:
    """Base names of the objects directly under `url` ([] when it does not exist)."""
    fs, path = fs_and_path(url)
    try:
        entries = retry(f"listing {url}", lambda: fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    fs.invalidate_cache(path)
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def remove(url: str) -> None:
    fs, path = fs_and_path(url)
    try:
        retry(f"deleting {url}", lambda: fs.rm_file(path))
    except FileNotFoundError:
        pass


def check_writable(url: str) -> None:
    """Fail early, naming the URL, when the output location cannot be written."""
    probe = join(url, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except StorageError as exc:
        raise StorageError(f"the output location {url!r} is not writable: {exc}") from None
    except Exception as exc:  # backends raise their own types for missing buckets / bad credentials
        raise StorageError(
            f"the output location {url!r} is not writable: {type(exc).__name__}: {exc}"
        ) from None
