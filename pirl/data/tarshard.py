"""Pack samples into a tar shard and read them back, with WebDataset's member naming.

A sample is the members `<key>.jpg`, `<key>.cls`, `<key>.idx`, `<key>.src` (see
pirl.data.manifest). Shards are plain ustar archives with fixed metadata (mtime 0, mode 0444),
so the same samples always give the same bytes and the same sha256: that is what lets a prep
rerun recognise its own finished shards.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import BinaryIO


@dataclass(frozen=True)
class Record:
    index: int  # sample index within the split
    label: int
    image: bytes  # JPEG
    source: str  # path relative to the prep source


@dataclass(frozen=True)
class Damaged:
    index: int | None  # None when the index itself is unreadable
    reason: str


def key(index: int) -> str:
    return f"{index:09d}"


def pack(records: Iterable[Record]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for r in records:
            members = (
                ("jpg", r.image),
                ("cls", str(r.label).encode()),
                ("idx", str(r.index).encode()),
                ("src", r.source.encode()),
            )
            for ext, data in members:
                info = tarfile.TarInfo(f"{key(r.index)}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack(stream: BinaryIO) -> Generator[Record | Damaged, None, None]:
    """Samples in archive order, read sequentially (tar mode 'r|': no seeking, any stream).

    A sample with a missing or unparseable member is yielded as Damaged; an archive that cannot
    be read further (truncated, garbled header) ends with one Damaged(None, ...)."""
    group_key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                k, _, ext = base.partition(".")
                if k != group_key and members:
                    yield _parse(members)
                    members = {}
                group_key = k
                member = tar.extractfile(m)
                assert member is not None  # a regular file always has one
                members[ext] = member.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        if members:  # the sample being read when the archive broke: complete, or Damaged
            yield _parse(members)
        yield Damaged(None, f"unreadable archive: {type(exc).__name__}: {exc}")
        return
    if members:
        yield _parse(members)


def _parse(members: dict[str, bytes]) -> Record | Damaged:
    try:
        index = int(members["idx"])
    except (KeyError, ValueError):
        return Damaged(None, "missing or unreadable .idx")
    try:
        return Record(
            index=index,
            label=int(members["cls"]),
            image=members["jpg"],
            source=members.get("src", b"").decode("utf-8", "replace"),
        )
    except (KeyError, ValueError) as exc:
        return Damaged(index, f"missing or unreadable member: {exc}")
