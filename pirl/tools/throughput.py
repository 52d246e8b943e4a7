"""Training throughput: `pirl throughput [overrides] [--steps N] [--warmup W] [--json FILE]`.

Runs N training steps of a config (default: the seed's PIRL R50 on one process, batch 8 on CPU
and 32 on GPU, 32,000 negatives) on synthetic images and prints, per step after warm-up, the
median/min/max seconds, images/s, the time of each phase (data wait, trunk forward for the
patches and the image, heads, loss + memory, backward, optimizer), peak memory, and the
efficiency against this machine's own limit measured in the same run: counted model FLOPs per
image x images/s / measured dense-matmul peak (fp32 sgemm on CPU, bf16 on GPU).

Each step is the trainer's own `pirl.train.train_step` (LR, forward, loss, backward through the
loss scaler, optimizer), so what is timed is what training runs. `--variant` runs other
overrides alternated with the default in every one of `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from pirl import config, dist, precision, train
from pirl.entry import run_main

PHASES = [
    "data",
    "augment_on_device",
    "trunk_patches",
    "trunk_images",
    "heads",
    "forward_compiled",  # MODEL.COMPILE: trunks and heads together
    "loss_memory",
    "backward",
    "optimizer",
]


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Measured dense-matmul FLOP/s in `dtype`: 2048^2 on CPU, 8192^2 on GPU."""
    n = 8192 if device.type == "cuda" else 2048
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
    """Per-phase seconds of one step. Trunk and head calls are timed by forward hooks, so that
    the model still runs through DDP's forward (which arms the gradient all-reduce)."""

    def __init__(self, device: torch.device, compiled: bool):
        self.device, self.compiled = device, compiled
        self.times = {p: 0.0 for p in PHASES}

    def phase(self, name: str):
        """A context timing phase `name`; the forward is timed whole only when compiled (the
        hooks of `watch` time the trunk and heads otherwise)."""
        if name == "forward":
            return self._timed("forward_compiled") if self.compiled else nullcontext()
        return self._timed(name)

    @contextmanager
    def _timed(self, name: str):
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.times[name] += time.perf_counter() - start

    def watch(self, model) -> None:
        keys = [
            f"trunk_{k}" if f"trunk_{k}" in PHASES else "trunk_images" for k in model.input_keys
        ]
        state = {"calls": 0, "start": 0.0}

        def start(module, args):
            sync(self.device)
            state["start"] = time.perf_counter()

        def done(phase):
            def hook(module, args, output):
                sync(self.device)
                name = phase or keys[state["calls"] % len(keys)]
                state["calls"] += phase is None
                self.times[name] += time.perf_counter() - state["start"]

            return hook

        model.trunk.register_forward_pre_hook(start)
        model.trunk.register_forward_hook(done(None))
        for head in model.heads:
            head.register_forward_pre_hook(start)
            head.register_forward_hook(done("heads"))


def build(overrides: list[str], env: dist.DistEnv):
    """What the trainer builds (pirl.train's own functions), on synthetic data by default."""
    cfg, derived = config.load(overrides, world_size=env.world_size)
    split = cfg.DATA.TRAIN
    k = cfg.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives
    split.SYNTHETIC_NUM_SAMPLES = max(split.SYNTHETIC_NUM_SAMPLES, k + 1)
    data = train.open_data(cfg, env)
    cfg, derived = config.fit_dataset(cfg, derived, data.num_samples)
    training = train.build_training(cfg, env, data.num_samples, lr=0.01)
    training.criterion.memory.sync(cfg.LOSS.nce_loss_with_memory.memory_params.init_sync)
    return cfg, derived, data, training


def count_flops_per_image(model, criterion, batch: dict, model_cfg, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    inputs = {k: precision.place_input(batch[k], model_cfg, device) for k in model.input_keys}
    index = batch["index"].to(device)
    with FlopCounterMode(display=False) as counter:
        loss = criterion(model(inputs), index)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / index.shape[0]


def time_steps(overrides: list[str], steps: int, warmup: int) -> dict:
    """Time `steps` training steps after `warmup`; under torchrun, every rank runs DDP and rank 0's
    figures are returned (images/s counts all ranks)."""
    env = dist.init("auto")
    device = env.device
    if env.world_size > 1:
        overrides = overrides + [
            "config.DISTRIBUTED.NUM_NODES=1",
            f"config.DISTRIBUTED.NUM_PROC_PER_NODE={env.world_size}",
        ]
    cfg, derived, data, t = build(overrides, env)
    model = t.model
    model.train()
    t.criterion.train()
    batches = data.batches(0)
    amp_dtype = t.amp_dtype
    # The limit: the matmul peak in the dtype the convolutions run in on CPU; bf16 on GPU (whose
    # float32 convolutions run on tensor cores as tf32 anyway).
    compute_dtype = torch.bfloat16 if device.type == "cuda" else (amp_dtype or torch.float32)
    peak = matmul_peak(device, compute_dtype)
    augment = train.device_augmentation(cfg, device)
    first = next(batches)
    first = augment(first, 0) if augment is not None else first
    flops = count_flops_per_image(model, t.criterion, first, cfg.MODEL, device)
    t.step_model = train.data_parallel(model, cfg, env)
    timer = Timer(device, compiled=cfg.MODEL.COMPILE)
    if not cfg.MODEL.COMPILE:  # hooks would break the compiled graph: time the forward whole
        timer.watch(model)
    lr = config.lr_at(derived.lr, 0, cfg.OPTIMIZER.num_epochs)
    per_step, phases = [], []
    for step in range(warmup + steps):
        timer.times = dict.fromkeys(PHASES, 0.0)
        t0 = time.perf_counter()
        with timer.phase("data"):
            try:
                batch = next(batches)
            except StopIteration:
                batches = data.batches(step + 1)
                batch = next(batches)
        if augment is not None:
            with timer.phase("augment_on_device"):
                batch = augment(batch, 0)
        train.train_step(t, batch, lr, timed=timer.phase)
        sync(device)
        if step >= warmup:
            per_step.append(time.perf_counter() - t0)
            phases.append(timer.times)
    batch_size = derived.batch_size_per_rank
    median = statistics.median(per_step)
    images_per_sec = env.world_size * batch_size / median
    result = {
        "device": str(device),
        "ranks": env.world_size,
        "threads": torch.get_num_threads(),
        "config": overrides,
        "batch": batch_size,
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "num_negatives": cfg.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives,
        "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "channels_last": cfg.MODEL.CHANNELS_LAST,
        "matmul_peak_dtype": str(compute_dtype).replace("torch.", ""),
        "steps": steps,
        "seconds_per_step": {"median": median, "min": min(per_step), "max": max(per_step)},
        "images_per_sec": images_per_sec,
        "phases_median_seconds": {p: statistics.median(t[p] for t in phases) for p in PHASES},
        "flops_per_image": flops,
        "matmul_peak_flops": peak,
        "efficiency": flops * images_per_sec / env.world_size / peak,
        "limit_seconds_per_step": flops * batch_size / peak,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def print_table(result: dict) -> None:
    s = result["seconds_per_step"]
    print(
        f"\n{result['device']}, {result['ranks']} rank(s) x {result['threads']} threads, "
        f"batch {result['batch']} per rank, "
        f"{result['num_negatives']} negatives, autocast {result['autocast']}, "
        f"channels_last {result['channels_last']}"
    )
    print(f"step seconds: median {s['median']:.3f}  min {s['min']:.3f}  max {s['max']:.3f}")
    print(f"images/s: {result['images_per_sec']:.2f}")
    print(
        "phase (median s):  "
        + "  ".join(f"{p} {t:.3f}" for p, t in result["phases_median_seconds"].items())
    )
    print(
        f"model GFLOP/image {result['flops_per_image'] / 1e9:.2f}, {result['matmul_peak_dtype']} matmul peak {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s, "
        f"limit {result['limit_seconds_per_step']:.3f} s/step, efficiency {100 * result['efficiency']:.1f}%"
    )
    print(f"peak RSS of this process so far {result['peak_rss_mb']:.0f} MB")


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


def summarise(rounds: list[dict[str, dict]]) -> list[dict]:
    """One row per variant: medians over the rounds."""
    rows = []
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        step = statistics.median(r["seconds_per_step"]["median"] for r in runs)
        loss = statistics.median(r["phases_median_seconds"]["loss_memory"] for r in runs)
        row = {
            "variant": name,
            "seconds_per_step": step,
            "images_per_sec": statistics.median(r["images_per_sec"] for r in runs),
            "efficiency": statistics.median(r["efficiency"] for r in runs),
            "matmul_peak_dtype": runs[0]["matmul_peak_dtype"],
            "loss_memory_share": loss / step,
        }
        rows.append(row)
    return rows


def print_summary(rows: list[dict], rounds: int) -> None:
    print(f"\nsummary over {rounds} round(s), medians:")
    width = max(len(r["variant"]) for r in rows)
    header = f"{'s/step':>7} {'img/s':>6} {'eff.':>10} {'loss+mem':>8}"
    print(f"{'variant':<{width}} {header}")
    for r in rows:
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[r["matmul_peak_dtype"]]
        eff = f"{100 * r['efficiency']:.0f}% {short}"
        print(
            f"{r['variant']:<{width}} {r['seconds_per_step']:>7.3f} {r['images_per_sec']:>6.2f} "
            f"{eff:>10} {100 * r['loss_memory_share']:>7.1f}%"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pirl throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides (added after the defaults)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help="also run with these space-separated overrides, alternated with the others "
        "in every round (repeatable), e.g. --variant config.MODEL.AMP_PARAMS.USE_AMP=true",
    )
    p.add_argument("--rounds", type=int, default=1, help="rounds of alternation")
    return p


def variants_of(args: argparse.Namespace) -> tuple[list[str], dict[str, list[str]]]:
    """(the overrides every run takes, {variant name: its extra overrides}); bad overrides fail
    here, before any run."""
    overrides = default_overrides(torch.cuda.is_available()) + args.overrides
    variants = {"default": []} | {v: v.split() for v in args.variant}
    for extra in variants.values():
        config.load(overrides + extra, 1)
    return overrides, variants


def run(args: argparse.Namespace) -> int:
    overrides, variants = variants_of(args)
    rank = dist.launch_env()[0]
    rounds = []
    for _ in range(args.rounds):
        results = {}
        for name, extra in variants.items():
            results[name] = time_steps(overrides + extra, args.steps, args.warmup)
            if rank == 0:
                print_table(results[name])
        rounds.append(results)
    if rank != 0:
        return 0
    rows = summarise(rounds)
    print_summary(rows, len(rounds))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": rows, "rounds": rounds}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_main("pirl throughput", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
