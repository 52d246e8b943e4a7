"""Compose presets and overrides with Hydra, validate against the typed schema, derive values.

The command line is VISSL's: `config=pretrain/pirl/pirl_jigsaw_4node_resnet50` picks a preset,
`+config/pretrain/pirl/models=resnet50_mlphead` appends a group file (merged after the preset,
lists replaced whole), and `config.LOSS.nce_loss_with_memory.temperature=0.05` overrides a value
(applied last, so it wins). Every derived value (world size, global batch, the scaled LR
schedule, head input sizes, the memory size) is computed in `derive`, and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pirl.errors import ConfigError
from pirl.redaction import redact
from pirl.schema import Config

CONFIG_DIR = Path(__file__).parent / "configs"
log = logging.getLogger("pirl")

TRUNK_DEPTHS = {
    18: "basic",
    34: "basic",
    50: "bottleneck",
    101: "bottleneck",
    152: "bottleneck",
    200: "bottleneck",
}
WIDTH_MULTIPLIERS = (1, 2, 3, 4)
TRUNK_INITS = ("pytorch_default", "kaiming_fan_out")  # see pirl.models.ResNetTrunk
HEAD_MODULES = {
    "mlp": {"dims", "use_bn", "use_relu", "use_dropout", "use_bias", "skip_last_layer_relu_bn"},
    "siamese_concat_view": {"num_towers"},
}
HEAD_FEATURES = ("flatten", "res5avg")  # trunk features a head may read (both: pooled res5)
DATA_SOURCES = ("disk_folder", "disk_filelist", "shards", "synthetic")
COLLATORS = ("default_collate", "patch_and_image_collator")
LR_SCHEDULES = ("cosine", "multistep", "linear", "constant")
# Sanity bounds: far above any real run (the seed's largest: batch 32 per GPU, LR 0.12), low
# enough that a typo (an extra zero or ten) is an error instead of a run that overflows.
MAX_BATCH_PER_REPLICA = 65536
MAX_LR = 100.0


# ----------------------------------------------------------------------------------------------
# Composition


def available_presets() -> list[str]:
    root = CONFIG_DIR / "config"
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*.yaml")
        if p.parent.name not in ("transforms", "models", "epochs", "optimizations")
    )


def compose(overrides: list[str], primary: str = "defaults", schema: type = Config) -> dict:
    """Hydra composition of `overrides` over the primary config `primary`.yaml (whose defaults
    list starts with the schema's defaults, stored as `<primary>_schema`); returns the plain
    `config:` dict, not yet validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    refuse_sweeps(overrides)
    refuse_interpolations(overrides)
    ConfigStore.instance().store(
        name=f"{primary}_schema", node={"config": dataclasses.asdict(schema())}
    )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = hydra_compose(config_name=primary, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_explain_compose_error(exc, overrides, schema)) from None
    finally:
        GlobalHydra.instance().clear()
    data = OmegaConf.to_container(composed, resolve=True)
    extra = sorted(set(data) - {"config"})
    if extra:
        raise ConfigError(
            f"unknown top-level key(s) {extra}: every key lives under 'config.' "
            f"(e.g. config.{extra[0]}=...)"
        )
    return data["config"]


def refuse_sweeps(overrides: list[str]) -> None:
    """A Hydra sweep (`key=a,b`, `key=range(...)`, `key=choice(...)`) asks for several runs, which
    VISSL's launcher runs one after another; here one command is one run: say so, and how."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException:
            continue  # a syntax error: composing reports it
        if not override.is_sweep_override():
            continue
        raise ConfigError(
            f"{text!r} is a sweep over {override.get_key_element()}: one command is one run here "
            "(no Hydra multirun, no VISSL sweep_<i>/ folders); start one run per value, each "
            "with its own config.CHECKPOINT.DIR (a list value is written key=[a,b], a string "
            "holding a comma is quoted: key='a,b')"
        )


def refuse_interpolations(overrides: list[str]) -> None:
    """Command-line values are literal: an interpolation such as ${oc.env:NAME} would resolve
    environment variables (the storage Secret's among them) into the config and its logs."""
    for ov in overrides:
        if "${" in ov.partition("=")[2]:
            raise ConfigError(
                f"the override {ov!r} holds an interpolation (${{...}}): command-line values are "
                "taken literally, give the value itself"
            )


def _explain_compose_error(exc: Exception, overrides: list[str], schema: type = Config) -> str:
    from hydra.errors import OverrideParseException

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OverrideParseException):
        culprit = next((ov for ov in overrides if ov in str(exc)), None)
        return (
            f"cannot parse the override {culprit or ''!r}: {text} (characters such as ; ' \" "
            "need quoting, e.g. 'config.KEY=\"a;b\"')"
        )
    if "You must specify 'config'" in str(exc):
        return "no preset chosen: pass config=<preset>, one of:\n  " + "\n  ".join(
            available_presets()
        )
    if "Could not find 'config/" in str(exc) or "Could not load 'config/" in str(exc):
        return f"{text}\navailable presets:\n  " + "\n  ".join(available_presets())
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key.startswith("config.") and key in str(exc):
            hint = suggest_key(key, schema)
            return f"unknown config key '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
    return text


def suggest_key(dotted: str, schema: type = Config) -> str | None:
    """Closest valid dotted key to `dotted` (e.g. a typo in an override)."""
    parts = dotted.split(".")
    prefix = []
    if parts and parts[0] == "config":
        prefix, parts = ["config"], parts[1:]
    cls: Any = schema
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            if not close:
                close = [n for n in names if n.lower() == part.lower()]
            if not close:
                return None
            return ".".join(prefix + parts[:i] + [close[0]] + parts[i + 1 :])
        cls = typing.get_type_hints(cls)[part]
    return None


# ----------------------------------------------------------------------------------------------
# Validation: dict -> typed Config


def build(data: dict) -> Config:
    """Check every key and type of `data` against the schema and return the typed Config."""
    cfg = build_typed(Config, data)
    check(cfg)
    return cfg


def build_typed(schema: type, data: dict) -> Any:
    """`data` (a composed `config:` dict) as an instance of the dataclass `schema`: unknown keys
    (with the closest valid key suggested) and wrong types are ConfigErrors naming the key."""
    return _build_dataclass(schema, data, "config")


def _build_dataclass(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{path}.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}.{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{path}.{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{path} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"schema type {tp} at {path} is not handled")  # a bug in schema.py


def _one_of(path: str, value: Any, allowed: tuple | list | set) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}={value!r} is not supported; use one of {sorted(allowed)}{hint}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check(cfg: Config) -> None:
    """Impossible values, each reported with the key that holds it."""
    c = "config"
    loss = cfg.LOSS.nce_loss_with_memory
    lp = f"{c}.LOSS.nce_loss_with_memory"
    _one_of(f"{c}.LOSS.name", cfg.LOSS.name, ("nce_loss_with_memory",))
    _one_of(f"{lp}.loss_type", loss.loss_type, ("nce", "cross_entropy"))
    _require(loss.temperature > 0, f"{lp}.temperature must be > 0, got {loss.temperature}")
    neg = loss.negative_sampling_params
    _require(neg.num_negatives > 0, f"{lp}.negative_sampling_params.num_negatives must be > 0")
    _one_of(f"{lp}.negative_sampling_params.type", neg.type, ("random", "shared"))
    _require(
        not (neg.exclude_positive and neg.type == "shared"),
        f"{lp}.negative_sampling_params.exclude_positive needs type=random (shared negatives are one set per step)",
    )
    mem = loss.memory_params
    _require(
        0.0 <= mem.momentum < 1.0,
        f"{lp}.memory_params.momentum must be in [0, 1), got {mem.momentum}",
    )
    _require(mem.embedding_dim > 0, f"{lp}.memory_params.embedding_dim must be > 0")
    _one_of(f"{lp}.memory_params.init_sync", mem.init_sync, ("broadcast", "average"))
    _one_of(f"{lp}.memory_params.duplicate_update", mem.duplicate_update, ("last", "mean"))
    _one_of(f"{lp}.memory_params.dtype", mem.dtype, ("float32", "float16", "bfloat16"))
    _require(
        loss.norm_constant < 0 or loss.norm_constant > 0,
        f"{lp}.norm_constant must be > 0 (fixed Z) or < 0 (estimate Z from the first batch), got 0",
    )

    r = cfg.MODEL.TRUNK.RESNETS
    rp = f"{c}.MODEL.TRUNK.RESNETS"
    _one_of(f"{c}.MODEL.TRUNK.NAME", cfg.MODEL.TRUNK.NAME, ("resnet",))
    _one_of(f"{rp}.DEPTH", r.DEPTH, tuple(TRUNK_DEPTHS))
    _one_of(f"{rp}.WIDTH_MULTIPLIER", r.WIDTH_MULTIPLIER, WIDTH_MULTIPLIERS)
    _one_of(f"{rp}.NORM", r.NORM, ("BatchNorm",))
    _require(
        r.GROUPS >= 1 and r.WIDTH_PER_GROUP >= 1, f"{rp}.GROUPS and WIDTH_PER_GROUP must be >= 1"
    )
    _require(
        TRUNK_DEPTHS[r.DEPTH] == "bottleneck" or (r.GROUPS == 1 and r.WIDTH_PER_GROUP == 64),
        f"{rp}.GROUPS/WIDTH_PER_GROUP (ResNeXt) need a bottleneck depth (50/101/152/200), got DEPTH={r.DEPTH}",
    )
    _one_of(f"{rp}.LAYER4_STRIDE", r.LAYER4_STRIDE, (1, 2))
    _one_of(f"{rp}.INIT", r.INIT, TRUNK_INITS)
    _one_of(
        f"{c}.MODEL.AMP_PARAMS.AMP_DTYPE", cfg.MODEL.AMP_PARAMS.AMP_DTYPE, ("bfloat16", "float16")
    )

    heads = cfg.MODEL.HEAD.PARAMS
    _require(len(heads) >= 1, f"{c}.MODEL.HEAD.PARAMS is empty: the model needs at least one head")
    for i, head in enumerate(heads):
        hp = f"{c}.MODEL.HEAD.PARAMS[{i}]"
        _require(
            isinstance(head, list) and head,
            f"{hp} must be [name, {{kwargs}}] or a non-empty list of them",
        )
        single = isinstance(head[0], str)
        for j, module in enumerate(head_modules(head)):
            mp = hp if single else f"{hp}[{j}]"
            _require(
                isinstance(module, list) and len(module) == 2 and isinstance(module[1], dict),
                f"{mp} must be exactly [name, {{kwargs}}], got {module!r} (a key outside the "
                "kwargs mapping would be silently ignored by VISSL; move it inside)",
            )
            name, kwargs = module
            _one_of(f"{mp}[0]", name, tuple(HEAD_MODULES))
            for key in kwargs:
                _one_of(f"{mp}[1].{key}", key, tuple(HEAD_MODULES[name]))
            if name == "mlp":
                dims = kwargs.get("dims")
                _require(
                    isinstance(dims, list)
                    and len(dims) >= 2
                    and all(isinstance(d, int) and d > 0 for d in dims),
                    f"{mp}[1].dims must be a list of >= 2 positive integers, got {dims!r}",
                )
            else:
                towers = kwargs.get("num_towers")
                _require(
                    isinstance(towers, int) and towers >= 1,
                    f"{mp}[1].num_towers must be a positive integer",
                )

    mapping = cfg.MODEL.MULTI_INPUT_HEAD_MAPPING
    keys = cfg.DATA.TRAIN.INPUT_KEY_NAMES
    if mapping:
        _require(
            len(mapping) == len(heads),
            f"{c}.MODEL.MULTI_INPUT_HEAD_MAPPING has {len(mapping)} entries but HEAD.PARAMS has {len(heads)} heads",
        )
        for i, entry in enumerate(mapping):
            _require(
                isinstance(entry, list) and len(entry) == 2 and entry[0] in keys,
                f"{c}.MODEL.MULTI_INPUT_HEAD_MAPPING[{i}] must be [input_key, [feature]] with input_key in "
                f"DATA.TRAIN.INPUT_KEY_NAMES {keys}, got {entry!r}",
            )
            _require(
                isinstance(entry[1], list) and len(entry[1]) == 1 and entry[1][0] in HEAD_FEATURES,
                f"{c}.MODEL.MULTI_INPUT_HEAD_MAPPING[{i}] feature {entry[1]!r} is not supported: "
                "every head reads the trunk's pooled res5 output, which VISSL names flatten (or "
                "res5avg, the same values); use [flatten]",
            )
    else:
        _require(
            len(heads) == 1,
            f"{c}.MODEL.HEAD.PARAMS has {len(heads)} heads but no MULTI_INPUT_HEAD_MAPPING",
        )
    n_out = len(heads)
    _require(
        len(loss.loss_weights) == n_out,
        f"{lp}.loss_weights has {len(loss.loss_weights)} entries but the model has {n_out} output(s) "
        f"({', '.join(output_names(cfg))}); give one weight per output",
    )
    if not mem.update_mem_on_forward:
        _require(
            0 <= loss.update_mem_with_emb_index < n_out,
            f"{lp}.update_mem_with_emb_index={loss.update_mem_with_emb_index} must name a model output "
            f"(0..{n_out - 1}) when memory_params.update_mem_on_forward is false",
        )

    d = cfg.DATA.TRAIN
    dp = f"{c}.DATA.TRAIN"
    for src in d.DATA_SOURCES:
        _one_of(f"{dp}.DATA_SOURCES", src, DATA_SOURCES)
    _require(
        len(d.DATA_SOURCES) == 1,
        f"{dp}.DATA_SOURCES must name exactly one source, got {d.DATA_SOURCES}",
    )
    _one_of(f"{dp}.COLLATE_FUNCTION", d.COLLATE_FUNCTION, COLLATORS)
    _one_of(f"{dp}.LABEL_TYPE", d.LABEL_TYPE, ("sample_index", "standard"))
    _require(
        1 <= d.BATCHSIZE_PER_REPLICA <= MAX_BATCH_PER_REPLICA,
        f"{dp}.BATCHSIZE_PER_REPLICA must be in [1, {MAX_BATCH_PER_REPLICA}], "
        f"got {d.BATCHSIZE_PER_REPLICA}",
    )
    _require(cfg.DATA.NUM_DATALOADER_WORKERS >= 0, f"{c}.DATA.NUM_DATALOADER_WORKERS must be >= 0")
    check_data_limit(d, dp)
    if d.COLLATE_FUNCTION == "patch_and_image_collator":
        _require(
            sorted(keys) == ["images", "patches"],
            f"{dp}.INPUT_KEY_NAMES must be [patches, images] with patch_and_image_collator, got {keys}",
        )
    from pirl.transforms import build_transform  # validates every transform and its params

    build_transform(d.TRANSFORMS, f"{dp}.TRANSFORMS")
    if d.TRANSFORMS_ON_DEVICE:
        from pirl.device_transforms import build_device_transform

        build_device_transform(
            d.TRANSFORMS, d.COLLATE_FUNCTION, d.INPUT_KEY_NAMES, f"{dp}.TRANSFORMS"
        )

    check_optimizer(cfg.OPTIMIZER, f"{c}.OPTIMIZER")

    dist = cfg.DISTRIBUTED
    _require(dist.NUM_NODES >= 1, f"{c}.DISTRIBUTED.NUM_NODES must be >= 1")
    _require(dist.NUM_PROC_PER_NODE >= 1, f"{c}.DISTRIBUTED.NUM_PROC_PER_NODE must be >= 1")
    _one_of(f"{c}.DISTRIBUTED.BACKEND", dist.BACKEND, ("nccl", "gloo"))
    _require(dist.TIMEOUT_SECONDS >= 1, f"{c}.DISTRIBUTED.TIMEOUT_SECONDS must be >= 1")
    _one_of(f"{c}.MACHINE.DEVICE", cfg.MACHINE.DEVICE, ("gpu", "cpu", "auto"))
    _require(cfg.CHECKPOINT.KEEP_LAST >= 1, f"{c}.CHECKPOINT.KEEP_LAST must be >= 1")
    _require(
        cfg.CHECKPOINT.CHECKPOINT_FREQUENCY >= 1,
        f"{c}.CHECKPOINT.CHECKPOINT_FREQUENCY must be >= 1",
    )
    _require(cfg.CHECKPOINT.DIR != "", f"{c}.CHECKPOINT.DIR must not be empty")
    _require(cfg.LOG_FREQUENCY >= 1, f"{c}.LOG_FREQUENCY must be >= 1")
    check_tensorboard(cfg.HOOKS.TENSORBOARD_SETUP, f"{c}.HOOKS.TENSORBOARD_SETUP")


def check_tensorboard(tb, tp: str) -> None:
    """VISSL's HOOKS.TENSORBOARD_SETUP (pretraining and benchmark alike)."""
    _require(tb.FLUSH_EVERY_N_MIN > 0, f"{tp}.FLUSH_EVERY_N_MIN must be > 0 (minutes)")
    _require(
        tb.LOG_PARAMS_EVERY_N_ITERS == -1 or tb.LOG_PARAMS_EVERY_N_ITERS >= 1,
        f"{tp}.LOG_PARAMS_EVERY_N_ITERS must be >= 1, or -1 (at epoch ends only)",
    )
    _require(
        tb.EXPERIMENT_LOG_DIR != "" and tb.LOG_DIR != "",
        f"{tp}.LOG_DIR and EXPERIMENT_LOG_DIR must not be empty",
    )
    if tb.USE_TENSORBOARD:
        import importlib.util

        _require(
            importlib.util.find_spec("tensorboard") is not None,
            f"{tp}.USE_TENSORBOARD=true needs the tensorboard package: pip install "
            "'pirl[tensorboard]' (or set it to false)",
        )


def check_data_limit(d, dp: str) -> None:
    """DATA_LIMIT and VISSL's DATA_LIMIT_SAMPLING keys, for pretraining and benchmark splits."""
    _require(d.DATA_LIMIT == -1 or d.DATA_LIMIT >= 1, f"{dp}.DATA_LIMIT must be -1 (all) or >= 1")
    sampling = d.DATA_LIMIT_SAMPLING
    _require(
        not sampling.IS_BALANCED,
        f"{dp}.DATA_LIMIT_SAMPLING.IS_BALANCED=true (a class-balanced subset) is not supported: "
        "set it to false for a uniform random subset",
    )
    _require(
        sampling.SKIP_NUM_SAMPLES == 0,
        f"{dp}.DATA_LIMIT_SAMPLING.SKIP_NUM_SAMPLES is not supported: remove it (DATA_LIMIT "
        "draws its subset at random, seeded by DATA_LIMIT_SAMPLING.SEED)",
    )
    _require(
        d.DATA_LIMIT < 0 or d.DATA_SOURCES[0] != "shards" or sampling.SEED == 0,
        f"{dp}.DATA_LIMIT_SAMPLING.SEED={sampling.SEED}: on shards, DATA_LIMIT takes the first "
        "samples of the dataset's own random order (set by `pirl prep --seed`); for another "
        "subset re-run prep with another --seed, or remove DATA_LIMIT_SAMPLING.SEED",
    )


def check_optimizer(o, op: str) -> None:
    """The SGD and LR-schedule values of an OPTIMIZER block (pretraining and benchmark alike)."""
    _one_of(f"{op}.name", o.name, ("sgd",))
    _require(o.num_epochs >= 1, f"{op}.num_epochs must be >= 1, got {o.num_epochs}")
    _require(
        o.weight_decay >= 0 and o.momentum >= 0, f"{op}.weight_decay and momentum must be >= 0"
    )
    _require(
        not o.nesterov or o.momentum > 0, f"{op}.nesterov needs momentum > 0 (torch's SGD rule)"
    )
    lr = o.param_schedulers.lr
    sp = f"{op}.param_schedulers.lr"
    _one_of(f"{sp}.name", lr.name, LR_SCHEDULES)
    _one_of(f"{sp}.update_interval", lr.update_interval, ("epoch", "step"))
    _one_of(
        f"{sp}.auto_lr_scaling.scaling_type", lr.auto_lr_scaling.scaling_type, ("linear", "sqrt")
    )
    _require(
        lr.auto_lr_scaling.base_lr_batch_size >= 1,
        f"{sp}.auto_lr_scaling.base_lr_batch_size must be >= 1",
    )
    if lr.name == "multistep":
        _require(
            len(lr.values) == len(lr.milestones) + 1,
            f"{sp}.values needs one more entry than milestones, got {len(lr.values)} values and {len(lr.milestones)} milestones",
        )
        _require(lr.milestones == sorted(lr.milestones), f"{sp}.milestones must be increasing")
    if lr.name == "cosine":
        _require(lr.start_value > 0, f"{sp}.start_value must be > 0 for the cosine schedule")


def head_modules(head: list) -> list:
    """The [name, kwargs] modules of one HEAD.PARAMS entry, which VISSL accepts in two forms: a
    list of modules run in sequence, or a single module ([["mlp", {...}]] as PARAMS)."""
    return [head] if head and isinstance(head[0], str) else head


def output_names(cfg: Config) -> list[str]:
    """Names of the model outputs, in the order loss_weights and update_mem_with_emb_index use."""
    if cfg.MODEL.MULTI_INPUT_HEAD_MAPPING:
        return [entry[0] for entry in cfg.MODEL.MULTI_INPUT_HEAD_MAPPING]
    return [cfg.DATA.TRAIN.INPUT_KEY_NAMES[0]]


# ----------------------------------------------------------------------------------------------
# Derived values


@dataclass
class Derived:
    """Values computed from the config and the run; printed by --dry-run under `derived:`."""

    world_size: int
    global_batch_size: int
    batch_size_per_rank: int
    lr_scale_factor: float
    lr: dict
    trunk_output_dim: int
    num_train_samples: int  # -1 until the dataset is opened
    notes: list[str] = field(default_factory=list)


def trunk_output_dim(cfg: Config) -> int:
    r = cfg.MODEL.TRUNK.RESNETS
    base = 2048 if TRUNK_DEPTHS[r.DEPTH] == "bottleneck" else 512
    return base * r.WIDTH_MULTIPLIER


def derive(
    cfg: Config, world_size: int | None = None, num_train_samples: int | None = None
) -> Derived:
    """Fill in what follows from the config: LR scaling, head input sizes, memory size.

    Mutates `cfg` where VISSL also rewrites the config (head input dims, num_train_samples,
    memory_size) and returns everything else as a `Derived` record.
    """
    dist = cfg.DISTRIBUTED
    configured_world = dist.NUM_NODES * dist.NUM_PROC_PER_NODE
    if world_size is not None and world_size != configured_world:
        raise ConfigError(
            f"the job runs {world_size} process(es) but config.DISTRIBUTED.NUM_NODES="
            f"{dist.NUM_NODES} x NUM_PROC_PER_NODE={dist.NUM_PROC_PER_NODE} = {configured_world}; "
            f"the LR scaling and batch depend on it: pass config.DISTRIBUTED.NUM_NODES=... "
            f"config.DISTRIBUTED.NUM_PROC_PER_NODE=... matching the launch"
        )
    from pirl.data.catalog import resolve

    notes = resolve(cfg.DATA.DATASET_CATALOG, [(cfg.DATA.TRAIN, "config.DATA.TRAIN")])
    batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    global_batch = batch * configured_world

    # Heads: the first layer's input follows the trunk (the seed's w2 command keeps 2048-d heads).
    out_dim = trunk_output_dim(cfg)
    loss = cfg.LOSS.nce_loss_with_memory
    for i, head in enumerate(cfg.MODEL.HEAD.PARAMS):
        dim = out_dim
        for j, (name, kwargs) in enumerate(head_modules(head)):
            if name == "mlp":
                if kwargs["dims"][0] != dim:
                    notes.append(
                        f"MODEL.HEAD.PARAMS[{i}][{j}] input {kwargs['dims'][0]} -> {dim} "
                        f"(follows the {'trunk' if j == 0 else 'previous layer'} output)"
                    )
                    kwargs["dims"] = [dim] + list(kwargs["dims"][1:])
                dim = kwargs["dims"][-1]
            else:
                dim = dim * kwargs["num_towers"]
        if dim != loss.memory_params.embedding_dim:
            raise ConfigError(
                f"config.MODEL.HEAD.PARAMS[{i}] outputs {dim}-d embeddings but "
                f"config.LOSS.nce_loss_with_memory.memory_params.embedding_dim="
                f"{loss.memory_params.embedding_dim}; make the last head layer match the memory bank"
            )

    if num_train_samples is not None:
        if loss.num_train_samples not in (-1, num_train_samples):
            notes.append(
                f"num_train_samples {loss.num_train_samples} -> {num_train_samples} (dataset length)"
            )
        loss.num_train_samples = num_train_samples
        loss.memory_params.memory_size = num_train_samples
        k = loss.negative_sampling_params.num_negatives
        if k >= num_train_samples:
            # Legal in VISSL (negatives are drawn with replacement; its quick_pirl draws 4,096
            # from 500 images), but every step then scores each row of the bank several times.
            message = (
                f"negative_sampling_params.num_negatives={k} >= the dataset's {num_train_samples} "
                "samples: negatives are drawn with replacement, so each bank row repeats ~"
                f"{k / num_train_samples:.1f} times per sample"
            )
            notes.append(message)
            log.warning("config: %s", message)
        if loss.negative_sampling_params.exclude_positive and num_train_samples < 2:
            raise ConfigError(
                "config.LOSS.nce_loss_with_memory.negative_sampling_params.exclude_positive needs "
                f"a dataset of at least 2 samples, got {num_train_samples}"
            )

    sched = cfg.OPTIMIZER.param_schedulers.lr
    factor, lr = scaled_lr_schedule(sched, global_batch)
    if sched.auto_lr_scaling.auto_scale:  # an LR given as is (auto_scale=false) is the user's
        check_lr_values(lr, global_batch)
    return Derived(
        world_size=configured_world,
        global_batch_size=global_batch,
        batch_size_per_rank=batch,
        lr_scale_factor=factor,
        lr=lr,
        trunk_output_dim=out_dim,
        num_train_samples=num_train_samples if num_train_samples is not None else -1,
        notes=notes,
    )


def check_lr_values(lr: dict, global_batch: int) -> None:
    values = [lr.get(k) for k in ("start_value", "end_value", "value")] + lr.get("values", [])
    for value in values:
        if value is not None and not (math.isfinite(value) and abs(value) <= MAX_LR):
            raise ConfigError(
                f"the learning rate would be {value:g} (global batch {global_batch}, "
                f"config.OPTIMIZER.param_schedulers.lr scaled by auto_lr_scaling): more than "
                f"{MAX_LR:g}; lower the batch size or lr.auto_lr_scaling.base_value"
            )


def scaled_lr_schedule(sched, global_batch: int) -> tuple[float, dict]:
    """VISSL's auto_lr_scaling: returns (factor, the schedule with scaled values)."""
    scaling = sched.auto_lr_scaling
    lr: dict[str, Any] = {"name": sched.name, "update_interval": sched.update_interval}
    if sched.name == "cosine":
        lr.update(start_value=sched.start_value, end_value=sched.end_value)
    elif sched.name == "multistep":
        lr.update(values=list(sched.values), milestones=list(sched.milestones))
    elif sched.name == "linear":
        lr.update(start_value=sched.start_value, end_value=sched.end_value)
    else:
        lr.update(value=sched.value)
    if not scaling.auto_scale:
        return 1.0, lr
    factor = global_batch / scaling.base_lr_batch_size
    if scaling.scaling_type == "sqrt":
        factor = math.sqrt(factor)
    scaled = scaling.base_value * factor
    if sched.name == "cosine":
        ratio = sched.end_value / sched.start_value
        lr.update(start_value=scaled, end_value=scaled * ratio)
    elif sched.name == "multistep":
        gamma = sched.values[1] / sched.values[0] if len(sched.values) > 1 else 1.0
        lr["values"] = [scaled * gamma**i for i in range(len(sched.values))]
    elif sched.name == "linear":
        lr["end_value"] = scaled
    else:
        lr["value"] = scaled
    return factor, lr


def lr_at(lr: dict, epoch: float, num_epochs: int) -> float:
    """The LR at (possibly fractional) `epoch` of the derived schedule `lr`."""
    if lr["update_interval"] == "epoch":
        epoch = math.floor(epoch)
    name = lr["name"]
    if name == "cosine":
        start, end = lr["start_value"], lr["end_value"]
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * epoch / num_epochs))
    if name == "multistep":
        return lr["values"][sum(1 for m in lr["milestones"] if epoch >= m)]
    if name == "linear":
        return lr["start_value"] + (lr["end_value"] - lr["start_value"]) * epoch / num_epochs
    return lr["value"]


# ----------------------------------------------------------------------------------------------
# Entry points


def override_parser(prog: str, description: str, overrides_help: str) -> argparse.ArgumentParser:
    """The command line every config-driven entry point shares: Hydra overrides, --dry-run,
    --world-size (parse with `parse_intermixed_args`, so options may follow the overrides)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the composed config and derived values as YAML, then exit",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="(dry run) check the config against this many processes",
    )
    return parser


def load(overrides: list[str], world_size: int | None = None) -> tuple[Config, Derived]:
    """Compose, validate and derive. `world_size` defaults to the launcher's WORLD_SIZE if set."""
    cfg = build(compose(overrides))
    if world_size is None and os.environ.get("WORLD_SIZE"):
        world_size = int(os.environ["WORLD_SIZE"])
    return cfg, derive(cfg, world_size)


def to_dict(cfg: Config) -> dict:
    return {"config": dataclasses.asdict(cfg)}


def dump_yaml(cfg: Config, derived: Derived | None = None) -> str:
    """The config as YAML, credentials in URLs removed (it goes to logs, checkpoints and files)."""
    data = to_dict(cfg)
    if derived is not None:
        data["derived"] = dataclasses.asdict(derived)
    return redact(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
