"""Errors the CLI turns into one clear line and an exit code.

Exit codes follow the PyTorchJob `restartPolicy: ExitCode` contract: 1-127 are permanent (the
operator marks the job Failed), 128-255 are retryable (the operator recreates the pod, and the
trainer auto-resumes from its newest complete checkpoint).
"""

from __future__ import annotations

EXIT_CONFIG = 2  # bad config or command line
EXIT_DATA = 3  # missing, empty or unreadable dataset
EXIT_DIVERGED = 4  # non-finite loss
EXIT_STORAGE = 5  # output location unusable (permission, bucket missing, credentials)
EXIT_RETRYABLE = 129  # transient: a lost peer, a collective timeout, a store that stopped answering
EXIT_TERMINATED = 143  # SIGTERM received (128 + 15): the pod is being moved; resume later


class PirlError(Exception):
    """Base class: an error with a message meant for the user and an exit code."""

    exit_code = 1


class ConfigError(PirlError):
    exit_code = EXIT_CONFIG


class DataError(PirlError):
    exit_code = EXIT_DATA


class DivergedError(PirlError):
    exit_code = EXIT_DIVERGED


class StorageError(PirlError):
    exit_code = EXIT_STORAGE


class StorageUnavailable(StorageError):
    """The store kept failing with transient errors (connection lost, timeout, HTTP 500/503)
    until the retries ran out: retryable, unlike the other storage errors (a restarted job
    resumes from its newest checkpoint once the store answers again)."""

    exit_code = EXIT_RETRYABLE


class Interrupted(PirlError):
    """SIGTERM arrived while the process waited on the store: the call was abandoned (nothing is
    half-published: an object store write appears whole or not at all, and a checkpoint counts
    only once its sidecar, written last, exists)."""

    exit_code = EXIT_TERMINATED


class RetryableError(PirlError):
    exit_code = EXIT_RETRYABLE
