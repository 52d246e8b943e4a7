"""Compose, validate and derive the benchmark config (the same machinery as `pirl train`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from pirl import config as base
from pirl.benchmark.schema import BenchmarkConfig
from pirl.config import _one_of, _require
from pirl.errors import ConfigError
from pirl.redaction import redact

FEATURES = ("conv1", "res2", "res3", "res4", "res5", "res5avg")
POOL_OPS = {"AvgPool2d": (1, 3), "AdaptiveAvgPool2d": (1, 1), "Identity": (0, 0)}  # arg counts
HEAD_KWARGS = {"eval_mlp": {"in_channels", "dims"}, "mlp": {"dims"}}


@dataclass
class BenchDerived:
    """Values that follow from the config and the launch; printed by --dry-run under `derived:`."""

    world_size: int
    global_batch_size: int
    batch_size_per_rank: int
    lr_scale_factor: float
    lr: dict
    heads: list[str]
    notes: list[str] = field(default_factory=list)


def head_names(cfg: BenchmarkConfig) -> list[str]:
    """Display names, one per head: the feature name, `_nobn` for a plain linear head, and a
    numeric suffix for repeats (res5, res5avg, res5avg_nobn, ...)."""
    names: list[str] = []
    ops = cfg.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP
    for (feature, _), (kind, _) in zip(ops, cfg.MODEL.HEAD.PARAMS, strict=True):
        name = feature if kind == "eval_mlp" else f"{feature}_nobn"
        candidate, i = name, 2
        while candidate in names:
            candidate, i = f"{name}_{i}", i + 1
        names.append(candidate)
    return names


def check(cfg: BenchmarkConfig) -> None:
    """Impossible values, each reported with the key that holds it."""
    c = "config"
    r = cfg.MODEL.TRUNK.RESNETS
    rp = f"{c}.MODEL.TRUNK.RESNETS"
    _one_of(f"{c}.MODEL.TRUNK.NAME", cfg.MODEL.TRUNK.NAME, ("resnet",))
    _one_of(f"{rp}.DEPTH", r.DEPTH, tuple(base.TRUNK_DEPTHS))
    _one_of(f"{rp}.WIDTH_MULTIPLIER", r.WIDTH_MULTIPLIER, base.WIDTH_MULTIPLIERS)
    _one_of(f"{rp}.NORM", r.NORM, ("BatchNorm",))
    _one_of(f"{rp}.LAYER4_STRIDE", r.LAYER4_STRIDE, (1, 2))
    _one_of(f"{rp}.INIT", r.INIT, base.TRUNK_INITS)
    _require(
        base.TRUNK_DEPTHS[r.DEPTH] == "bottleneck" or (r.GROUPS == 1 and r.WIDTH_PER_GROUP == 64),
        f"{rp}.GROUPS/WIDTH_PER_GROUP (ResNeXt) need a bottleneck depth (50/101/152/200)",
    )
    _one_of(
        f"{c}.MODEL.AMP_PARAMS.AMP_DTYPE", cfg.MODEL.AMP_PARAMS.AMP_DTYPE, ("bfloat16", "float16")
    )
    fe = cfg.MODEL.FEATURE_EVAL_SETTINGS
    fp = f"{c}.MODEL.FEATURE_EVAL_SETTINGS"
    _require(
        fe.EVAL_MODE_ON and fe.FREEZE_TRUNK_ONLY,
        f"{fp}.EVAL_MODE_ON and FREEZE_TRUNK_ONLY must be true: the benchmark evaluates a frozen "
        "trunk (fine-tuning is not supported)",
    )
    ops, heads = fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP, cfg.MODEL.HEAD.PARAMS
    _require(len(heads) >= 1, f"{c}.MODEL.HEAD.PARAMS is empty: give at least one head")
    _require(
        len(ops) == len(heads),
        f"{fp}.LINEAR_EVAL_FEAT_POOL_OPS_MAP has {len(ops)} entries but {c}.MODEL.HEAD.PARAMS has "
        f"{len(heads)} heads: one feature per head, in the same order",
    )
    for i, entry in enumerate(ops):
        ep = f"{fp}.LINEAR_EVAL_FEAT_POOL_OPS_MAP[{i}]"
        ok = (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[1], list)
            and len(entry[1]) == 2
            and isinstance(entry[1][1], list)
        )
        _require(ok, f"{ep} must be [feature, [op, [args]]], got {entry!r}")
        feature, (op, args) = entry
        _one_of(f"{ep}[0]", feature, FEATURES)
        _one_of(f"{ep}[1][0]", op, tuple(POOL_OPS))
        lo, hi = POOL_OPS[op]
        _require(lo <= len(args) <= hi, f"{ep}[1][1]: {op} takes {lo}..{hi} arguments, got {args}")
    for i, head in enumerate(heads):
        hp = f"{c}.MODEL.HEAD.PARAMS[{i}]"
        _require(
            isinstance(head, list) and len(head) == 2 and isinstance(head[1], dict),
            f"{hp} must be [eval_mlp|mlp, {{kwargs}}], got {head!r}",
        )
        _one_of(f"{hp}[0]", head[0], tuple(HEAD_KWARGS))
        for key in head[1]:
            _one_of(f"{hp}[1].{key}", key, tuple(HEAD_KWARGS[head[0]]))
        dims = head[1].get("dims")
        _require(
            isinstance(dims, list) and len(dims) == 2 and all(isinstance(d, int) for d in dims),
            f"{hp}[1].dims must be [in, out] (a linear classifier), got {dims!r}",
        )

    for name, split in (("TRAIN", cfg.DATA.TRAIN), ("TEST", cfg.DATA.TEST)):
        dp = f"{c}.DATA.{name}"
        _require(
            len(split.DATA_SOURCES) == 1,
            f"{dp}.DATA_SOURCES must name exactly one source, got {split.DATA_SOURCES}",
        )
        _one_of(f"{dp}.DATA_SOURCES", split.DATA_SOURCES[0], base.DATA_SOURCES)
        _one_of(f"{dp}.LABEL_TYPE", split.LABEL_TYPE, ("standard",))
        _one_of(f"{dp}.COLLATE_FUNCTION", split.COLLATE_FUNCTION, ("default_collate",))
        _require(split.BATCHSIZE_PER_REPLICA >= 1, f"{dp}.BATCHSIZE_PER_REPLICA must be >= 1")
        base.check_data_limit(split, dp)
        from pirl.transforms import build_transform  # validates every transform and its params

        build_transform(split.TRANSFORMS, f"{dp}.TRANSFORMS")
    _require(cfg.DATA.NUM_DATALOADER_WORKERS >= 0, f"{c}.DATA.NUM_DATALOADER_WORKERS must be >= 0")

    base.check_optimizer(cfg.OPTIMIZER, f"{c}.OPTIMIZER")

    k = cfg.KNN
    _require(
        len(k.K) >= 1 and all(isinstance(v, int) and v >= 1 for v in k.K),
        f"{c}.KNN.K must be a non-empty list of positive integers, got {k.K}",
    )
    _require(k.TEMPERATURE > 0, f"{c}.KNN.TEMPERATURE must be > 0, got {k.TEMPERATURE}")
    _one_of(f"{c}.KNN.FEATURE", k.FEATURE, FEATURES)
    fraction = cfg.LOW_SHOT.FRACTION
    _require(0 < fraction <= 1, f"{c}.LOW_SHOT.FRACTION must be in (0, 1], got {fraction}")
    _require(
        fraction == 1 or cfg.DATA.TRAIN.DATA_SOURCES[0] != "shards",
        f"{c}.LOW_SHOT.FRACTION={fraction} needs each train sample's label up front, which a "
        "sharded dataset does not give: use DATA.TRAIN.DATA_SOURCES=[disk_folder] or "
        "[disk_filelist], or make the subset a dataset of its own (`pirl prep` from a list file)",
    )

    d = cfg.DISTRIBUTED
    _require(d.NUM_NODES >= 1, f"{c}.DISTRIBUTED.NUM_NODES must be >= 1")
    _require(d.NUM_PROC_PER_NODE >= 1, f"{c}.DISTRIBUTED.NUM_PROC_PER_NODE must be >= 1")
    _one_of(f"{c}.DISTRIBUTED.BACKEND", d.BACKEND, ("nccl", "gloo"))
    _require(d.TIMEOUT_SECONDS >= 1, f"{c}.DISTRIBUTED.TIMEOUT_SECONDS must be >= 1")
    _one_of(f"{c}.MACHINE.DEVICE", cfg.MACHINE.DEVICE, ("gpu", "cpu", "auto"))
    _require(cfg.OUTPUT_DIR != "", f"{c}.OUTPUT_DIR must not be empty")
    _require(cfg.LOG_FREQUENCY >= 1, f"{c}.LOG_FREQUENCY must be >= 1")
    _require(cfg.TEST_EVERY_NUM_EPOCH >= 1, f"{c}.TEST_EVERY_NUM_EPOCH must be >= 1")
    base.check_tensorboard(cfg.HOOKS.TENSORBOARD_SETUP, f"{c}.HOOKS.TENSORBOARD_SETUP")


def derive(cfg: BenchmarkConfig, world_size: int | None = None) -> BenchDerived:
    """The launch's world size against DISTRIBUTED, the global batch and the scaled LR schedule.
    Mutates `cfg` only to fill empty DATA_PATHS: from the dataset catalog (pirl.data.catalog),
    and DATA.TEST's from TRAIN for a sharded dataset."""
    dist = cfg.DISTRIBUTED
    configured = dist.NUM_NODES * dist.NUM_PROC_PER_NODE
    if world_size is not None and world_size != configured:
        raise ConfigError(
            f"the job runs {world_size} process(es) but config.DISTRIBUTED.NUM_NODES="
            f"{dist.NUM_NODES} x NUM_PROC_PER_NODE={dist.NUM_PROC_PER_NODE} = {configured}; "
            "the LR scaling depends on it: pass config.DISTRIBUTED.NUM_NODES=... "
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=... matching the launch"
        )
    from pirl.data.catalog import resolve

    train, test = cfg.DATA.TRAIN, cfg.DATA.TEST
    splits = [(train, "config.DATA.TRAIN"), (test, "config.DATA.TEST")]
    notes = resolve(cfg.DATA.DATASET_CATALOG, splits)
    if (
        train.DATA_PATHS
        and not test.DATA_PATHS
        and test.DATA_SOURCES == ["shards"] == train.DATA_SOURCES
    ):
        test.DATA_PATHS = list(train.DATA_PATHS)
        notes.append(
            f"DATA.TEST.DATA_PATHS -> {train.DATA_PATHS} (the '{test.SPLIT}' split of the "
            "sharded dataset in DATA.TRAIN.DATA_PATHS)"
        )
    batch = train.BATCHSIZE_PER_REPLICA
    factor, lr = base.scaled_lr_schedule(cfg.OPTIMIZER.param_schedulers.lr, batch * configured)
    return BenchDerived(
        world_size=configured,
        global_batch_size=batch * configured,
        batch_size_per_rank=batch,
        lr_scale_factor=factor,
        lr=lr,
        heads=head_names(cfg),
        notes=notes,
    )


def load(
    overrides: list[str], world_size: int | None = None
) -> tuple[BenchmarkConfig, BenchDerived]:
    """Compose over `benchmark_defaults`, validate, derive. `world_size` defaults to the
    launcher's WORLD_SIZE when set."""
    data = base.compose(overrides, primary="benchmark_defaults", schema=BenchmarkConfig)
    cfg = base.build_typed(BenchmarkConfig, data)
    check(cfg)
    if world_size is None and os.environ.get("WORLD_SIZE"):
        world_size = int(os.environ["WORLD_SIZE"])
    return cfg, derive(cfg, world_size)


def dump_yaml(cfg: BenchmarkConfig, derived: BenchDerived | None = None) -> str:
    data: dict = {"config": dataclasses.asdict(cfg)}
    if derived is not None:
        data["derived"] = dataclasses.asdict(derived)
    return redact(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
