"""Loader throughput, not a test: images/s of the training data paths on this machine.

    python tests/bench/bench_loader.py [--dataset digits|photos] [--preset NAME]
                                       [--workers 2] [--batches 40] [--batch 32]

Compares, on generated images (`digits`: scikit-learn digits upscaled to --image-size px, PNG;
`photos`: 500x375 JPEGs of smooth colour fields with fine noise, ImageNet-like decode cost):
- `disk_folder`: the ImageFolder read directly (pirl.data.IndexedTrainData),
- `shards (local)`: `pirl prep` shards on local disk (pirl.data.shards.ShardTrainData),
- `shards (S3)`: the same shards on a local S3 server (moto, started here on 127.0.0.1),
- `shards (S3 + cache)`: the same, second pass, served from a local cache folder,
each with the transforms and collator of --preset (default: the demo's; the seed's
pretrain/pirl/pirl_jigsaw_4node_resnet50 for the R50 figures: 10 views per image) and without
(decode + ToTensor only). All go through pirl.data.open_train_data, as the trainer does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import transforms as T

from pirl import config, prep
from pirl.data import open_train_data
from pirl.data.demo import write_digits_folder
from pirl.dist import free_port
from pirl.schema import DataSplit
from pirl.transforms import build_collator, build_transform, collate_single_view


def preset_transform(preset: str):
    cfg, _ = config.load([f"config={preset}"])
    train = cfg.DATA.TRAIN
    return build_transform(train.TRANSFORMS), build_collator(
        train.COLLATE_FUNCTION, train.INPUT_KEY_NAMES
    )


def write_photos(root: Path, n: int, classes: int = 4, size=(500, 375), seed: int = 0) -> None:
    """n JPEGs (quality 90) of upscaled random colour fields plus fine noise, in class folders."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray((255 * rng.random((h // 16, w // 16, 3))).astype(np.uint8))
        smooth = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:06d}.jpg", quality=90)


def plain_transform():
    return T.Compose([T.ToTensor()]), collate_single_view("data")


def start_s3() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("moto server did not start") from None
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    return proc, endpoint


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(split: DataSplit, transform, collate, *, workers: int, batches: int) -> float:
    """Steady-state images/s: counted from the first batch on (worker start-up and the first
    request's latency are a once-per-epoch cost, reported by the trainer's data phase)."""
    data = open_train_data(split, transform, collate, rank=0, world=1, seed=0, num_workers=workers)
    n, start = 0, 0.0
    for i, batch in enumerate(data.batches(0)):
        if i == 0:
            start = time.perf_counter()
        else:
            n += len(batch["index"])
        if i == batches:
            break
    return n / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["digits", "photos"], default="digits")
    p.add_argument("--photos", type=int, default=512, help="images written for --dataset photos")
    p.add_argument("--preset", default="pretrain/pirl/pirl_demo_resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64, help="digits: side in px")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=40, help="batches per measurement")
    p.add_argument("--shard-size", type=int, default=128)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pirl-bench-loader-"))
    s3, _ = start_s3()
    try:
        if args.dataset == "digits":
            write_digits_folder(str(tmp / "folder"), size=args.image_size)
        else:
            write_photos(tmp / "folder", args.photos)
        shards = str(tmp / "shards")
        opts = prep.Options(shard_size=args.shard_size, workers=args.workers)
        prep.prep(str(tmp / "folder"), shards, opts)
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(shards + "/", "bench/shards", recursive=True)
        cache = str(tmp / "cache")
        sources = {
            "disk_folder": DataSplit(
                DATA_SOURCES=["disk_folder"], DATA_PATHS=[str(tmp / "folder/train")]
            ),
            "shards (local)": DataSplit(DATA_SOURCES=["shards"], DATA_PATHS=[shards]),
            "shards (S3)": DataSplit(DATA_SOURCES=["shards"], DATA_PATHS=["s3://bench/shards"]),
            "shards (S3 + cache)": DataSplit(
                DATA_SOURCES=["shards"], DATA_PATHS=["s3://bench/shards"], CACHE_DIR=cache
            ),
        }
        what = f"{args.image_size}px digits" if args.dataset == "digits" else "500x375 JPEGs"
        print(
            f"{what}, {args.preset} transforms, batch {args.batch}, {args.workers} worker(s), "
            f"{args.batches} batches per figure, {os.cpu_count()} CPU(s)"
        )
        print(
            f"{'source':<22}{'transforms off':>16}{'PIRL transforms':>17}   (images/s)"
            f"{'S3 server CPU s':>18}"
        )
        pirl_transform, figures = preset_transform(args.preset), {}
        for name, split in sources.items():
            split.BATCHSIZE_PER_REPLICA = args.batch
            if name.endswith("cache)"):  # fill the cache first: the figure is a warm epoch
                measure(split, *plain_transform(), workers=args.workers, batches=10**9)
            off = measure(split, *plain_transform(), workers=args.workers, batches=args.batches)
            server = cpu_seconds(s3.pid)
            on = measure(split, *pirl_transform, workers=args.workers, batches=args.batches)
            server = cpu_seconds(s3.pid) - server
            figures[name] = on
            print(f"{name:<22}{off:>16.0f}{on:>17.0f}{server:>31.2f}")
        local = figures["shards (local)"]
        print(
            f"with transforms, S3/local: {figures['shards (S3)'] / local:.1%} streamed, "
            f"{figures['shards (S3 + cache)'] / local:.1%} from the cache"
        )
    finally:
        s3.terminate()
        s3.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
