"""The shell every command runs in (pirl.entry): exit codes per way of failing, peers lost by
exception type, and the process group's backend as configured."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as tdist

from pirl import dist
from pirl.entry import is_peer_failure, run_main
from pirl.errors import EXIT_TERMINATED, DataError


@pytest.mark.parametrize(
    "exc",
    [
        tdist.DistNetworkError("Connection reset by peer"),
        tdist.DistStoreError("wait timeout after 30000ms"),
        tdist.DistBackendError("NCCL watchdog: collective operation timeout"),
        RuntimeError(
            "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
            "[127.0.0.1]:411: Connection reset by peer"
        ),
    ],
)
def test_torchs_distributed_errors_and_gloos_are_peer_failures(exc):
    assert is_peer_failure(exc)


def raised_in(filename: str, function: str, exc: Exception) -> Exception:
    """`exc` as raised by `function` of a module at `filename`."""
    code = compile(f"def {function}():\n    raise exc\n", filename, "exec")
    namespace = {"exc": exc}
    exec(code, namespace)
    try:
        namespace[function]()
    except Exception as raised:
        return raised
    raise AssertionError("not raised")


def test_a_runtime_error_raised_by_a_collective_is_a_peer_failure():
    torch_dir = f"{os.sep}venv{os.sep}torch{os.sep}"
    c10d = f"{torch_dir}distributed{os.sep}distributed_c10d.py"
    ddp = f"{torch_dir}nn{os.sep}parallel{os.sep}distributed.py"

    def pair_closure() -> RuntimeError:
        return RuntimeError("Application timeout caused pair closure")

    assert is_peer_failure(raised_in(c10d, "all_reduce", pair_closure()))
    assert is_peer_failure(raised_in(ddp, "_distributed_broadcast_coalesced", pair_closure()))
    # DDP's own checks (a model bug, e.g. unused parameters) are not a lost peer
    unused = RuntimeError("Expected to have finished reduction in the prior iteration")
    assert not is_peer_failure(raised_in(ddp, "_pre_forward", unused))
    assert not is_peer_failure(raised_in("/repo/pirl/loss.py", "forward", pair_closure()))
    assert not is_peer_failure(raised_in(c10d, "all_reduce", ValueError("a bad argument")))


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("connection timeout while reading the peer's gloo config"),  # words only
        ValueError("[/gloo/x.cc:1] not a RuntimeError"),
        TimeoutError("timed out"),
        ConnectionResetError("Connection reset by peer"),
    ],
)
def test_other_errors_are_not_peer_failures_whatever_they_say(exc):
    assert not is_peer_failure(exc)


def test_a_pirl_error_becomes_its_exit_code_and_one_line(capsys):
    def body() -> int:
        raise DataError("no images in /data/train")

    assert run_main("pirl x", body) == DataError.exit_code
    assert capsys.readouterr().err == "pirl x: error: no images in /data/train\n"


def test_sigterm_stops_a_command_with_143_and_restores_the_handler(capsys):
    before = signal.getsignal(signal.SIGTERM)

    def body() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
        return 0

    assert run_main("pirl x", body) == EXIT_TERMINATED
    assert "pirl x: SIGTERM received" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_unexpected_error_in_one_process_is_a_bug_and_propagates():
    def body() -> int:
        raise RuntimeError("[/x/gloo/transport/tcp/pair.cc:1] Connection closed by peer")

    with pytest.raises(RuntimeError):  # one process has no peer to lose
        run_main("pirl x", body)


def test_the_configured_backend_is_honoured():
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert dist.pick_backend("gloo", gpu) == "gloo"  # was NCCL whatever the config said
    assert dist.pick_backend("nccl", gpu) == "nccl"
    assert dist.pick_backend("nccl", cpu) == "gloo"  # NCCL needs CUDA
    assert dist.init("cpu", backend="gloo").backend == "gloo"


def test_pirl_benchmark_maps_sigterm_to_143(tmp_path, monkeypatch, capsys):
    """The benchmark runs in the same shell as training (it had no SIGTERM handling)."""
    from pirl.benchmark import main, run

    def terminated(*args) -> dict:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return {}

    monkeypatch.setattr(run, "benchmark", terminated)
    demo = "config=benchmark/linear_image_classification/demo/eval_resnet18_demo_linear"
    assert main([demo, f"config.OUTPUT_DIR={tmp_path}"]) == EXIT_TERMINATED
    assert "pirl benchmark: SIGTERM received" in capsys.readouterr().err
