"""`pirl extract` (also `python -m pirl.extract`): features of chosen layers for a dataset split,
as VISSL's extract_features engine writes them, for offline kNN, SVMs or clustering.

    pirl extract runs/pirl/trunk.safetensors s3://bucket/features/pirl \
        --data s3://datasets/imagenet-shards --source shards --split val --layers res4,res5avg

Each rank takes every world-th sample (rank r: r, r + world, ...) and writes its features in
chunks of `--chunk-size` samples, under VISSL's file names so its ExtractedFeaturesLoader reads
them too: `rank{r}_chunk{c}_{split}_{layer}_{features,targets,inds}.npy` (`--format npy`), or
one `rank{r}_chunk{c}_{split}.safetensors` per chunk holding `{layer}` (the features), `targets`
and `inds` (`--format safetensors`). `inds` are the dataset's sample indices, `targets` its class
labels. Rank 0 writes `extract.json` last: layers, shapes, files, counts and the weights'
identity. `load_features(url, split, layer)` merges the shards back in sample order.

Layers: conv1, res2, res3, res4, res5 (feature maps, N x C x h x w; `--pool-size S` averages them
to S x S), res5avg (N x C, the trunk's output) and heads (the pretraining head that embeds a
whole image: NPID's only head, PIRL's image head; needs a training checkpoint or run folder).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml
from torch import nn

from pirl import dist, storage
from pirl.entry import run_main, start
from pirl.errors import ConfigError, DataError
from pirl.models import ResNetTrunk

log = logging.getLogger("pirl")

CONV_LAYERS = ("conv1", "res2", "res3", "res4", "res5")
LAYERS = (*CONV_LAYERS, "res5avg", "heads")
SOURCES = ("shards", "disk_folder", "disk_filelist", "synthetic")
MANIFEST = "extract.json"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pirl extract", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    p.add_argument(
        "weights",
        help="trunk weights (any format pirl.weights reads: trunk.safetensors, a training "
        "checkpoint or run folder, a VISSL checkpoint); `heads` needs a training checkpoint",
    )
    p.add_argument("output", help="output folder URL (fsspec: a path, s3://, gs://, ...)")
    p.add_argument("--data", required=True, help="dataset URL (as config.DATA.*.DATA_PATHS)")
    p.add_argument("--source", choices=SOURCES, default="shards", help="default: shards")
    p.add_argument("--labels", default="", help="disk_filelist: the labels' .npy (LABEL_PATHS)")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument(
        "--layers",
        default="res5avg",
        help=f"comma-separated, from {', '.join(LAYERS)} (default: res5avg)",
    )
    p.add_argument("--format", choices=("npy", "safetensors"), default="npy")
    p.add_argument("--chunk-size", type=int, default=10000, help="samples per file per rank")
    p.add_argument("--pool-size", type=int, default=0, help="average conv maps to S x S (0: off)")
    p.add_argument("--resize", type=int, default=256, help="Resize before the center crop")
    p.add_argument("--crop", type=int, default=224, help="CenterCrop size")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--limit", type=int, default=-1, help="only the first N samples (-1: all)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    args = p.parse_args(argv)
    args.layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    for name in args.layers:
        if name not in LAYERS:
            raise ConfigError(f"--layers: unknown layer {name!r}; use some of {', '.join(LAYERS)}")
    if not args.layers:
        raise ConfigError(f"--layers is empty; use some of {', '.join(LAYERS)}")
    for opt in ("chunk_size", "resize", "crop", "batch_size"):
        if getattr(args, opt) < 1:
            raise ConfigError(f"--{opt.replace('_', '-')} must be >= 1")
    if args.pool_size < 0 or args.workers < 0:
        raise ConfigError("--pool-size and --workers must be >= 0")
    return args


# ----------------------------------------------------------------------------------------------
# The network: trunk stages, and the image head when asked


def image_head_index(head_params: list) -> int:
    """The head that embeds a whole image: the one without siamese_concat_view (PIRL's patch
    head concatenates 9 patch embeddings, so it cannot take an image)."""
    from pirl.config import head_modules

    found = [
        i
        for i, head in enumerate(head_params)
        if all(name != "siamese_concat_view" for name, _ in head_modules(head))
    ]
    if len(found) != 1:
        raise ConfigError(
            f"--layers heads: the model has {len(found)} heads that embed a single image "
            f"(HEAD.PARAMS {head_params}); extraction needs exactly one"
        )
    return found[0]


def load_network(url: str, want_head: bool) -> tuple[ResNetTrunk, nn.Module | None, dict]:
    """(trunk, image head or None, the weights' identity) from any weights URL."""
    from pirl.weights import (
        WeightsError,
        apply_trunk_weights,
        describe_resnet,
        read_trunk_weights,
        read_weights_object,
    )

    if want_head:
        from pirl import checkpoint, config
        from pirl.models import build_model

        fs, path = storage.fs_and_path(url)
        if fs.isdir(path):
            metas = checkpoint.complete(url)
            if not metas:
                raise WeightsError(f"--layers heads: {url!r} holds no complete checkpoint")
            url = storage.join(url, "checkpoints", metas[-1]["file"])
        obj, resolved, _, sha = read_weights_object(url)
        if not (isinstance(obj, dict) and isinstance(obj.get("config"), str) and "model" in obj):
            raise WeightsError(
                f"--layers heads needs a training checkpoint (model + config), got {resolved}"
            )
        cfg = config.build(yaml.safe_load(obj["config"])["config"])
        cfg, _ = config.derive(cfg)
        model = build_model(cfg)
        model.load_state_dict(obj["model"])
        head = model.heads[image_head_index(cfg.MODEL.HEAD.PARAMS)]
        identity = {"url": url, "resolved_url": resolved, "format": "checkpoint", "sha256": sha}
        return model.trunk, head, identity

    weights = read_trunk_weights(url)
    arch = describe_resnet(weights.state_dict)
    if not arch:
        raise WeightsError(f"{url}: not a ResNet trunk this tool can rebuild")
    depth, width = arch.split()
    trunk = ResNetTrunk(int(depth.split("-")[1]), int(width[1:]))
    apply_trunk_weights(trunk, weights.state_dict, weights.resolved_url)
    return trunk, None, weights.identity()


class LayerFeatures(nn.Module):
    """x -> {layer: features} for the chosen layers, in eval mode, without gradients."""

    def __init__(self, trunk: ResNetTrunk, head: nn.Module | None, layers: list, pool_size: int):
        super().__init__()
        self.trunk, self.head, self.layers = trunk.eval(), head, list(layers)
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if pool_size else nn.Identity()
        if head is not None:
            head.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.trunk.stages(x)
        flat = torch.flatten(self.trunk.avgpool(maps["res5"]), 1)
        out = {}
        for name in self.layers:
            if name == "res5avg":
                out[name] = flat
            elif name == "heads":
                assert self.head is not None, "--layers heads loads the head with the trunk"
                out[name] = self.head(flat)
            else:
                out[name] = self.pool(maps[name])
        return {k: v.float().cpu() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Output


@dataclass
class ChunkWriter:
    """Buffers one rank's features and writes a chunk every `chunk_size` samples."""

    output: str
    split: str
    rank: int
    fmt: str
    chunk_size: int
    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)
    buffered: int = 0
    chunk: int = 0
    files: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    count: int = 0

    def add(self, features: dict[str, torch.Tensor], inds: torch.Tensor, targets: torch.Tensor):
        arrays = {k: v.numpy() for k, v in features.items()}
        arrays["inds"], arrays["targets"] = inds.numpy(), targets.numpy()
        start = 0
        n = len(arrays["inds"])
        while start < n:
            take = min(n - start, self.chunk_size - self.buffered)
            for key, value in arrays.items():
                self.parts.setdefault(key, []).append(value[start : start + take])
            self.buffered += take
            start += take
            if self.buffered == self.chunk_size:
                self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        arrays = {k: np.ascontiguousarray(np.concatenate(v)) for k, v in self.parts.items()}
        inds, targets = arrays.pop("inds"), arrays.pop("targets")
        prefix = f"rank{self.rank}_chunk{self.chunk}_{self.split}"
        if self.fmt == "safetensors":
            from safetensors.numpy import save

            name = f"{prefix}.safetensors"
            self._write(name, save({**arrays, "inds": inds, "targets": targets}))
        else:
            for layer, feats in arrays.items():
                for kind, value in (("features", feats), ("targets", targets), ("inds", inds)):
                    self._write(f"{prefix}_{layer}_{kind}.npy", npy_bytes(value))
        for layer, feats in arrays.items():
            self.shapes[layer] = list(feats.shape[1:])
        self.count += len(inds)
        self.parts, self.buffered, self.chunk = {}, 0, self.chunk + 1

    def _write(self, name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.output, name), data)
        self.files.append(name)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def gather_objects(obj) -> list:
    """`obj` from every rank, in rank order (a list of one for a single process)."""
    if dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------
# Reading back


def load_features(url: str, split: str, layer: str) -> dict[str, np.ndarray]:
    """{features, targets, inds} of one layer, merged over ranks and chunks and sorted by
    sample index (VISSL's ExtractedFeaturesLoader.load_features, for our output)."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(url, MANIFEST)))
    except FileNotFoundError:
        raise DataError(f"{url} has no {MANIFEST}: not a finished `pirl extract` output") from None
    if layer not in manifest["layers"] or split != manifest["split"]:
        raise DataError(
            f"{url} holds split {manifest['split']!r}, layers {manifest['layers']}; "
            f"asked for {split!r}/{layer!r}"
        )
    feats, targets, inds = [], [], []
    for name in manifest["files"]:
        if manifest["format"] == "safetensors":
            from safetensors.numpy import load

            arrays = load(storage.read_bytes(storage.join(url, name)))
            feats.append(arrays[layer])
            targets.append(arrays["targets"])
            inds.append(arrays["inds"])
        elif name.endswith(f"_{split}_{layer}_features.npy"):
            stem = name[: -len("features.npy")]
            for out, kind in ((feats, "features"), (targets, "targets"), (inds, "inds")):
                data = storage.read_bytes(storage.join(url, f"{stem}{kind}.npy"))
                out.append(np.load(io.BytesIO(data), allow_pickle=False))
    order = np.argsort(np.concatenate(inds), kind="stable")
    return {
        "features": np.concatenate(feats)[order],
        "targets": np.concatenate(targets)[order],
        "inds": np.concatenate(inds)[order],
    }


# ----------------------------------------------------------------------------------------------
# The run


def open_split(args: argparse.Namespace, env: dist.DistEnv):
    from pirl.data import open_train_data
    from pirl.schema import DataSplit
    from pirl.transforms import build_collator, build_transform

    transforms = [
        {"name": "Resize", "size": args.resize},
        {"name": "CenterCrop", "size": args.crop},
        {"name": "ToTensor"},
        {"name": "Normalize", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    ]
    split = DataSplit(
        DATA_SOURCES=[args.source],
        DATA_PATHS=[args.data],
        LABEL_PATHS=[args.labels] if args.labels else [],
        SPLIT=args.split,
        DATA_LIMIT=args.limit,
        BATCHSIZE_PER_REPLICA=args.batch_size,
        LABEL_TYPE="standard",
        TRANSFORMS=transforms,
    )
    return open_train_data(
        split,
        build_transform(transforms),
        build_collator("default_collate", ["data"]),
        rank=env.rank,
        world=env.world_size,
        seed=0,
        num_workers=args.workers,
        pin_memory=env.device.type == "cuda",
    )


def extract(args: argparse.Namespace, env: dist.DistEnv) -> dict:
    trunk, head, identity = load_network(args.weights, "heads" in args.layers)
    net = LayerFeatures(trunk, head, args.layers, args.pool_size).to(env.device)
    data = open_split(args, env)
    log.info(
        "extracting %s of %d %s samples on %d rank(s) -> %s",
        args.layers,
        data.num_samples,
        args.split,
        env.world_size,
        args.output,
    )
    writer = ChunkWriter(args.output, args.split, env.rank, args.format, args.chunk_size)
    batches: Iterator[dict] = data.eval_batches()
    for batch in batches:
        features = net(batch["data"].to(env.device, non_blocking=True))
        writer.add(features, batch["index"], batch["label"])
    writer.flush()
    per_rank = gather_objects(
        {"files": writer.files, "count": writer.count, "shapes": writer.shapes}
    )
    shapes: dict = next((r["shapes"] for r in per_rank if r["shapes"]), {})
    manifest = {
        "split": args.split,
        "layers": args.layers,
        "format": args.format,
        "shapes": shapes,
        "num_samples": sum(r["count"] for r in per_rank),
        "dataset": {"url": args.data, "source": args.source, "classes": list(data.classes)},
        "weights": identity,
        "transforms": {"resize": args.resize, "crop": args.crop, "pool_size": args.pool_size},
        "world_size": env.world_size,
        "files": [name for r in per_rank for name in r["files"]],
    }
    if env.is_main:
        storage.write_bytes(
            storage.join(args.output, MANIFEST), json.dumps(manifest, indent=1).encode()
        )
    return manifest


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    env = start(args.device)
    if env.is_main:
        storage.check_writable(args.output)
    manifest = extract(args, env)
    dist.barrier()
    if env.is_main:
        print(
            f"{manifest['num_samples']} samples, layers {manifest['layers']} "
            f"{manifest['shapes']} -> {args.output}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("pirl extract", lambda: run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
