"""Load: a run of many short epochs (checkpoint every epoch, KEEP_LAST 2) hit by a fault every few
steps, drawn by a seeded RNG (SIGKILL of a rank, SIGKILL of the pod, SIGTERM of the pod), and
restarted after each - as the Training Operator does - until it completes. At the end the count
of completed steps is the requested one, the result is bit-identical to an uninterrupted run, and
checkpoints/ holds exactly KEEP_LAST complete checkpoints and nothing else.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from pirl import checkpoint, storage

from .fault_jobs import (
    EPOCHS,
    assert_same_result,
    final_state,
    one_pod,
    record,
    resumed_step,
    straight_run,
)

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("PIRL_LOAD_SEED", "180"))  # SIGKILL rank 0, SIGKILL pod, SIGTERM pod
MAX_FAULTS = int(os.environ.get("PIRL_LOAD_FAULTS", "3"))  # CI size; raise it for a longer soak
MAX_STARTS = MAX_FAULTS + 7  # bounded: MAX_FAULTS faults, a few starts that make no progress
FAULTS = ("SIGKILL rank 0", "SIGKILL rank 1", "SIGKILL pod", "SIGTERM pod")


def test_random_faults_every_few_steps_until_done(tmp_path, tmp_path_factory, digits_folder):
    straight = straight_run(tmp_path_factory, digits_folder)
    total = 2 * EPOCHS
    rng = random.Random(SEED)
    out, logs = tmp_path / "out", tmp_path / "logs"
    faults, codes, starts = [], [], 0
    t_start = time.monotonic()
    job = None
    try:
        while True:
            starts += 1
            assert starts <= MAX_STARTS, f"not done after {MAX_STARTS} starts: {faults}"
            job = one_pod(str(out), digits_folder, logs)
            if faults:  # the previous fault is over once the restarted job is back where it was
                job.wait_for_step(faults[-1]["step"])
                faults[-1]["recover_s"] = time.monotonic() - faults[-1]["t"]
                faults[-1]["resumed"] = resumed_step(job.pods[0].text()) or 0
            done = max(job.global_step(), faults[-1]["resumed"] if faults else 0)
            at = done + rng.randint(2, 5)
            if len(faults) == MAX_FAULTS or at >= total:
                codes.append(job.wait(300)[0])
                assert codes[-1] == 0, job.text()
                break
            kind = rng.choice(FAULTS)
            job.wait_for_step(at)
            t = time.monotonic()
            if kind.startswith("SIGKILL rank"):
                pid = job.pods[0].ranks()[int(kind[-1])]
                os.kill(pid, signal.SIGKILL)
            elif kind == "SIGKILL pod":
                job.pods[0].kill()
            else:
                job.pods[0].signal(signal.SIGTERM)
            code = job.wait(120)[0]
            codes.append(code)
            assert 128 <= code <= 255, f"{kind}: exit {code} is not retryable\n{job.text()}"
            faults.append({"kind": kind, "step": job.global_step(), "t": t, "code": code})
    finally:  # a failed assertion must not leave a job running
        if job is not None:
            job.kill()
    took = time.monotonic() - t_start
    print(f"faults: {faults}, starts {starts}, codes {codes}")

    # the requested work, once: step records 1..total, each exactly once
    _, meta = final_state(str(out))
    assert (meta["epoch"], meta["global_step"]) == (EPOCHS, total)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = sorted(r["global_step"] for r in records if "loss" in r)
    assert steps == list(range(1, total + 1)), steps
    assert_same_result(str(straight), str(out))
    # retention: exactly KEEP_LAST complete checkpoints, no orphan data or temporary files
    names = storage.list_names(str(out / "checkpoints"))
    last = [total - 2, total]
    assert names == [f"checkpoint-{s:010d}.{x}" for s in last for x in ("json", "pt")], names
    assert [m["global_step"] for m in checkpoint.complete(str(out))] == last
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    lost = sum(f["step"] - f["resumed"] for f in faults)
    for f in faults:
        record(
            f"load: {f['kind']} at step {f['step']}",
            f"exit {f['code']}; resumed from step {f['resumed']}",
            f["recover_s"],
            f["step"] - f["resumed"],
        )
    print(f"{len(faults)} faults, {starts} starts, {lost} steps redone, {took:.0f} s: {codes}")
