"""Training-step benchmark: `pirl bench [overrides] [--steps N] [--warmup W] [--json FILE] [--peer]`.

Runs N training steps of a config (default: the seed's PIRL R50 on one process, batch 8 on CPU
and 32 on GPU, 32,000 negatives) on synthetic images and prints, per step after warm-up, the
median/min/max seconds, images/s, the time of each phase (data wait, trunk forward for the
patches and the image, heads, loss + memory, backward, optimizer), peak memory, and the
efficiency against this machine's own limit measured in the same run: counted model FLOPs per
image x images/s / measured dense-matmul peak (fp32 sgemm on CPU, bf16 on GPU).

`--peer` also runs the reference implementation (../shared/peers/vissl/run.sh, VISSL 0.1.6 on
its own entry point and config) with the same trunk, batch and negatives, alternating with ours
for `--rounds` rounds, and prints the ratio of images/s ours/VISSL.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pirl import config, dist
from pirl.data import open_train_data
from pirl.loss import NCELossWithMemory
from pirl.models import build_model
from pirl.optim import build_optimizer
from pirl.transforms import build_collator, build_transform

PHASES = ["data", "trunk_patches", "trunk_images", "heads", "loss_memory", "backward", "optimizer"]
PEER = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "vissl" / "run.sh"


def matmul_peak(device: torch.device, seconds: float = 2.0) -> float:
    """Measured dense-matmul FLOP/s: fp32 sgemm 2048^2 on CPU, bf16 8192^2 on GPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device: torch.device):
        self.device, self.times = device, {p: 0.0 for p in PHASES}

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                sync(timer.device)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                sync(timer.device)
                timer.times[name] += time.perf_counter() - self.t

        return _Phase()


def build(overrides: list[str], device: torch.device):
    cfg, _ = config.load(overrides, world_size=1)
    split = cfg.DATA.TRAIN
    k = cfg.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives
    split.SYNTHETIC_NUM_SAMPLES = max(split.SYNTHETIC_NUM_SAMPLES, k + 1)
    data = open_train_data(
        split,
        build_transform(split.TRANSFORMS),
        build_collator(split.COLLATE_FUNCTION, split.INPUT_KEY_NAMES),
        rank=0,
        world=1,
        seed=cfg.SEED_VALUE,
        num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
        pin_memory=device.type == "cuda",
    )
    derived = config.derive(cfg, 1, data.num_samples)
    model = build_model(cfg).to(device)
    criterion = NCELossWithMemory(cfg.LOSS.nce_loss_with_memory, data.num_samples).to(device)
    optimizer = build_optimizer(model, cfg.OPTIMIZER, lr=0.01)
    return cfg, derived, data, model, criterion, optimizer


def count_flops_per_image(model, criterion, batch: dict, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    inputs = {k: batch[k].to(device) for k in model.input_keys}
    index = batch["index"].to(device)
    with FlopCounterMode(display=False) as counter:
        loss = criterion(model(inputs), index)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / index.shape[0]


def run_ours(overrides: list[str], steps: int, warmup: int) -> dict:
    env = dist.init("auto")
    device = env.device
    cfg, derived, data, model, criterion, optimizer = build(overrides, device)
    model.train()
    criterion.train()
    batches = data.batches(0)
    peak = matmul_peak(device)
    per_step, phases = [], []
    flops = None
    for step in range(warmup + steps):
        timer = Timer(device)
        t0 = time.perf_counter()
        with timer.phase("data"):
            try:
                batch = next(batches)
            except StopIteration:
                batches = data.batches(step + 1)
                batch = next(batches)
        if flops is None:
            flops = count_flops_per_image(model, criterion, batch, device)
        index = batch["index"].to(device, non_blocking=True)
        outputs = {}
        for key, head in zip(model.input_keys, model.heads, strict=True):
            x = batch[key].to(device, non_blocking=True)
            with timer.phase(f"trunk_{key}" if f"trunk_{key}" in timer.times else "trunk_images"):
                feats = model.trunk(x)
            with timer.phase("heads"):
                outputs[key] = head(feats)
        with timer.phase("loss_memory"):
            loss = criterion(outputs, index)
        with timer.phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with timer.phase("optimizer"):
            optimizer.step()
        sync(device)
        if step >= warmup:
            per_step.append(time.perf_counter() - t0)
            phases.append(timer.times)
    batch_size = derived.batch_size_per_rank
    median = statistics.median(per_step)
    images_per_sec = batch_size / median
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "config": overrides,
        "batch": batch_size,
        "num_negatives": cfg.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives,
        "steps": steps,
        "seconds_per_step": {"median": median, "min": min(per_step), "max": max(per_step)},
        "images_per_sec": images_per_sec,
        "phases_median_seconds": {p: statistics.median(t[p] for t in phases) for p in PHASES},
        "flops_per_image": flops,
        "matmul_peak_flops": peak,
        "efficiency": flops * images_per_sec / peak,
        "limit_seconds_per_step": flops * batch_size / peak,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_peer(batch: int, iters: int, num_negatives: int, depth: int) -> dict:
    """The reference implementation on this machine, through its own script; returns its summary."""
    if not PEER.exists():
        raise SystemExit(
            f"the peer script {PEER} is absent (it lives in the project's shared/ folder)"
        )
    out = (
        Path(os.environ.get("PIRL_PEER_OUT", "/tmp/vissl-peer/results"))
        / f"bench-{int(time.time())}"
    )
    env = dict(
        os.environ,
        BATCH=str(batch),
        ITERS=str(iters),
        NUM_NEG=str(num_negatives),
        DEPTH=str(depth),
        OUT=str(out),
    )
    subprocess.run(["bash", str(PEER)], env=env, check=True)
    return json.loads((out / "summary.json").read_text())


def print_table(result: dict) -> None:
    s = result["seconds_per_step"]
    print(
        f"\n{result['device']}, {result['threads']} threads, batch {result['batch']}, {result['num_negatives']} negatives"
    )
    print(f"step seconds: median {s['median']:.3f}  min {s['min']:.3f}  max {s['max']:.3f}")
    print(f"images/s: {result['images_per_sec']:.2f}")
    print(
        "phase (median s):  "
        + "  ".join(f"{p} {t:.3f}" for p, t in result["phases_median_seconds"].items())
    )
    print(
        f"model GFLOP/image {result['flops_per_image'] / 1e9:.2f}, matmul peak {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s, "
        f"limit {result['limit_seconds_per_step']:.3f} s/step, efficiency {100 * result['efficiency']:.1f}%"
    )
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    if "peer" in result:
        print(
            f"VISSL: {result['peer_images_per_sec']:.2f} images/s; ours/VISSL = {result['ratio_vs_peer']:.2f}x"
        )


def default_overrides(device_is_gpu: bool) -> list[str]:
    return [
        "config=pretrain/pirl/pirl_jigsaw_4node_resnet50",
        "config.DISTRIBUTED.NUM_NODES=1",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
        f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={32 if device_is_gpu else 8}",
        "config.DATA.TRAIN.DATA_SOURCES=[synthetic]",
        "config.DATA.TRAIN.SYNTHETIC_IMAGE_SIZE=320",
        "config.DATA.NUM_DATALOADER_WORKERS=1",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pirl bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides (added after the defaults)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument(
        "--peer", action="store_true", help="alternate with the reference implementation"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of ours/peer alternation")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = default_overrides(torch.cuda.is_available()) + args.overrides
    rounds = []
    for _ in range(args.rounds if args.peer else 1):
        ours = run_ours(overrides, args.steps, args.warmup)
        if args.peer:
            cfg, _ = config.load(overrides, world_size=1)
            peer = run_peer(
                ours["batch"],
                args.steps + args.warmup,
                ours["num_negatives"],
                cfg.MODEL.TRUNK.RESNETS.DEPTH,
            )
            ours["peer"] = peer
            ours["peer_images_per_sec"] = peer["images_per_s"]
            ours["ratio_vs_peer"] = ours["images_per_sec"] / peer["images_per_s"]
        rounds.append(ours)
        print_table(ours)
    if args.peer and len(rounds) > 1:
        ratios = [r["ratio_vs_peer"] for r in rounds]
        print(
            f"\nours/VISSL over {len(rounds)} alternated rounds: median {statistics.median(ratios):.2f}x ({ratios})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rounds if len(rounds) > 1 else rounds[0], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
