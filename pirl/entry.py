"""The shell every command runs in (`pirl train`, `pirl benchmark`, `pirl extract`): logging and
the process group up, the command's body, the process group down, and one exit code per way
of failing.

- a `PirlError` -> its message on one line, its own exit code (permanent 1-127, retryable 128+);
- a lost peer (a collective whose other side died or stalled) -> 129, retryable;
- SIGTERM -> 143: the pod is being moved; a restarted job resumes from its newest checkpoint.
Anything else is a bug here: it propagates with its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.distributed as tdist

from pirl import dist
from pirl.errors import EXIT_RETRYABLE, EXIT_TERMINATED, PirlError
from pirl.redaction import redact


class Terminated(Exception):
    """SIGTERM arrived: the command stopped without writing anything more."""


# Gloo reports a lost or stalled peer as a plain RuntimeError: raised by a collective of torch's
# distributed code (e.g. "Application timeout caused pair closure" from DDP's buffer broadcast),
# or, from DDP's gradient hooks inside backward, with the gloo source location that failed
# first, e.g. "[.../gloo/transport/tcp/pair.cc:545] Read error".
GLOO_ERROR = re.compile(r"^\[[^\]]*/gloo/[^\]]*\]")
C10D = f"{os.sep}torch{os.sep}distributed{os.sep}"  # the collectives, the store, DDP's utils
DDP = f"{os.sep}torch{os.sep}nn{os.sep}parallel{os.sep}distributed.py"
DDP_COLLECTIVES = {"_distributed_broadcast_coalesced"}  # its buffer broadcast before a forward


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank died or stalled (retryable), not a bug here:
    torch's distributed error types (NCCL, the store, the network), or gloo's RuntimeErrors
    (raised by torch's distributed code, or located in gloo). Never by the words of a message."""
    if isinstance(exc, tdist.DistError):
        return True
    if type(exc) is not RuntimeError:
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]  # the Python frame that called into the C++ collective
        if C10D in last.filename or (last.filename.endswith(DDP) and last.name in DDP_COLLECTIVES):
            return True
    return bool(GLOO_ERROR.match(str(exc)))


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        stream=sys.stdout,
        force=True,
    )


def start(device: str, timeout_seconds: int = 1800, backend: str = "nccl") -> dist.DistEnv:
    """Join the process group (if launched with several ranks) and log as this rank."""
    env = dist.init(device, timeout_seconds, backend)
    setup_logging(env.rank)
    return env


def _raise_terminated(*_) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated (commands that must finish a step first install their own
    handler inside); the previous handler comes back after, for callers in the same process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a command's `body` (which calls `start` once it knows its device) and turn how it
    ended into the exit code; the process group is torn down on every path."""
    try:
        with sigterm_raises():
            return body()
    except PirlError as exc:
        print(redact(f"{prog}: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print(
            f"{prog}: SIGTERM received; stopped without writing (a rerun resumes)", file=sys.stderr
        )
        return EXIT_TERMINATED
    except Exception as exc:
        if dist.get_world_size() == 1 or not is_peer_failure(exc):
            raise
        print(redact(f"{prog}: lost a peer or timed out in a collective: {exc}"), file=sys.stderr)
        return EXIT_RETRYABLE
    finally:
        dist.cleanup()
