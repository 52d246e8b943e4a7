"""One writer per output: a lease object in the output location (the trainer's CHECKPOINT.DIR,
prep's DEST) that names its holder and expires unless renewed.

    <root>/.pirl-lease.json   {"owner", "command", "host", "boot", "pid", "start", "expires", ...}

It is created with a conditional create (an atomic link locally, `If-None-Match: *` on S3; a
check-then-write elsewhere), renewed every LEASE_SECONDS / 4 by a thread, and deleted when the
command ends. Another writer is refused with a permanent error naming the holder. A lease that
expired, or whose holder process is gone (same host and boot: its pid no longer runs), is taken
over; one left by a pod recreated on another node (same host name, other boot) is waited for
until it expires. `check(root)` (called before a checkpoint or manifest is published) fails if
this process lost the lease to another writer.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from pirl import storage
from pirl.errors import StorageError

log = logging.getLogger("pirl")

NAME = ".pirl-lease.json"
LEASE_SECONDS = 120.0  # a crashed holder's lease blocks its output at most this long
RELEASE_SECONDS = 5.0
_held: dict[str, Lease] = {}  # root -> the lease this process holds on it


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Lease:
    def __init__(self, root: str, command: str):
        self.root, self.command = root, command
        self.url = storage.join(root, NAME)
        self.owner = uuid.uuid4().hex
        self.lost_to: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "command": self.command,
                "host": socket.gethostname(),
                "boot": _boot_id(),
                "pid": os.getpid(),
                "start": _start_ticks(os.getpid()),
                "renewed": now,
                "expires": now + LEASE_SECONDS,
            }
        ).encode()

    def read_holder(self) -> dict | None:
        try:
            holder = json.loads(storage.read_bytes(self.url))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # damaged: treated as expired
        return holder if isinstance(holder, dict) else {}

    def renew(self) -> None:
        holder = self.read_holder()
        if holder is not None and holder.get("owner") != self.owner:
            self.lost_to = holder
            return
        storage.write_bytes(self.url, self.body())

    def _renew_forever(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            try:
                self.renew()
            except Exception as exc:  # the store may come back before the lease expires
                log.warning("could not renew the lease %s: %s", self.url, exc)
            if self.lost_to is not None:
                return

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_forever, name="pirl-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Delete the lease if it is still ours; bounded by RELEASE_SECONDS, so that a command
        failing on a dead store still exits promptly (the lease then expires by itself)."""
        self._stop.set()
        _held.pop(self.root, None)
        if storage.is_interrupted():
            return  # SIGTERM abandoned the store calls: exit now, the lease expires by itself

        def delete_if_ours() -> None:
            holder = self.read_holder()
            if holder is not None and holder.get("owner") == self.owner:
                storage.remove(self.url)

        try:
            storage.call_with_deadline(delete_if_ours, RELEASE_SECONDS, f"releasing {self.url}")
        except Exception as exc:
            log.warning("could not delete the lease %s (it expires by itself): %s", self.url, exc)


def describe(holder: dict) -> str:
    expires = holder.get("expires")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        if isinstance(expires, (int, float))
        else "?"
    )
    return (
        f"{holder.get('command', '?')} on host {holder.get('host', '?')}, pid "
        f"{holder.get('pid', '?')}, lease expiring at {when} unless renewed"
    )


def _stale(holder: dict, now: float) -> bool:
    """The lease's holder is gone: it expired, or it ran on this very host and boot and its
    process is no longer running."""
    expires = holder.get("expires")
    if not isinstance(expires, (int, float)) or expires < now:
        return True
    same_machine = holder.get("host") == socket.gethostname() and holder.get("boot") == _boot_id()
    pid = holder.get("pid")
    if same_machine and isinstance(pid, int) and holder.get("start") is not None:
        return _start_ticks(pid) != holder.get("start")
    return False


def _wait_for_expiry(holder: dict) -> bool:
    """Same host name, another boot: most likely this job's own pod, recreated on another node
    after a crash. Its lease cannot be renewed any more, so it expires within LEASE_SECONDS."""
    return holder.get("host") == socket.gethostname() and holder.get("boot") != _boot_id()


def acquire(root: str, command: str, what: str = "output location") -> Lease:
    """Take the lease on `root` for this process (renewed until `release()`), or raise
    StorageError naming the writer that holds it."""
    lease = Lease(root, command)
    deadline = time.time() + LEASE_SECONDS + 5
    while True:
        if storage.create_exclusive(lease.url, lease.body()):
            break
        holder = lease.read_holder()
        if holder is None:
            continue  # released in between
        if holder.get("owner") == lease.owner:
            break  # our own create, retried after an answer was lost
        if _stale(holder, time.time()):
            log.warning("%s: taking over the stale lease of %s", root, describe(holder))
            storage.remove(lease.url)
            continue
        if _wait_for_expiry(holder) and time.time() < deadline:
            log.warning("%s: waiting for the lease of %s", root, describe(holder))
            time.sleep(min(5.0, max(0.1, holder["expires"] - time.time())))
            continue
        raise StorageError(
            f"the {what} {root!r} is in use by another writer: {describe(holder)}. Wait for it "
            f"to finish or use another location; if that run is gone, delete {lease.url} (a "
            f"crashed writer's lease also expires by itself within {LEASE_SECONDS:.0f} s)"
        )
    lease.start_renewing()
    _held[root] = lease
    return lease


def check(root: str) -> None:
    """Raise StorageError if this process held the lease on `root` and another writer took it
    (e.g. this process stalled past its expiry); nothing when no lease was taken on `root`."""
    lease = _held.get(root)
    if lease is None:
        return
    if lease.lost_to is None:
        lease.renew()
    if lease.lost_to is not None:
        raise StorageError(
            f"lost the lease on {root!r} to another writer ({describe(lease.lost_to)}): "
            "stopped before publishing anything more"
        )
