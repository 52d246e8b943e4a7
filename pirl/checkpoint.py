"""Checkpoints through fsspec: written whole, published by a sidecar written last, verified on load.

Layout under CHECKPOINT.DIR:
    checkpoints/checkpoint-0000001234.pt     torch.save of a dict of tensors and plain values
    checkpoints/checkpoint-0000001234.json   {size, sha256, epoch, step_in_epoch, global_step}
A checkpoint exists only once its .json is there (object stores have no rename, so the small
sidecar is the publish step). Loading takes the newest one whose bytes match its sidecar and
that `torch.load(weights_only=True)` accepts; a corrupt or partial one is skipped with a warning.
A store that stops answering (StorageUnavailable) is never taken for a missing checkpoint: it
propagates, so a restart tries again instead of resuming from an older one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time

import torch

from pirl import lease, storage

log = logging.getLogger("pirl")
PREFIX = "checkpoint-"


def _dir(root: str) -> str:
    return storage.join(root, "checkpoints")


def save(
    root: str, state: dict, *, epoch: int, step_in_epoch: int, global_step: int, keep_last: int
) -> str:
    lease.check(root)  # another writer took the folder over: publish nothing more
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    name = f"{PREFIX}{global_step:010d}"
    url = storage.join(_dir(root), name + ".pt")
    storage.write_bytes(url, data)
    meta = {
        "file": name + ".pt",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "time": time.time(),
    }
    storage.write_bytes(
        storage.join(_dir(root), name + ".json"), json.dumps(meta, indent=1).encode()
    )
    prune(root, keep_last)
    return url


def complete(root: str) -> list[dict]:
    """Sidecars of the published checkpoints, oldest first. A sidecar that is malformed or names
    anything but its sibling `checkpoint-<step>.pt` is ignored with a warning: retention deletes
    what sidecars name, so one written by someone else must never point it elsewhere."""
    out = []
    for name in storage.list_names(_dir(root)):
        if name.startswith(PREFIX) and name.endswith(".json"):
            try:
                meta = json.loads(storage.read_bytes(storage.join(_dir(root), name)))
            except storage.StorageUnavailable:
                raise  # the store is down: resuming from an older checkpoint would lose work
            except (ValueError, FileNotFoundError, storage.StorageError) as exc:
                log.warning("ignoring unreadable checkpoint sidecar %s: %s", name, exc)
                continue
            problem = sidecar_problem(name, meta)
            if problem:
                log.warning("ignoring checkpoint sidecar %s: %s", name, problem)
            else:
                out.append(meta)
    return sorted(out, key=lambda m: m["global_step"])


def sidecar_problem(name: str, meta) -> str | None:
    """Why the sidecar `name` with content `meta` cannot be trusted, or None when it can."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    for key, kind in (("global_step", int), ("size", int), ("sha256", str), ("file", str)):
        if type(meta.get(key)) is not kind:
            return f"{key!r} is {meta.get(key)!r}, expected a {kind.__name__}"
    expected = f"{PREFIX}{meta['global_step']:010d}"
    if name != expected + ".json" or meta["file"] != expected + ".pt":
        return (
            f"{name} names {meta['file']!r} at global step {meta['global_step']}: a sidecar may "
            f"only name its sibling {name[: -len('.json')]}.pt; it is never deleted nor loaded"
        )
    return None


def prune(root: str, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; delete older ones (sidecar first, so a half-deleted
    one is never taken as complete) and data files left without a sidecar by a crash."""
    metas = complete(root)
    for meta in metas[:-keep_last]:
        storage.remove(storage.join(_dir(root), meta["file"].replace(".pt", ".json")))
        storage.remove(storage.join(_dir(root), meta["file"]))
    if metas:
        published = {m["file"] for m in metas}
        newest = metas[-1]["file"]
        for name in storage.list_names(_dir(root)):
            if name.startswith(PREFIX) and (
                (name.endswith(".pt") and name not in published and name < newest)
                # a local write killed mid-way (only this process writes checkpoints)
                or ".tmp-" in name
            ):
                storage.remove(storage.join(_dir(root), name))


def unpublish_newer(root: str, global_step: int) -> list[str]:
    """Delete the checkpoints newer than `global_step` (sidecar first). A resumed run calls it
    before its first save: a newer checkpoint it did not resume from failed verification, and
    left published it would count against KEEP_LAST and push out the good ones."""
    removed = []
    for meta in complete(root):
        if meta["global_step"] > global_step:
            storage.remove(storage.join(_dir(root), meta["file"].replace(".pt", ".json")))
            storage.remove(storage.join(_dir(root), meta["file"]))
            removed.append(meta["file"])
    return removed


def load_latest(root: str, map_location: str | torch.device = "cpu") -> tuple[dict, dict] | None:
    """(state, sidecar) of the newest checkpoint that verifies, or None if there is none."""
    for meta in reversed(complete(root)):
        url = storage.join(_dir(root), meta["file"])
        try:
            data = storage.read_bytes(url, size_hint=meta["size"])
        except storage.StorageUnavailable:
            raise  # transient: fail (retryable) rather than fall back and lose work
        except (FileNotFoundError, storage.StorageError) as exc:
            log.warning(
                "checkpoint %s is unreadable (%s); falling back to the previous one", url, exc
            )
            continue
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            log.warning(
                "checkpoint %s does not match its checksum (corrupt or partial); falling back to the previous one",
                url,
            )
            continue
        try:
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as exc:  # weights_only refuses anything but tensors and plain values
            from pirl.weights import _unpickler_detail, is_refused_pickle, refusal

            why = (
                refusal(exc) if is_refused_pickle(exc) else f"unreadable: {_unpickler_detail(exc)}"
            )
            log.warning(
                "checkpoint %s cannot be loaded safely (%s); falling back to the previous one",
                url,
                why,
            )
            continue
        return state, meta
    return None
