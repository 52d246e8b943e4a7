"""`pirl prep SOURCE DEST`: an image dataset in, tar shards and a manifest out (any fsspec URLs).

    pirl prep s3://bucket/imagenet s3://bucket/imagenet-shards --workers 16
    pirl prep /data/flowers file:///data/flowers-shards --val-fraction 0.1 --resize 256
    pirl prep --demo /tmp/shapes-shards

SOURCE is an ImageFolder tree or a list file (see pirl.data.sources); DEST gets the layout of
pirl.data.manifest. How prep stays safe on 1.28M images:
- Everything that can fail for the whole dataset (source missing or empty, bucket or credentials
  unusable, DEST not writable) is checked before the first write.
- Bad inputs never stop it: each file is decoded fully, converted to upright RGB when it must be
  (pirl.data.clean), or skipped; both are listed with the reason in DEST/report.json.
- Shard k holds the good images among inputs k*shard_size .. (k+1)*shard_size-1, so the work
  splits into independent chunks for a process pool; the main process numbers the samples in
  order (indices 0..N-1 without gaps) and writes each shard whole. The inputs are first put in a
  random order seeded by --seed (`iid_order`), so every shard mixes all classes.
- After each shard a small state object DEST/_prep/<split>/shard-K.json records what went into
  it (a digest of its inputs and of the parameters) and its checksum. A rerun reuses every shard
  whose state matches and whose bytes still hash right, so a crashed prep resumes where it stopped
  and a finished one writes nothing. DEST/manifest.json is written last, and removed before the
  first write of a rerun that has to change something: a half-written dataset never looks done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import random
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from pirl import lease, storage
from pirl.data import manifest as mf
from pirl.data.clean import MAX_PIXELS, BadImage, CleanParams, clean
from pirl.data.sources import Input, Listing, list_source
from pirl.data.tarshard import Record, pack
from pirl.errors import ConfigError, DataError, PirlError, StorageError
from pirl.redaction import redact

log = logging.getLogger("pirl")

DEFAULT_SHARD_SIZE = 1000
DEMO_SHARD_SIZE = 128
DEMO_IMAGE_SIZE = 64
STATE_DIR = "_prep"
STATE_FORMAT = "pirl-prep-state/1"
REPORT_FORMAT = "pirl-prep-report/1"


@dataclass(frozen=True)
class Options:
    shard_size: int = DEFAULT_SHARD_SIZE  # inputs per shard (the samples are the good ones)
    resize: int | None = None
    workers: int = 1
    val_fraction: float = 0.0
    seed: int = 0
    max_pixels: int = MAX_PIXELS

    def clean_params(self) -> CleanParams:
        return CleanParams(resize=self.resize, max_pixels=self.max_pixels)

    def manifest_params(self) -> dict:
        """What shaped the shards' content (workers do not)."""
        return {
            "shard_size": self.shard_size,
            "resize": self.resize,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "max_pixels": self.max_pixels,
            "order": "shuffled",
            "image_format": "jpeg",
            "jpeg_quality": self.clean_params().quality,
        }


# ---------------------------------------------------------------- one chunk (in a pool worker)


@dataclass
class ChunkResult:
    records: list[tuple[str, int, bytes]] = field(default_factory=list)  # (path, label, jpeg)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    converted: list[tuple[str, str]] = field(default_factory=list)  # (path, what changed)
    unchanged: int = 0  # inputs stored byte for byte


def process_chunk(root: str, inputs: list[Input], params: CleanParams) -> ChunkResult:
    """Read and clean one shard's inputs. Per-file problems are results, never exceptions; only a
    store that stops answering (after retries) raises, so the prep stops instead of marking good
    files bad."""
    fs, base = storage.fs_and_path(root)
    base = base.rstrip("/")
    paths = [f"{base}/{x.path}" for x in inputs]
    try:
        timeout = storage.call_timeout(sum(max(0, x.size) for x in inputs))
        blobs = storage.call_with_deadline(
            lambda: fs.cat(paths, on_error="return") if paths else {}, timeout, f"reading {root}"
        )
    except Exception:  # a backend that cannot batch: read one by one below
        blobs = {}
    out = ChunkResult()
    for x, path in zip(inputs, paths, strict=True):
        raw = blobs.get(path)
        if raw is None or isinstance(raw, BaseException):
            try:
                raw = storage.retry(f"reading {root}/{x.path}", lambda p=path: fs.cat_file(p))
            except FileNotFoundError:
                out.skipped.append((x.path, "file not found"))
                continue
            except StorageError as exc:
                if "permission denied" not in str(exc):
                    raise
                out.skipped.append((x.path, "permission denied"))
                continue
            except IsADirectoryError:
                out.skipped.append((x.path, "a folder, not a file"))
                continue
        try:
            cleaned = clean(raw, params)
        except BadImage as exc:
            out.skipped.append((x.path, str(exc)))
            continue
        out.records.append((x.path, x.label, cleaned.data))
        if cleaned.changes:
            out.converted.append((x.path, "; ".join(cleaned.changes)))
        out.unchanged += cleaned.passed_through
    return out


# ---------------------------------------------------------------- one split (in the main process)


@dataclass
class ChunkState:
    """The resume state of one chunk, stored as DEST/_prep/<split>/shard-K.json."""

    digest: str
    shard: mf.Shard | None  # None when every input of the chunk was skipped
    skipped: list[tuple[str, str]]
    converted: list[tuple[str, str]]
    inputs: int
    unchanged: int

    def to_json(self) -> bytes:
        d = asdict(self)
        d["format"] = STATE_FORMAT
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ChunkState:
        d = json.loads(data)
        if d.pop("format", None) != STATE_FORMAT:
            raise ValueError("not a prep state")
        shard = mf.Shard(**d.pop("shard")) if d.get("shard") else None
        d.pop("shard", None)
        d["skipped"] = [tuple(x) for x in d["skipped"]]
        d["converted"] = [tuple(x) for x in d["converted"]]
        return cls(shard=shard, **d)


class _Inline(Executor):
    """A one-process 'pool': --workers 1 runs the chunks here, in order."""

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:
            fut.set_exception(exc)
        return fut


class _Dest:
    """Writes under DEST; the first write of a run first removes a stale manifest."""

    def __init__(self, url: str):
        self.url, self.dirty = url.rstrip("/"), False

    def write(self, rel: str, data: bytes) -> None:
        if not self.dirty:
            storage.remove(storage.join(self.url, mf.MANIFEST))
            self.dirty = True
        storage.write_bytes(storage.join(self.url, rel), data)


def _state_name(split: str, k: int) -> str:
    return f"{STATE_DIR}/{split}/shard-{k:06d}.json"


def _chunk_digest(source_id: str, params: CleanParams, inputs: list[Input]) -> str:
    body = {
        "state": STATE_FORMAT,
        "source": source_id,
        "clean": asdict(params),
        "inputs": [[x.path, x.label, x.size] for x in inputs],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _reusable(dest: str, split: str, k: int, digest: str) -> ChunkState | None:
    """The chunk's saved state when it matches `digest` and its shard's bytes hash right."""
    try:
        state = ChunkState.from_json(storage.read_bytes(storage.join(dest, _state_name(split, k))))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None
    if state.digest != digest:
        return None
    if state.shard is None:
        return state
    try:
        size, sha = _size_and_sha256(storage.join(dest, state.shard.name), state.shard.size)
    except FileNotFoundError:
        return None
    if (size, sha) != (state.shard.size, state.shard.sha256):
        log.warning("%s: damaged, rewriting it", state.shard.name)
        return None
    return state


def _size_and_sha256(url: str, size_hint: int, block: int = 8 << 20) -> tuple[int, str]:
    """Hash an object in blocks (a shard can be hundreds of MB; several are checked at once)."""
    fs, path = storage.fs_and_path(url)

    def run() -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        with fs.open(path, "rb", block_size=block) as f:
            while chunk := f.read(block):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    return storage.retry(f"checking {url}", run, nbytes=size_hint)


def write_split(
    split: str,
    inputs: list[Input],
    *,
    root: str,
    dest: _Dest,
    opts: Options,
    source_id: str,
    pool: Executor,
    window: int,
) -> list[ChunkState]:
    """Write (or reuse) every shard of a split; returns the chunk states in order."""
    params = opts.clean_params()
    chunks = [inputs[i : i + opts.shard_size] for i in range(0, len(inputs), opts.shard_size)]
    digests = [_chunk_digest(source_id, params, c) for c in chunks]
    saved = set(storage.list_names(storage.join(dest.url, STATE_DIR, split)))
    candidates = [k for k in range(len(chunks)) if f"shard-{k:06d}.json" in saved]
    with ThreadPoolExecutor(8) as io_pool:
        found = io_pool.map(lambda k: _reusable(dest.url, split, k, digests[k]), candidates)
        reusable = {k: s for k, s in zip(candidates, found, strict=True) if s is not None}
    if reusable:
        log.info("%s: %d of %d shard(s) already written", split, len(reusable), len(chunks))

    pending = deque(k for k in range(len(chunks)) if k not in reusable)
    running: dict[int, Future] = {}

    def submit(k: int) -> None:
        running[k] = pool.submit(process_chunk, root, chunks[k], params)

    states, next_index = [], 0
    for k in range(len(chunks)):
        while pending and len(running) < window:
            submit(pending.popleft())
        state = reusable.get(k)
        if state is not None and (state.shard is None or state.shard.first_index == next_index):
            states.append(state)
            next_index += state.shard.num_samples if state.shard else 0
            continue
        if k not in running:  # reusable content, but earlier shards changed its first index
            submit(k)
        result = running.pop(k).result()
        state = _write_chunk(split, k, chunks[k], result, digests[k], next_index, dest)
        states.append(state)
        next_index += state.shard.num_samples if state.shard else 0
        log.info(
            "%s: shard %d/%d, %d sample(s), %d skipped",
            split,
            k + 1,
            len(chunks),
            state.shard.num_samples if state.shard else 0,
            len(state.skipped),
        )
    return states


def _write_chunk(
    split: str,
    k: int,
    inputs: list[Input],
    result: ChunkResult,
    digest: str,
    first_index: int,
    dest: _Dest,
) -> ChunkState:
    shard = None
    if result.records:
        records = [
            Record(index=first_index + i, label=label, image=image, source=path)
            for i, (path, label, image) in enumerate(result.records)
        ]
        data = pack(records)
        name = f"{split}/shard-{k:06d}.tar"
        dest.write(name, data)
        shard = mf.Shard(
            name=name,
            num_samples=len(records),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            first_index=first_index,
        )
    state = ChunkState(
        digest=digest,
        shard=shard,
        skipped=result.skipped,
        converted=result.converted,
        inputs=len(inputs),
        unchanged=result.unchanged,
    )
    dest.write(_state_name(split, k), state.to_json())
    return state


# ---------------------------------------------------------------- the whole dataset


def prep(source: str, dest: str, opts: Options, *, source_label: str | None = None) -> mf.Manifest:
    """Make (or finish, or confirm) the sharded dataset at `dest`; returns its manifest."""
    if opts.shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {opts.shard_size}")
    if opts.resize is not None and opts.resize < 1:
        raise ConfigError(f"--resize must be at least 1, got {opts.resize}")
    _check_not_nested(source, dest)
    listing = list_source(source, val_fraction=opts.val_fraction, seed=opts.seed)
    storage.check_writable(dest)
    source_id = source_label or redact(source.rstrip("/"))
    out = _Dest(dest)
    held = lease.acquire(out.url, "pirl prep", "DEST")
    try:
        return _prep(listing, out, opts, source_id)
    finally:
        held.release()


def _prep(listing: Listing, out: _Dest, opts: Options, source_id: str) -> mf.Manifest:
    workers = max(1, opts.workers)
    pool: Executor = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        if workers > 1
        else _Inline()
    )
    states: dict[str, list[ChunkState]] = {}
    try:
        for split, inputs in listing.splits.items():
            if inputs:
                states[split] = write_split(
                    split,
                    iid_order(inputs, opts.seed, split),
                    root=listing.root,
                    dest=out,
                    opts=opts,
                    source_id=source_id,
                    pool=pool,
                    window=2 * workers,
                )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    manifest = mf.Manifest(
        source=source_id,
        params=opts.manifest_params(),
        splits={
            split: mf.Split(
                num_samples=sum(s.shard.num_samples for s in chunk_states if s.shard),
                classes=list(listing.classes),
                shards=[s.shard for s in chunk_states if s.shard],
            )
            for split, chunk_states in states.items()
        },
    )
    _publish(out, source_id, listing, states, manifest)
    return manifest


def iid_order(inputs: list[Input], seed: int, split: str) -> list[Input]:
    """The inputs in a seeded random order (the same on every run): shards, and so the batches
    a streaming loader draws from a few shards at a time, mix every class."""
    order = list(inputs)
    random.Random(f"pirl-prep-order:{seed}:{split}").shuffle(order)
    return order


def _check_not_nested(source: str, dest: str) -> None:
    _, s = storage.fs_and_path(source)
    _, d = storage.fs_and_path(dest)
    same_kind = storage.is_local(source) == storage.is_local(dest)
    s, d = s.rstrip("/") + "/", d.rstrip("/") + "/"
    if same_kind and (d.startswith(s) or s.startswith(d)):
        raise ConfigError(f"DEST {dest!r} and SOURCE {source!r} must not contain one another")


def _publish(
    out: _Dest,
    source_id: str,
    listing: Listing,
    states: dict[str, list[ChunkState]],
    manifest: mf.Manifest,
) -> None:
    """report.json, then manifest.json last; each only when its bytes change."""
    lease.check(out.url)  # another prep took DEST over: publish nothing
    report = build_report(source_id, listing, states)
    _write_if_changed(out, mf.REPORT, (json.dumps(report, indent=1) + "\n").encode())
    empty = [s for s, split in manifest.splits.items() if split.num_samples == 0]
    if "train" not in manifest.splits or empty:
        raise DataError(
            f"no usable images in the split(s) {empty or ['train']}: every input was skipped; "
            f"the reasons are in {storage.join(out.url, mf.REPORT)}"
        )
    _write_if_changed(out, mf.MANIFEST, manifest.to_json())


def _write_if_changed(out: _Dest, rel: str, data: bytes) -> None:
    try:
        if storage.read_bytes(storage.join(out.url, rel)) == data:
            return
    except FileNotFoundError:
        pass
    if rel == mf.MANIFEST:
        storage.write_bytes(storage.join(out.url, rel), data)
    else:
        out.write(rel, data)


def build_report(source_id: str, listing: Listing, states: dict[str, list[ChunkState]]) -> dict:
    skipped = [
        {"split": split, "path": path, "reason": reason} for split, path, reason in listing.ignored
    ]
    converted = []
    counts = {}
    for split, chunk_states in states.items():
        ignored = sum(1 for s, _, _ in listing.ignored if s == split)
        for s in chunk_states:
            skipped += [{"split": split, "path": p, "reason": r} for p, r in s.skipped]
            converted += [{"split": split, "path": p, "change": c} for p, c in s.converted]
        counts[split] = {
            "inputs": sum(s.inputs for s in chunk_states) + ignored,
            "samples": sum(s.shard.num_samples for s in chunk_states if s.shard),
            "skipped": sum(len(s.skipped) for s in chunk_states) + ignored,
            "converted": sum(len(s.converted) for s in chunk_states),
            "stored_unchanged": sum(s.unchanged for s in chunk_states),
        }
    return {
        "format": REPORT_FORMAT,
        "source": source_id,
        "counts": counts,
        "skipped": sorted(skipped, key=lambda e: (e["split"], e["path"])),
        "converted": sorted(converted, key=lambda e: (e["split"], e["path"])),
    }


def prep_demo(dest: str, opts: Options, dataset: str = "shapes") -> mf.Manifest:
    """A bundled demo dataset (pirl.data.demo: generated shapes, or scikit-learn's digits) as
    shards at `dest`."""
    from pirl.data.demo import write_demo_folder

    with tempfile.TemporaryDirectory(prefix="pirl-demo-") as tmp:
        write_demo_folder(dataset, tmp, size=DEMO_IMAGE_SIZE)
        return prep(tmp, dest, opts, source_label=f"demo: {dataset} at {DEMO_IMAGE_SIZE} px")


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pirl prep",
        usage="pirl prep [options] SOURCE DEST\n       pirl prep --demo [options] DEST",
        description="Turn an ImageFolder tree or a list file (any fsspec URL) into tar shards "
        "and a manifest (any fsspec URL). `pirl prep --demo DEST` writes the bundled demo set.",
    )
    p.add_argument("paths", nargs="*", metavar="SOURCE DEST", help="SOURCE and DEST URLs or paths")
    p.add_argument("--demo", action="store_true", help="write a demo dataset to DEST")
    p.add_argument(
        "--demo-dataset",
        choices=("shapes", "digits"),
        default="shapes",
        help="which demo dataset --demo writes (default: shapes)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help=f"inputs per shard (default {DEFAULT_SHARD_SIZE}; {DEMO_SHARD_SIZE} with --demo)",
    )
    p.add_argument(
        "--resize",
        type=int,
        default=None,
        metavar="S",
        help="shrink images so the shorter side is at most S px (default: keep the size)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="decoding processes (default: the number of CPUs)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="move this fraction of each class to a val split (sources without val/ only)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the samples' order in the shards and of the --val-fraction draw",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"skip images with more pixels than this (decompression bombs; default {MAX_PIXELS})",
    )
    args = p.parse_args(argv)
    want = 1 if args.demo else 2
    if len(args.paths) != want:
        p.error("expected --demo DEST" if args.demo else "expected SOURCE DEST")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="pirl prep: %(message)s")
    opts = Options(
        shard_size=args.shard_size or (DEMO_SHARD_SIZE if args.demo else DEFAULT_SHARD_SIZE),
        resize=args.resize,
        workers=args.workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_pixels=args.max_pixels,
    )
    try:
        if args.demo:
            dest = args.paths[0]
            manifest = prep_demo(dest, opts, args.demo_dataset)
        else:
            _, dest = args.paths
            manifest = prep(args.paths[0], dest, opts)
    except PirlError as exc:
        print(redact(f"pirl prep: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    parts = [
        f"{name} {split.num_samples} samples in {len(split.shards)} shard(s)"
        for name, split in manifest.splits.items()
    ]
    print(f"pirl prep: {redact(dest)}: {', '.join(parts)}; report in {mf.REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
