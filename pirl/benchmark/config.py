"""Compose, validate and derive the benchmark config (the same machinery as `pirl train`)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import yaml

from pirl import config as base
from pirl.benchmark.schema import FEATURES, BenchmarkConfig
from pirl.fields import check_tree, one_of, require
from pirl.redaction import redact

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
    """Impossible values, each reported with the key that holds it: every field's rule and each
    section's (the sections `pirl train` shares), then the benchmark's own rules."""
    check_tree(cfg, "config")
    check_heads(cfg)
    for name, split in (("TRAIN", cfg.DATA.TRAIN), ("TEST", cfg.DATA.TEST)):
        dp = f"config.DATA.{name}"
        one_of(f"{dp}.LABEL_TYPE", split.LABEL_TYPE, ("standard",))
        one_of(f"{dp}.COLLATE_FUNCTION", split.COLLATE_FUNCTION, ("default_collate",))
        base.check_transforms(split, dp)
    fraction = cfg.LOW_SHOT.FRACTION
    require(
        fraction == 1 or cfg.DATA.TRAIN.DATA_SOURCES[0] != "shards",
        f"config.LOW_SHOT.FRACTION={fraction} needs each train sample's label up front, which a "
        "sharded dataset does not give: use DATA.TRAIN.DATA_SOURCES=[disk_folder] or "
        "[disk_filelist], or make the subset a dataset of its own (`pirl prep` from a list file)",
    )
    require(cfg.OUTPUT_DIR != "", "config.OUTPUT_DIR must not be empty")


def check_heads(cfg: BenchmarkConfig) -> None:
    """One head per LINEAR_EVAL_FEAT_POOL_OPS_MAP entry, each a linear classifier."""
    fp = "config.MODEL.FEATURE_EVAL_SETTINGS"
    ops, heads = (
        cfg.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP,
        cfg.MODEL.HEAD.PARAMS,
    )
    require(len(heads) >= 1, "config.MODEL.HEAD.PARAMS is empty: give at least one head")
    require(
        len(ops) == len(heads),
        f"{fp}.LINEAR_EVAL_FEAT_POOL_OPS_MAP has {len(ops)} entries but config.MODEL.HEAD.PARAMS "
        f"has {len(heads)} heads: one feature per head, in the same order",
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
        require(ok, f"{ep} must be [feature, [op, [args]]], got {entry!r}")
        feature, (op, args) = entry
        one_of(f"{ep}[0]", feature, FEATURES)
        one_of(f"{ep}[1][0]", op, tuple(POOL_OPS))
        lo, hi = POOL_OPS[op]
        require(lo <= len(args) <= hi, f"{ep}[1][1]: {op} takes {lo}..{hi} arguments, got {args}")
    for i, head in enumerate(heads):
        hp = f"config.MODEL.HEAD.PARAMS[{i}]"
        require(
            isinstance(head, list) and len(head) == 2 and isinstance(head[1], dict),
            f"{hp} must be [eval_mlp|mlp, {{kwargs}}], got {head!r}",
        )
        one_of(f"{hp}[0]", head[0], tuple(HEAD_KWARGS))
        for key in head[1]:
            one_of(f"{hp}[1].{key}", key, tuple(HEAD_KWARGS[head[0]]))
        dims = head[1].get("dims")
        require(
            isinstance(dims, list) and len(dims) == 2 and all(isinstance(d, int) for d in dims),
            f"{hp}[1].dims must be [in, out] (a linear classifier), got {dims!r}",
        )


def derive(
    cfg: BenchmarkConfig, world_size: int | None = None
) -> tuple[BenchmarkConfig, BenchDerived]:
    """The global batch and the scaled LR schedule (`world_size`, when given, is checked against
    DISTRIBUTED). Pure: returns a resolved copy of `cfg` (empty DATA_PATHS filled from the dataset
    catalog, pirl.data.catalog, and DATA.TEST's from TRAIN for a sharded dataset) and the `BenchDerived` record."""
    if world_size is not None:
        base.check_world_size(cfg, world_size)
    cfg = copy.deepcopy(cfg)
    world = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
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
    factor, lr = base.scaled_lr_schedule(cfg.OPTIMIZER.param_schedulers.lr, batch * world)
    derived = BenchDerived(
        world_size=world,
        global_batch_size=batch * world,
        batch_size_per_rank=batch,
        lr_scale_factor=factor,
        lr=lr,
        heads=head_names(cfg),
        notes=notes,
    )
    return cfg, derived


def load(
    overrides: list[str], world_size: int | None = None
) -> tuple[BenchmarkConfig, BenchDerived]:
    """Compose over `benchmark_defaults`, validate, derive; `world_size`, when given, is checked
    against the config (the launcher's environment is read by `pirl.dist` alone)."""
    data = base.compose(overrides, primary="benchmark_defaults", schema=BenchmarkConfig)
    cfg = base.build_typed(BenchmarkConfig, data)
    check(cfg)
    base.warn_vissl_only(cfg)
    return derive(cfg, world_size)


def dump_yaml(cfg: BenchmarkConfig, derived: BenchDerived | None = None) -> str:
    data: dict = {"config": dataclasses.asdict(cfg)}
    if derived is not None:
        data["derived"] = dataclasses.asdict(derived)
    return redact(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
