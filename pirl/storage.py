"""fsspec I/O: paths or URLs (file://, s3://, gs://, memory://), whole-object writes, retried reads.

S3-compatible stores (MinIO, Ceph, SeaweedFS) are reached with the standard AWS variables,
including AWS_ENDPOINT_URL; credentials are read by the backends from their usual places and
never pass through this module's messages.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid

import fsspec
from fsspec.core import url_to_fs

from pirl.errors import Interrupted, StorageError, StorageUnavailable
from pirl.redaction import redact, remember_url

log = logging.getLogger("pirl")

# One storage call (a read, a write, a listing) is tried at most RETRY_ATTEMPTS times, sleeping
# RETRY_FIRST_DELAY seconds and twice as long after each failure, and no new try starts once
# RETRY_MAX_SECONDS have passed. Each try is cut after CALL_TIMEOUT_SECONDS plus the time its
# bytes take at MIN_BYTES_PER_SECOND (a stalled store otherwise blocks a write forever: the
# backends' read timeouts do not cover uploads), so a call ends, done or StorageUnavailable,
# within RETRY_MAX_SECONDS + one try's timeout. Underneath each try, botocore retries each request
# (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS) with s3fs's connect/read timeouts (5 s / 15 s); the layers
# and the worst case are in docs/failure-handling.md.
RETRY_ATTEMPTS = 5
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_SECONDS = 60.0
CALL_TIMEOUT_SECONDS = 30.0
MIN_BYTES_PER_SECOND = 8 << 20
GCS_REQUEST_TIMEOUT = 15.0  # gcsfs's per-request timeout (its default waits 5 minutes)
S3FS_RETRIES: int | None = 1  # s3fs's tries per call (None: s3fs's default, 5)
POLL_SECONDS = 0.1  # how often a waiting call looks at its deadline and at `interrupt()`

_interrupted = threading.Event()


class CallTimeout(TimeoutError):
    """One try of a store call got no answer in time (transient: retried)."""


def interrupt() -> None:
    """Make the store calls under way, and every later one in this process, raise Interrupted
    at once (the trainer calls it on SIGTERM while it writes a checkpoint)."""
    _interrupted.set()


def is_interrupted() -> bool:
    return _interrupted.is_set()


def clear_interrupt() -> None:
    """Let store calls run again (a caller that handled the interrupt and goes on in-process)."""
    _interrupted.clear()


def call_timeout(nbytes: int = 0) -> float:
    """Seconds one try of a call moving `nbytes` may take."""
    return CALL_TIMEOUT_SECONDS + max(0, nbytes) / MIN_BYTES_PER_SECOND


def call_with_deadline(fn, timeout: float, what: str = "a store call"):
    """fn() on a helper thread, waited for at most `timeout` seconds (CallTimeout), or until
    `interrupt()` (Interrupted). A call given up on is abandoned: its thread ends with the process,
    and an object it was uploading is either written whole later or never (PUTs are atomic)."""
    if _interrupted.is_set():
        raise Interrupted(f"{what}: stopped, SIGTERM received")
    result: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="pirl-store-call", daemon=True).start()
    end = time.monotonic() + timeout
    while not done.wait(min(POLL_SECONDS, max(0.0, end - time.monotonic()))):
        if _interrupted.is_set():
            raise Interrupted(f"{what}: stopped, SIGTERM received")
        if time.monotonic() >= end:
            raise CallTimeout(f"no answer within {timeout:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


# errno values of failures worth retrying. s3fs maps HTTP 500 to EREMOTEIO, 503 / SlowDown and
# 409 to EBUSY, unknown error codes (502, 504) to EIO.
TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EBUSY,
    getattr(errno, "EREMOTEIO", errno.EIO),
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
}
# Network failures that the backends raise as their own types rather than OSError
# (botocore's EndpointConnectionError, ReadTimeoutError, ...; aiohttp's ClientPayloadError, ...).
TRANSIENT_TYPE_NAMES = {
    "HTTPClientError",
    "ConnectionError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "ClientConnectionError",
    "ClientPayloadError",
    "ServerTimeoutError",
    "FSTimeoutError",
    "IncompleteRead",
    "ResponseParserError",
}
BACKEND_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "fsspec")


def is_transient(exc: BaseException) -> bool:
    """Whether trying again may succeed: a lost connection, a timeout, HTTP 500/503 - not a
    missing object, a denied permission, a full disk or a malformed request."""
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno is None or exc.errno in TRANSIENT_ERRNOS
    return any(c.__name__ in TRANSIENT_TYPE_NAMES for c in type(exc).__mro__)


def _from_backend(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in BACKEND_MODULES


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    remember_url(url)
    options = (
        {"requests_timeout": GCS_REQUEST_TIMEOUT} if url.startswith(("gs://", "gcs://")) else {}
    )
    try:
        fs, path = url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise StorageError(redact(f"cannot open {url!r}: {exc}")) from None
    if "s3" in fs.protocol and S3FS_RETRIES is not None:
        # s3fs's own loop (5 tries per call, a class attribute) would multiply botocore's tries
        # and ours: 125 requests and minutes for one read of a dead store. `retry` covers the
        # same errors with a time bound.
        fs.retries = S3FS_RETRIES
    return fs, path


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def retry(
    what: str,
    fn,
    *,
    attempts: int | None = None,
    first_delay: float | None = None,
    max_total: float | None = None,
    nbytes: int = 0,
):
    """Call fn(); retry transient errors with exponential backoff, bounded in count and time.
    Each try is cut after `call_timeout(nbytes)`, and none runs past the call's deadline
    (`max_total` + one try's timeout from the start).

    FileNotFoundError is raised as it is. Transient errors that outlast the retries raise
    StorageUnavailable (retryable exit code); every other failure of the storage backend
    (permission, full disk, missing bucket on write, bad request, no credentials) raises
    StorageError (permanent) at once. The message names `what` (the URL), never credentials."""
    what = redact(what)
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    delay = RETRY_FIRST_DELAY if first_delay is None else first_delay
    max_total = RETRY_MAX_SECONDS if max_total is None else max_total
    start = time.monotonic()
    per_try = call_timeout(nbytes)
    deadline = start + max_total + per_try
    for attempt in range(1, attempts + 1):
        try:
            return call_with_deadline(fn, min(per_try, deadline - time.monotonic()), what)
        except (FileNotFoundError, Interrupted):
            raise
        except PermissionError as exc:
            raise StorageError(f"{what}: permission denied ({exc})") from None
        except Exception as exc:
            if not is_transient(exc):
                if isinstance(exc, OSError) or _from_backend(exc):
                    raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from None
                raise
            elapsed = time.monotonic() - start
            if attempt == attempts or elapsed + delay > max_total:
                raise StorageUnavailable(
                    f"{what}: the store kept failing, {attempt} attempt(s) in {elapsed:.1f} s: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            log.warning(
                "%s: %s: %s; retry %d/%d in %g s",
                what,
                type(exc).__name__,
                exc,
                attempt,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
            delay *= 2


def read_bytes(url: str, size_hint: int = 0) -> bytes:
    """The whole object; `size_hint` (its expected size, when known) lengthens each try's time
    bound for big objects."""
    fs, path = fs_and_path(url)
    return retry(f"reading {url}", lambda: fs.cat_file(path), nbytes=size_hint)


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object. Local files go through a temporary name and an atomic rename; an
    object store PUT is already all-or-nothing (the object appears only when complete)."""
    fs, path = fs_and_path(url)
    try:
        if is_local(url):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                # a full disk or a signal mid-write: leave neither the object nor a partial file
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            retry(f"writing {url}", lambda: fs.pipe_file(path, data), nbytes=len(data))
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(redact(f"writing {url}: {exc}")) from None


def create_exclusive(url: str, data: bytes) -> bool:
    """Write a small object only if none exists at `url`: True when this call created it, False
    when one was there. Atomic locally (a hard link) and on S3 (If-None-Match); a check then a
    write on stores without a conditional create."""
    fs, path = fs_and_path(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(redact(f"writing {url}: {exc}")) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def create() -> bool:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False

    return bool(retry(f"writing {url}", create))


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
    except StorageError as exc:  # StorageUnavailable stays retryable
        raise type(exc)(redact(f"the output location {url!r} is not writable: {exc}")) from None
    except Exception as exc:  # backends raise their own types for missing buckets / bad credentials
        raise StorageError(
            redact(f"the output location {url!r} is not writable: {type(exc).__name__}: {exc}")
        ) from None
