"""Compose presets and overrides with Hydra, validate against the typed schema, derive values.

The command line is VISSL's: `config=pretrain/pirl/pirl_jigsaw_4node_resnet50` picks a preset,
`+config/pretrain/pirl/models=resnet50_mlphead` appends a group file (merged after the preset,
lists replaced whole), and `config.LOSS.nce_loss_with_memory.temperature=0.05` overrides a value
(applied last, so it wins). Every derived value (world size, global batch, the scaled LR
schedule, head input sizes) is computed in `derive`, the dataset's (the memory size) in
`fit_dataset`, and nowhere else; both return copies and leave their input as it was.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pirl.errors import ConfigError
from pirl.fields import check_tree, one_of, require, vissl_only_values
from pirl.redaction import redact
from pirl.schema import TRUNK_DEPTHS, TRUNK_INITS, WIDTH_MULTIPLIERS, Config, DataSplit

__all__ = [
    "TRUNK_DEPTHS",
    "TRUNK_INITS",
    "WIDTH_MULTIPLIERS",
]  # the schema's, re-exported for their readers

CONFIG_DIR = Path(__file__).parent / "configs"
log = logging.getLogger("pirl")

HEAD_MODULES = {
    "mlp": {"dims", "use_bn", "use_relu", "use_dropout", "use_bias", "skip_last_layer_relu_bn"},
    "siamese_concat_view": {"num_towers"},
}
HEAD_FEATURES = ("flatten", "res5avg")  # trunk features a head may read (both: pooled res5)
# Sanity bound: far above any real run (the seed's largest LR: 0.12), low enough that a typo (an
# extra zero or ten) is an error instead of a run that overflows.
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
    assert isinstance(data, dict)  # a composed config is a mapping
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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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


def check(cfg: Config) -> None:
    """Impossible values, each reported with the key that holds it: every field's rule and each
    section's (`pirl.schema`), then the few rules between sections."""
    check_tree(cfg, "config")
    check_heads(cfg)
    check_outputs(cfg)
    check_transforms(cfg.DATA.TRAIN, "config.DATA.TRAIN")


def check_heads(cfg: Config) -> None:
    """MODEL.HEAD.PARAMS (VISSL's [name, {kwargs}] modules) and MULTI_INPUT_HEAD_MAPPING."""
    heads = cfg.MODEL.HEAD.PARAMS
    require(len(heads) >= 1, "config.MODEL.HEAD.PARAMS is empty: the model needs at least one head")
    for i, head in enumerate(heads):
        hp = f"config.MODEL.HEAD.PARAMS[{i}]"
        require(
            isinstance(head, list) and len(head) > 0,
            f"{hp} must be [name, {{kwargs}}] or a non-empty list of them",
        )
        single = isinstance(head[0], str)
        for j, module in enumerate(head_modules(head)):
            check_head_module(module, hp if single else f"{hp}[{j}]")

    mapping, keys = cfg.MODEL.MULTI_INPUT_HEAD_MAPPING, cfg.DATA.TRAIN.INPUT_KEY_NAMES
    mp = "config.MODEL.MULTI_INPUT_HEAD_MAPPING"
    if not mapping:
        require(
            len(heads) == 1,
            f"config.MODEL.HEAD.PARAMS has {len(heads)} heads but no MULTI_INPUT_HEAD_MAPPING",
        )
        return
    require(
        len(mapping) == len(heads),
        f"{mp} has {len(mapping)} entries but HEAD.PARAMS has {len(heads)} heads",
    )
    for i, entry in enumerate(mapping):
        require(
            isinstance(entry, list) and len(entry) == 2 and entry[0] in keys,
            f"{mp}[{i}] must be [input_key, [feature]] with input_key in "
            f"DATA.TRAIN.INPUT_KEY_NAMES {keys}, got {entry!r}",
        )
        require(
            isinstance(entry[1], list) and len(entry[1]) == 1 and entry[1][0] in HEAD_FEATURES,
            f"{mp}[{i}] feature {entry[1]!r} is not supported: every head reads the trunk's "
            "pooled res5 output, which VISSL names flatten (or res5avg, the same values); use "
            "[flatten]",
        )


def check_head_module(module: Any, mp: str) -> None:
    require(
        isinstance(module, list) and len(module) == 2 and isinstance(module[1], dict),
        f"{mp} must be exactly [name, {{kwargs}}], got {module!r} (a key outside the "
        "kwargs mapping would be silently ignored by VISSL; move it inside)",
    )
    name, kwargs = module
    one_of(f"{mp}[0]", name, tuple(HEAD_MODULES))
    for key in kwargs:
        one_of(f"{mp}[1].{key}", key, tuple(HEAD_MODULES[name]))
    if name == "mlp":
        dims = kwargs.get("dims")
        require(
            isinstance(dims, list)
            and len(dims) >= 2
            and all(isinstance(d, int) and d > 0 for d in dims),
            f"{mp}[1].dims must be a list of >= 2 positive integers, got {dims!r}",
        )
    else:
        towers = kwargs.get("num_towers")
        require(
            isinstance(towers, int) and towers >= 1,
            f"{mp}[1].num_towers must be a positive integer, got {towers!r}",
        )


def check_outputs(cfg: Config) -> None:
    """The loss's per-output keys against the model's outputs (one per head)."""
    loss, lp = cfg.LOSS.nce_loss_with_memory, "config.LOSS.nce_loss_with_memory"
    n_out = len(cfg.MODEL.HEAD.PARAMS)
    require(
        len(loss.loss_weights) == n_out,
        f"{lp}.loss_weights has {len(loss.loss_weights)} entries but the model has {n_out} "
        f"output(s) ({', '.join(output_names(cfg))}); give one weight per output",
    )
    if not loss.memory_params.update_mem_on_forward:
        require(
            0 <= loss.update_mem_with_emb_index < n_out,
            f"{lp}.update_mem_with_emb_index={loss.update_mem_with_emb_index} must name a model "
            f"output (0..{n_out - 1}) when memory_params.update_mem_on_forward is false",
        )


def check_transforms(split: DataSplit, path: str) -> None:
    """Builds the split's TRANSFORMS (and their on-device form when asked): every transform and
    its parameters are validated by the code that will run them."""
    from pirl.transforms import build_transform

    build_transform(split.TRANSFORMS, f"{path}.TRANSFORMS")
    if split.TRANSFORMS_ON_DEVICE:
        from pirl.device_transforms import build_device_transform

        build_device_transform(
            split.TRANSFORMS, split.COLLATE_FUNCTION, split.INPUT_KEY_NAMES, f"{path}.TRANSFORMS"
        )


def check_world_size(cfg: Any, world_size: int) -> None:
    """The launch (`world_size` processes) against DISTRIBUTED.NUM_NODES x NUM_PROC_PER_NODE,
    which the global batch and the LR scaling follow."""
    dist = cfg.DISTRIBUTED
    configured = dist.NUM_NODES * dist.NUM_PROC_PER_NODE
    if world_size != configured:
        raise ConfigError(
            f"the job runs {world_size} process(es) but config.DISTRIBUTED.NUM_NODES="
            f"{dist.NUM_NODES} x NUM_PROC_PER_NODE={dist.NUM_PROC_PER_NODE} = {configured}; "
            f"the LR scaling and batch depend on it: pass config.DISTRIBUTED.NUM_NODES=... "
            f"config.DISTRIBUTED.NUM_PROC_PER_NODE=... matching the launch"
        )


def warn_vissl_only(cfg: Any) -> None:
    """One warning line per key kept only for VISSL's YAML (schema `vissl_only`) that is set."""
    for setting in vissl_only_values(cfg, "config"):
        log.warning("config: %s is a VISSL key that has no effect here", setting)


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


def derive(cfg: Config, world_size: int | None = None) -> tuple[Config, Derived]:
    """What follows from the config (and `world_size`, checked when given): the global batch,
    the scaled LR schedule, head input sizes. Pure: returns a resolved copy of `cfg` (head input
    sizes follow the trunk, as VISSL rewrites them; empty DATA_PATHS filled from the dataset
    catalog) and the `Derived` record, whose notes say
    what was rewritten. The dataset's part comes later, from `fit_dataset`."""
    if world_size is not None:
        check_world_size(cfg, world_size)
    from pirl.data.catalog import resolve

    cfg = copy.deepcopy(cfg)
    world = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    notes = resolve(cfg.DATA.DATASET_CATALOG, [(cfg.DATA.TRAIN, "config.DATA.TRAIN")])
    notes += resolve_head_inputs(cfg)
    sched = cfg.OPTIMIZER.param_schedulers.lr
    factor, lr = scaled_lr_schedule(sched, batch * world)
    if sched.auto_lr_scaling.auto_scale:  # an LR given as is (auto_scale=false) is the user's
        check_lr_values(lr, batch * world)
    derived = Derived(
        world_size=world,
        global_batch_size=batch * world,
        batch_size_per_rank=batch,
        lr_scale_factor=factor,
        lr=lr,
        trunk_output_dim=trunk_output_dim(cfg),
        num_train_samples=-1,
        notes=notes,
    )
    return cfg, derived


def resolve_head_inputs(cfg: Config) -> list[str]:
    """Rewrites (in place) each mlp layer's input size to follow the trunk or the previous layer
    (the seed's w2 command keeps 2048-d heads); returns a note per rewrite. Each head must end in
    the memory bank's embedding size."""
    notes = []
    embedding_dim = cfg.LOSS.nce_loss_with_memory.memory_params.embedding_dim
    for i, head in enumerate(cfg.MODEL.HEAD.PARAMS):
        dim = trunk_output_dim(cfg)
        for j, (name, kwargs) in enumerate(head_modules(head)):
            if name != "mlp":
                dim = dim * kwargs["num_towers"]
                continue
            if kwargs["dims"][0] != dim:
                notes.append(
                    f"MODEL.HEAD.PARAMS[{i}][{j}] input {kwargs['dims'][0]} -> {dim} "
                    f"(follows the {'trunk' if j == 0 else 'previous layer'} output)"
                )
                kwargs["dims"] = [dim] + list(kwargs["dims"][1:])
            dim = kwargs["dims"][-1]
        if dim != embedding_dim:
            raise ConfigError(
                f"config.MODEL.HEAD.PARAMS[{i}] outputs {dim}-d embeddings but "
                f"config.LOSS.nce_loss_with_memory.memory_params.embedding_dim={embedding_dim}; "
                "make the last head layer match the memory bank"
            )
    return notes


def fit_dataset(cfg: Config, derived: Derived, num_train_samples: int) -> tuple[Config, Derived]:
    """The dataset's part of `derive`, once it is open: the memory bank has one row per sample.
    Pure like `derive`: returns copies, with a note (also logged as a warning) when the
    negatives outnumber the samples."""
    cfg = copy.deepcopy(cfg)
    loss = cfg.LOSS.nce_loss_with_memory
    notes = []
    if loss.num_train_samples not in (-1, num_train_samples):
        notes.append(
            f"num_train_samples {loss.num_train_samples} -> {num_train_samples} (dataset length)"
        )
    loss.num_train_samples = num_train_samples
    loss.memory_params.memory_size = num_train_samples
    k = loss.negative_sampling_params.num_negatives
    if k >= num_train_samples:
        # Legal in VISSL (negatives are drawn with replacement; its quick_pirl draws 4,096 from
        # 500 images), but every step then scores each row of the bank several times.
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
    fitted = dataclasses.replace(
        derived, num_train_samples=num_train_samples, notes=[*derived.notes, *notes]
    )
    return cfg, fitted


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
    """VISSL's auto_lr_scaling (docs/vissl-notes.md#lr-scaling): returns (factor, the schedule with scaled values)."""
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
    """Compose, validate and derive (see `derive`); `world_size`, when given, is checked against
    the config. The launcher's environment is read by `pirl.dist` alone: pass its world size."""
    cfg = build(compose(overrides))
    warn_vissl_only(cfg)
    return derive(cfg, world_size)


def to_dict(cfg: Config) -> dict:
    return {"config": dataclasses.asdict(cfg)}


def dump_yaml(cfg: Config, derived: Derived | None = None) -> str:
    """The config as YAML, credentials in URLs removed (it goes to logs, checkpoints and files)."""
    data = to_dict(cfg)
    if derived is not None:
        data["derived"] = dataclasses.asdict(derived)
    return redact(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
