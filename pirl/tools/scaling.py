"""Scaling model: predict images/s on N nodes x G GPUs from one rank's measured step and the
measured speed of the collectives a step runs.

    python -m pirl.tools.scaling --step-seconds 0.30 --batch 32 [--bandwidth-gbs 25 --latency-us 30]
    python -m pirl.tools.scaling --measure     # measure gloo all-reduce bandwidth here
    python -m pirl.tools.scaling --validate    # predict 2 local ranks from 1, then measure 2 ranks

Per step every rank runs its forward/backward (t_compute, measured by `pirl throughput`), then
  - a ring all-reduce of the gradients: 2 (W-1)/W x P bytes / bandwidth + 2 (W-1) x latency
    (DDP overlaps it with the backward; the model charges only what exceeds `overlap` x backward),
  - an all-gather of the (embedding, index) pairs for the memory bank: (W-1) x B x (4D + 8) bytes.
images/s = W x B / t_step; an epoch of ImageNet-1K is 1,281,167 images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

from pirl import dist

IMAGENET = 1_281_167


def ring_allreduce_seconds(nbytes: float, world: int, bandwidth: float, latency: float) -> float:
    if world == 1:
        return 0.0
    return 2 * (world - 1) / world * nbytes / bandwidth + 2 * (world - 1) * latency


def predict(
    step_seconds: float,
    backward_seconds: float,
    batch: int,
    world: int,
    param_bytes: float,
    bandwidth: float,
    latency: float,
    dim: int = 128,
    overlap: float = 0.8,
) -> dict:
    allreduce = ring_allreduce_seconds(param_bytes, world, bandwidth, latency)
    exposed = max(0.0, allreduce - overlap * backward_seconds)
    gather = (
        0.0
        if world == 1
        else (world - 1) * batch * (4 * dim + 8) / bandwidth + (world - 1) * latency
    )
    t = step_seconds + exposed + gather
    return {
        "world": world,
        "step_seconds": t,
        "images_per_sec": world * batch / t,
        "allreduce_seconds": allreduce,
    }


def _measure_worker(rank: int, world: int, nbytes: int, port: int, out: dict) -> None:
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    t = torch.ones(nbytes // 4)
    tdist.all_reduce(t)
    times = []
    for _ in range(5):
        tdist.barrier()
        start = time.perf_counter()
        tdist.all_reduce(t)
        times.append(time.perf_counter() - start)
    if rank == 0:
        out["seconds"] = statistics.median(times)
    tdist.destroy_process_group()


def measure_allreduce(nbytes: int, world: int = 2) -> float:
    """Median seconds of a gloo all-reduce of `nbytes` between `world` local processes."""
    port = dist.free_port()
    out = mp.Manager().dict()
    mp.spawn(_measure_worker, args=(world, nbytes, port, out), nprocs=world, join=True)
    return out["seconds"]


def throughput(ranks: int, steps: int, overrides: list[str], independent: bool = False) -> dict:
    """`pirl throughput` on `ranks` local processes of one thread each (the 2-core machine split in
    two): one DDP job under torchrun, or `independent` single-rank runs side by side (the same
    contention for cores, caches and memory bandwidth, no communication). Returns the result of
    rank 0, or of the slower independent run."""
    import subprocess
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"bench{i}.json") for i in range(ranks if independent else 1)]
        args = ["-m", "pirl.tools.throughput", "--steps", str(steps), *overrides]
        if independent:
            cmds = [[sys.executable, *args, "--json", out] for out in outs]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}"]
            cmds = [[*launcher, *args, "--json", outs[0]]]
        procs = [subprocess.Popen(cmd, env=env) for cmd in cmds]
        for proc, cmd in zip(procs, cmds, strict=True):
            if proc.wait() != 0:
                raise SystemExit(
                    f"pirl throughput failed (exit {proc.returncode}): {' '.join(cmd)}"
                )
        results = []
        for out in outs:
            with open(out) as f:
                results.append(json.load(f)["rounds"][0]["default"])
    return max(results, key=lambda r: r["seconds_per_step"]["median"])


def validate(steps: int, overrides: list[str]) -> dict:
    """Predict the 2-rank DDP step from single-rank steps and the measured all-reduce; measure it.

    Two baselines: one rank alone, and two independent ranks side by side, which adds what the
    machine's sharing costs (on this CPU both ranks share cores' clocks, caches and memory
    bandwidth; GPUs in a node do not), so the second prediction tests the communication model
    alone. Gloo's all-reduce runs on the same cores as the compute, so no overlap is assumed."""
    alone = throughput(1, steps, overrides)
    side_by_side = throughput(2, steps, overrides, independent=True)
    nbytes = 4 * alone["parameters"]
    seconds = measure_allreduce(nbytes)
    bandwidth = nbytes / seconds  # bus bandwidth of a 2-rank ring: 2 (W-1)/W = 1
    ddp = throughput(2, steps, overrides)
    out = {
        "allreduce_seconds": seconds,
        "measured_images_per_sec": ddp["images_per_sec"],
        "measured_step_seconds": ddp["seconds_per_step"]["median"],
    }
    for name, base in (("alone", alone), ("side_by_side", side_by_side)):
        p = predict(
            base["seconds_per_step"]["median"],
            base["phases_median_seconds"]["backward"],
            base["batch"],
            2,
            nbytes,
            bandwidth,
            latency=0.0,  # already inside the measured all-reduce
            overlap=0.0,
        )
        out[name] = {
            "one_rank_step_seconds": base["seconds_per_step"]["median"],
            "predicted_images_per_sec": p["images_per_sec"],
            "error": p["images_per_sec"] / ddp["images_per_sec"] - 1,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pirl.tools.scaling", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--step-seconds", type=float, help="one rank's step (pirl throughput median)"
    )
    parser.add_argument(
        "--backward-seconds",
        type=float,
        default=None,
        help="its backward phase (default: 2/3 of the step)",
    )
    parser.add_argument("--batch", type=int, default=32, help="batch per rank")
    parser.add_argument(
        "--params", type=float, default=24.6e6, help="trainable parameters (R50 PIRL: 24.6M)"
    )
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=25.0, help="all-reduce bus bandwidth, GB/s"
    )
    parser.add_argument(
        "--latency-us", type=float, default=30.0, help="per-hop latency, microseconds"
    )
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=800)
    parser.add_argument("--json", default="")
    parser.add_argument(
        "--measure", action="store_true", help="measure gloo all-reduce bandwidth here (2 ranks)"
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="predict 2 local ranks (1 thread each) from a 1-rank pirl throughput, then measure them",
    )
    parser.add_argument("--steps", type=int, default=5, help="--validate: steps per bench run")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if overrides and not args.validate:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.validate:
        v = validate(args.steps, overrides)
        print(
            f"\n2 ranks x 1 thread, DDP (gloo): measured {v['measured_step_seconds']:.3f} s/step, "
            f"{v['measured_images_per_sec']:.2f} images/s; all-reduce {v['allreduce_seconds']:.3f} s"
        )
        for name in ("alone", "side_by_side"):
            r = v[name]
            print(
                f"from 1 rank {name.replace('_', ' ')} ({r['one_rank_step_seconds']:.3f} s/step): "
                f"predicted {r['predicted_images_per_sec']:.2f} images/s ({100 * r['error']:+.1f}%)"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(v, f, indent=1)
        return 0
    if args.measure:
        nbytes = int(4 * args.params)
        seconds = measure_allreduce(nbytes)
        bus = 2 * (2 - 1) / 2 * nbytes / seconds
        print(
            f"gloo all-reduce of {nbytes / 1e6:.0f} MB between 2 local ranks: {seconds:.3f} s, bus bandwidth {bus / 1e9:.2f} GB/s"
        )
        args.bandwidth_gbs = bus / 1e9
    if args.step_seconds is None:
        parser.error("--step-seconds is required (measure it with `pirl throughput`)")
    backward = (
        args.backward_seconds if args.backward_seconds is not None else 2 * args.step_seconds / 3
    )
    rows = []
    for nodes in (1, 4, 16):
        world = nodes * args.gpus_per_node
        p = predict(
            args.step_seconds,
            backward,
            args.batch,
            world,
            4 * args.params,
            args.bandwidth_gbs * 1e9,
            args.latency_us * 1e-6,
        )
        p["nodes"] = nodes
        p["hours_for_epochs"] = IMAGENET * args.epochs / p["images_per_sec"] / 3600
        rows.append(p)
    print(
        f"{'nodes x gpus':>12} {'step s':>8} {'images/s':>10} {'all-reduce s':>13} {args.epochs:>4}-epoch ImageNet hours"
    )
    for r in rows:
        print(
            f"{r['nodes']:>6} x {args.gpus_per_node:<3} {r['step_seconds']:>8.3f} {r['images_per_sec']:>10.0f} {r['allreduce_seconds']:>13.4f} {r['hours_for_epochs']:>10.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    sys.exit(main())
