"""`python -m pipeline.torchrun [torchrun args]`: torchrun that exits with its worker's exit code.

Plain torchrun exits 1 whatever happened to its workers: a trainer that exits 129 (a lost peer,
retryable) or 143 (SIGTERM), and torchrun itself killed by SIGTERM, all become exit code 1. Under a
PyTorchJob's `restartPolicy: ExitCode` code 1 is permanent, so a recoverable failure would fail
the whole job. This wrapper runs torchrun unchanged (same flags, same PET_* environment) and maps:
- a failed worker -> that worker's exit code (the first failure; killed by signal N -> 128 + N);
- torchrun stopped by signal N (SIGTERM on pod eviction) -> 128 + N.
"""

from __future__ import annotations

import sys


def exit_code_of(code: int) -> int:
    """A process exit status as a container reports it: signal N -> 128 + N, never 0 on failure."""
    if code < 0:
        return 128 - code
    return code or 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main as torchrun

    from pirl.errors import EXIT_RETRYABLE

    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = exit_code_of(failure.exitcode)
        print(f"pipeline.torchrun: rank {rank} failed first, exit code {code}", file=sys.stderr)
        return code
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except (RendezvousError, DistError) as exc:
        # A peer pod never came up or the store went away: retryable, the operator recreates
        # the pod and the job resumes (torchrun itself would exit 1, a permanent failure).
        print(f"pipeline.torchrun: rendezvous failed, retryable: {exc}", file=sys.stderr)
        return EXIT_RETRYABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
