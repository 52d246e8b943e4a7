"""Reading one shard's bytes: ranged reads on a background thread, checksum, optional local cache.

Why a thread of ranged reads rather than `fs.open`: every read is a small stateless request that
`storage.retry` can repeat after a transient error, the next chunks download while the worker
decodes the current ones, and memory stays bounded (`depth` chunks per open shard) whatever
the shard size. The sha256 of the whole object is checked when the reader reaches its end;
`finish()` reads the rest of a shard whose samples were all taken, so that every shard read is
checked.

The cache (`cache_dir`) keeps whole remote shards on local disk, named by their sha256, so a
second epoch reads from disk; it is filled as a side effect of a complete read and kept under
`max_bytes` by deleting the least recently used shards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import uuid

from pirl import storage
from pirl.data.manifest import Shard

log = logging.getLogger("pirl")

CHUNK = 2 << 20  # bytes per ranged read
DEPTH = 4  # chunks buffered ahead per open shard
STALE_PART_SECONDS = 3600


class ShardStream:
    """A read-only file-like object over one shard (what `tarfile.open(mode='r|')` needs)."""

    def __init__(
        self,
        root: str,
        shard: Shard,
        *,
        cache_dir: str | None = None,
        cache_bytes: int = 0,
        chunk: int = CHUNK,
        depth: int = DEPTH,
    ):
        self.shard, self.url = shard, storage.join(root, shard.name)
        self.verified: bool | None = None  # None until the whole object has been read
        self._cache_dir, self._cache_bytes = cache_dir, cache_bytes
        self._part: str | None = None
        source_url = self.url
        if cache_dir and not storage.is_local(root):
            cached = os.path.join(cache_dir, f"{shard.sha256}.tar")
            if _is_complete(cached, shard.size):
                os.utime(cached)
                source_url, self._cache_dir = cached, None  # already cached: nothing to add
            else:
                os.makedirs(cache_dir, exist_ok=True)
                self._part = os.path.join(
                    cache_dir, f".{shard.sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
                )
        self._fs, self._path = storage.fs_and_path(source_url)
        self._chunk = chunk
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._buf, self._off, self._eof = b"", 0, False
        self._thread = threading.Thread(target=self._fetch, name=f"shard {shard.name}", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- background thread
    def _fetch(self) -> None:
        digest, pos, size = hashlib.sha256(), 0, self.shard.size
        part = open(self._part, "wb") if self._part else None
        try:
            while pos < size and not self._stop.is_set():
                end = min(pos + self._chunk, size)
                data = storage.retry(
                    f"reading {self.url}",
                    lambda p=pos, e=end: self._fs.cat_file(self._path, start=p, end=e),
                )
                if not data:
                    break  # shorter than the manifest says
                digest.update(data)
                if part:
                    part.write(data)
                pos += len(data)
                if not self._put(data):
                    return
            if not self._stop.is_set():
                self.verified = pos == size and digest.hexdigest() == self.shard.sha256
                if part:
                    part.close()
                    part = None
                    self._publish()
            self._put(b"")
        except BaseException as exc:  # handed to the reader, which raises it
            self._put(exc)
        finally:
            if part:
                part.close()
            if self._part and os.path.exists(self._part):
                os.unlink(self._part)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _publish(self) -> None:
        if not self.verified or not self._part or not self._cache_dir:
            return
        final = os.path.join(self._cache_dir, f"{self.shard.sha256}.tar")
        os.replace(self._part, final)
        evict(self._cache_dir, self._cache_bytes, keep=final)

    # -------------------------------------------------------------- file-like interface
    def read(self, n: int = -1) -> bytes:
        parts, want = [], n
        while want != 0:
            if self._off >= len(self._buf):
                if self._eof or not self._next_chunk():
                    break
                continue
            avail = len(self._buf) - self._off
            take = avail if want < 0 else min(want, avail)
            parts.append(self._buf[self._off : self._off + take])
            self._off += take
            if want > 0:
                want -= take
        return b"".join(parts)

    def _next_chunk(self) -> bool:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        if not item:
            self._eof = True
            if self.verified is False:
                log.warning(
                    "%s: size or sha256 differs from the manifest (damaged): counted as a damaged "
                    "sample",
                    self.url,
                )
            return False
        self._buf, self._off = item, 0
        return True

    def finish(self) -> bool:
        """Read the rest of the shard, discarding it, and close: whether its size and sha256
        matched the manifest."""
        while not self._eof:
            self._off = len(self._buf)
            self._next_chunk()
        self.close()
        return bool(self.verified)

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_complete(path: str, size: int) -> bool:
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def evict(cache_dir: str, max_bytes: int, keep: str | None = None) -> None:
    """Delete the least recently used cached shards until the cache holds at most max_bytes,
    and partial downloads older than an hour (left by killed workers)."""
    entries, now = [], time.time()
    try:
        names = os.listdir(cache_dir)
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(cache_dir, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if name.endswith(".part"):
            if now - st.st_mtime > STALE_PART_SECONDS:
                _unlink(path)
        elif name.endswith(".tar"):
            entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if path != keep:
            _unlink(path)
            total -= size


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
