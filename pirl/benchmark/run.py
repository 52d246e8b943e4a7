"""One benchmark run: open the data, evaluate the trained trunk (and a random-init one), report.

Per trunk: (1) the train split through the frozen trunk — every epoch on augmented crops, or once
when CACHE_TRAIN_FEATURES — training all heads together, with a pass over val for every head's
top-1/top-5 after every TEST_EVERY_NUM_EPOCH-th epoch and the last (`Tester`); (2) the kNN bank:
the train split with the TEST transforms (shared with (1) when cached and the transforms are
equal), scored with the last val pass's kNN queries. Works on any number of ranks: heads in DDP,
the trunk frozen and local, counts summed, the kNN bank gathered.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from pirl import dist, precision
from pirl.benchmark.config import BenchDerived, head_names
from pirl.benchmark.features import FeatureExtractor, extract, freeze, run_batches
from pirl.benchmark.heads import build_heads
from pirl.benchmark.knn import knn_evaluate, topk_correct
from pirl.benchmark.linear import CachedTrainFeatures, ProtocolError, train_heads
from pirl.benchmark.lowshot import low_shot
from pirl.benchmark.schema import BenchmarkConfig
from pirl.data import TrainSource, open_train_data
from pirl.errors import ConfigError, DataError
from pirl.models import ResNetTrunk
from pirl.schema import DataSplit
from pirl.transforms import build_collator, build_transform
from pirl.weights import apply_trunk_weights, read_trunk_weights, state_digest

log = logging.getLogger("pirl")


@dataclass
class Context:
    cfg: BenchmarkConfig
    derived: BenchDerived
    env: dist.DistEnv
    train: TrainSource
    val: TrainSource
    knn_train: TrainSource | None  # the train split, TEST transforms (None: no kNN, or cached)
    num_classes: int
    names: list[str]

    @property
    def cache(self) -> bool:
        return self.cfg.MODEL.FEATURE_EVAL_SETTINGS.CACHE_TRAIN_FEATURES

    @cached_property
    def amp(self) -> torch.dtype | None:
        """The trunk's autocast dtype: MODEL.AMP_PARAMS as in training (pirl.precision)."""
        return precision.amp_dtype(self.cfg.MODEL.AMP_PARAMS, self.env.device)


def open_split(
    cfg: BenchmarkConfig, split: DataSplit, env: dist.DistEnv, transforms: list
) -> TrainSource:
    data = _open_split(cfg, split, env, transforms)
    if split is cfg.DATA.TRAIN and cfg.LOW_SHOT.FRACTION < 1:
        data = low_shot(data, cfg.LOW_SHOT.FRACTION, cfg.LOW_SHOT.SEED, split.DATA_SOURCES[0])
    return data


def _open_split(
    cfg: BenchmarkConfig, split: DataSplit, env: dist.DistEnv, transforms: list
) -> TrainSource:
    return open_train_data(
        split,
        build_transform(transforms),
        build_collator(split.COLLATE_FUNCTION, ["data"]),
        rank=env.rank,
        world=env.world_size,
        seed=cfg.SEED_VALUE,
        num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
        pin_memory=cfg.DATA.PIN_MEMORY and env.device.type == "cuda",
    )


def open_data(cfg: BenchmarkConfig, derived: BenchDerived, env: dist.DistEnv) -> Context:
    train_split, test_split = cfg.DATA.TRAIN, cfg.DATA.TEST
    train = open_split(cfg, train_split, env, train_split.TRANSFORMS)
    val = open_split(cfg, test_split, env, test_split.TRANSFORMS)
    classes = list(train.classes)
    if not classes:
        raise DataError("the train split has no class names: the benchmark needs labelled data")
    if list(val.classes) and list(val.classes) != classes:
        raise DataError(
            f"train and val classes differ ({len(classes)} vs {len(val.classes)}; first "
            f"differences: {sorted(set(classes) ^ set(val.classes))[:5]})"
        )
    same = train_split.TRANSFORMS == test_split.TRANSFORMS
    knn_train = None
    if cfg.KNN.ENABLED and not (cfg.MODEL.FEATURE_EVAL_SETTINGS.CACHE_TRAIN_FEATURES and same):
        knn_train = open_split(cfg, train_split, env, test_split.TRANSFORMS)
    return Context(cfg, derived, env, train, val, knn_train, len(classes), head_names(cfg))


def build_trunk(cfg: BenchmarkConfig) -> ResNetTrunk:
    """The configured architecture, randomly initialised under SEED_VALUE (the same on every rank)."""
    r = cfg.MODEL.TRUNK.RESNETS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.SEED_VALUE)
        return ResNetTrunk(
            r.DEPTH,
            r.WIDTH_MULTIPLIER,
            r.GROUPS,
            r.WIDTH_PER_GROUP,
            r.ZERO_INIT_RESIDUAL,
            r.LAYER4_STRIDE,
            r.INIT,
        )


def probe_shapes(extractor: FeatureExtractor, data, ctx: Context) -> tuple[list, int]:
    """Pooled feature shapes (C, h, w) per head and the kNN feature size, from one batch."""
    batch = next(iter(data.eval_batches()), None) or next(iter(data.batches(0)))
    pooled, knn, _ = next(run_batches(extractor, [batch], ctx.env.device, ctx.amp))
    return [p.shape[1:] for p in pooled], (knn.shape[1] if knn is not None else 0)


def validate(
    heads: nn.Module, batches: Iterable, ctx: Context, shapes: list
) -> tuple[list[list[int]], int, list[torch.Tensor], list[torch.Tensor]]:
    """One pass over val's (pooled, kNN feature, label) batches: (top-1/top-5 hits per head and
    the sample count, summed over ranks; this rank's kNN query features and labels)."""
    device = ctx.env.device
    heads.eval()
    correct = torch.zeros(len(ctx.names), 2, dtype=torch.long, device=device)
    n_val = 0
    queries, query_labels = [], []
    with torch.no_grad():
        for pooled, knn, y in batches:
            got = [p.shape[1:] for p in pooled]
            if got != shapes:
                raise ConfigError(
                    f"val features {got} differ from train features {shapes}: DATA.TEST.TRANSFORMS "
                    "must give the same crop size as DATA.TRAIN.TRANSFORMS"
                )
            for i, logits in enumerate(heads(pooled)):
                correct[i] += torch.tensor(topk_correct(logits, y), device=device)
            n_val += y.shape[0]
            if knn is not None:
                queries.append(knn)
                query_labels.append(y)
    hits = dist.all_reduce_sum(correct).tolist()
    n_val = int(dist.all_reduce_sum(torch.tensor([n_val], device=device)).item())
    return hits, n_val, queries, query_labels


class Tester:
    """Tests the heads on val after every TEST_EVERY_NUM_EPOCH-th epoch and the last (VISSL's
    benchmark schedule): `tester(epoch)` returns {head: {top1, top5}}; `last` keeps the newest
    pass's counts and kNN queries for the final numbers. With CACHE_TRAIN_FEATURES the val
    features are computed once and reused (frozen trunk, deterministic TEST transforms);
    otherwise each test runs the trunk over val again, as VISSL does."""

    def __init__(self, heads: nn.Module, extractor: FeatureExtractor, ctx: Context, shapes: list):
        self.heads, self.extractor, self.ctx, self.shapes = heads, extractor, ctx, shapes
        self.cached: list | None = None
        self.last: tuple | None = None

    def batches(self) -> Iterable:
        ctx = self.ctx
        fresh = run_batches(self.extractor, ctx.val.eval_batches(), ctx.env.device, ctx.amp)
        if not ctx.cache:
            return fresh
        if self.cached is None:
            self.cached = list(fresh)
        return self.cached

    def __call__(self, epoch: int) -> dict[str, dict[str, float]]:
        self.last = validate(self.heads, self.batches(), self.ctx, self.shapes)
        correct, n_val = self.last[0], max(self.last[1], 1)
        return {
            name: {"top1": 100.0 * correct[i][0] / n_val, "top5": 100.0 * correct[i][1] / n_val}
            for i, name in enumerate(self.ctx.names)
        }


def best_test(history: list[dict], name: str) -> dict:
    """The tested epoch with head `name`'s highest top-1 (then top-5; the earliest on a tie)."""
    tests = [(r["epoch"], r["test"][name]) for r in history if "test" in r]
    epoch, acc = max(tests, key=lambda t: (t[1]["top1"], t[1]["top5"]))
    return {"best_top1": acc["top1"], "best_top5": acc["top5"], "best_epoch": epoch}


def evaluate_trunk(trunk: ResNetTrunk, ctx: Context, label: str) -> dict:
    """Linear eval of every head and kNN for one trunk; the numbers are the same on every rank."""
    cfg, env, device = ctx.cfg, ctx.env, ctx.env.device
    t0 = time.perf_counter()
    trunk = freeze(trunk.to(device))
    before = state_digest(trunk.state_dict())
    fe = cfg.MODEL.FEATURE_EVAL_SETTINGS
    extractor = FeatureExtractor(
        trunk, fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP, cfg.KNN.FEATURE if cfg.KNN.ENABLED else None
    ).to(device)
    shapes, knn_dim = probe_shapes(extractor, ctx.train, ctx)
    heads, notes = build_heads(
        cfg.MODEL.HEAD.PARAMS,
        shapes,
        ctx.num_classes,
        cfg.SEED_VALUE,
        cfg.MODEL.HEAD.PARAMS_MULTIPLIER,
    )
    for note in notes:
        log.info("[%s] config: %s", label, note)
    heads = heads.to(device)
    ddp_heads = None
    if env.world_size > 1:
        if device.type == "cuda" and cfg.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN:
            heads = nn.SyncBatchNorm.convert_sync_batchnorm(heads)
        ddp_heads = nn.parallel.DistributedDataParallel(
            heads, device_ids=[device.index] if device.type == "cuda" else None
        )

    # ============ train split: heads (and the kNN bank) ============
    knn_bank = None
    log.info("[%s] linear eval: %d heads %s, %s", label, len(ctx.names), ctx.names, shapes)
    if ctx.cache:
        log.info("[%s] extracting train features once (CACHE_TRAIN_FEATURES)", label)
        pooled, knn_feats, labels = extract(extractor, ctx.train.eval_batches(), device, ctx.amp)
        if labels.shape[0] == 0:
            pooled = [torch.empty(0, *s, device=device) for s in shapes]
        if ctx.knn_train is None and cfg.KNN.ENABLED:
            knn_bank = (knn_feats, labels)
        assert pooled is not None  # extract keeps the pooled features unless told not to
        cached = CachedTrainFeatures(
            pooled,
            labels,
            cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA,
            math.ceil(ctx.train.num_samples / env.world_size),
            cfg.SEED_VALUE,
            env.rank,
            cfg.DATA.TRAIN.DROP_LAST,
        )
        batches, steps = cached.batches, cached.steps_per_epoch
    else:

        def batches(epoch: int):
            for p, _, y in run_batches(extractor, ctx.train.batches(epoch), device, ctx.amp):
                yield p, y

        steps = ctx.train.steps_per_epoch
    tester = Tester(heads, extractor, ctx, shapes)
    history = train_heads(
        heads,
        trunk,
        batches,
        steps,
        cfg.OPTIMIZER,
        ctx.derived.lr,
        ctx.names,
        cfg.LOG_FREQUENCY,
        ddp_heads,
        test=tester,
        test_every=cfg.TEST_EVERY_NUM_EPOCH,
    )
    if cfg.KNN.ENABLED and knn_bank is None:
        log.info("[%s] extracting the kNN bank (train split, TEST transforms)", label)
        assert ctx.knn_train is not None  # open_data opens it unless the cache serves the bank
        _, knn_feats, labels = extract(
            extractor, ctx.knn_train.eval_batches(), device, ctx.amp, keep_pooled=False
        )
        knn_bank = (knn_feats, labels)

    # ============ val: every head after the last epoch (and the best epoch), kNN queries ============
    assert tester.last is not None  # the last epoch is always tested
    correct, n_val, queries, query_labels = tester.last
    linear = {}
    for i, name in enumerate(ctx.names):
        feature, (op, args) = fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP[i]
        linear[name] = {
            "top1": 100.0 * correct[i][0] / max(n_val, 1),
            "top5": 100.0 * correct[i][1] / max(n_val, 1),
            "feature": feature,
            "pool": [op, args],
            "batchnorm": cfg.MODEL.HEAD.PARAMS[i][0] == "eval_mlp",
            "in_dim": int(torch.Size(shapes[i]).numel()),
            "final_train_loss": history[-1]["loss"][name],
            **best_test(history, name),
        }
    best = max(ctx.names, key=lambda n: (linear[n]["top1"], linear[n]["top5"]))
    result: dict[str, Any] = {"linear": linear, "best_head": best, "linear_train": history}

    if cfg.KNN.ENABLED:
        assert knn_bank is not None
        bank, bank_labels = knn_bank
        empty = torch.empty(0, knn_dim, device=device)
        q = torch.cat(queries) if queries else empty
        ql = torch.cat(query_labels) if query_labels else torch.empty(0, dtype=torch.long)
        result["knn"] = knn_evaluate(
            bank if bank is not None else empty,
            bank_labels,
            q,
            ql.to(device),
            list(cfg.KNN.K),
            cfg.KNN.TEMPERATURE,
            ctx.num_classes,
        )

    after = state_digest(trunk.state_dict())
    if after != before:
        raise ProtocolError(f"[{label}] the trunk's weights changed during the linear evaluation")
    result["trunk_unchanged"] = True
    result["trunk_state_sha256"] = after
    result["seconds"] = time.perf_counter() - t0
    log.info(
        "[%s] best head %s top-1 %.2f%s (%.1fs)",
        label,
        best,
        linear[best]["top1"],
        "".join(f", kNN k={k} {v['top1']:.2f}" for k, v in result.get("knn", {}).items()),
        result["seconds"],
    )
    return result


def split_info(split: DataSplit, data) -> dict:
    return {
        "urls": list(split.DATA_PATHS),
        "source": split.DATA_SOURCES[0],
        "split": split.SPLIT,
        "num_samples": int(data.num_samples),
        "transforms": list(split.TRANSFORMS),
    }


def benchmark(cfg: BenchmarkConfig, derived: BenchDerived, env: dist.DistEnv) -> dict:
    """Evaluate the configured trunk (and the random-init baseline when asked); the metrics dict."""
    t0 = time.perf_counter()
    weights = read_trunk_weights(cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE)
    trunk = build_trunk(cfg)
    apply_trunk_weights(trunk, weights.state_dict, weights.resolved_url)
    log.info("trunk %s (%s, sha256 %s)", weights.resolved_url, weights.format, weights.sha256[:12])
    ctx = open_data(cfg, derived, env)
    log.info(
        "%d train / %d val samples, %d classes; %d rank(s) x batch %d, LR %s",
        ctx.train.num_samples,
        ctx.val.num_samples,
        ctx.num_classes,
        env.world_size,
        derived.batch_size_per_rank,
        derived.lr,
    )
    trunks = {"trained": {"weights": weights.identity(), **evaluate_trunk(trunk, ctx, "trained")}}
    if cfg.BASELINE_RANDOM:
        baseline = build_trunk(cfg)
        identity = {"init": "random", "seed": cfg.SEED_VALUE}
        identity["state_sha256"] = state_digest(baseline.state_dict())
        trunks["random_init"] = {"weights": identity, **evaluate_trunk(baseline, ctx, "random")}

    def headline(t: dict) -> dict:
        h = {
            "linear_head": t["best_head"],
            "linear_top1": t["linear"][t["best_head"]]["top1"],
            "linear_top5": t["linear"][t["best_head"]]["top5"],
            "linear_best_epoch_top1": t["linear"][t["best_head"]]["best_top1"],
        }
        if "knn" in t:
            h["knn_top1"] = {k: v["top1"] for k, v in t["knn"].items()}
        return h

    top = headline(trunks["trained"])
    if "random_init" in trunks:
        top["random_init"] = headline(trunks["random_init"])
    o = cfg.OPTIMIZER
    r = cfg.MODEL.TRUNK.RESNETS
    return {
        "schema_version": 1,
        "headline": top,
        "trunks": trunks,
        "dataset": {
            "train": {
                **split_info(cfg.DATA.TRAIN, ctx.train),
                "low_shot": {"fraction": cfg.LOW_SHOT.FRACTION, "seed": cfg.LOW_SHOT.SEED},
            },
            "val": split_info(cfg.DATA.TEST, ctx.val),
            "num_classes": ctx.num_classes,
            "classes": list(ctx.train.classes),
        },
        "model": {
            "depth": r.DEPTH,
            "width_multiplier": r.WIDTH_MULTIPLIER,
            "groups": r.GROUPS,
            "width_per_group": r.WIDTH_PER_GROUP,
        },
        "protocol": {
            "heads": [
                {"name": n, "feature": f, "pool": p, "head": h[0]}
                for n, (f, p), h in zip(
                    ctx.names,
                    cfg.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP,
                    cfg.MODEL.HEAD.PARAMS,
                    strict=True,
                )
            ],
            "epochs": o.num_epochs,
            "test_every_num_epoch": cfg.TEST_EVERY_NUM_EPOCH,
            "optimizer": o.name,
            "momentum": o.momentum,
            "nesterov": o.nesterov,
            "weight_decay": o.weight_decay,
            "regularize_bn": o.regularize_bn,
            "regularize_bias": o.regularize_bias,
            "lr": derived.lr,
            "lr_scale_factor": derived.lr_scale_factor,
            "batch_size_per_rank": derived.batch_size_per_rank,
            "world_size": derived.world_size,
            "global_batch_size": derived.global_batch_size,
            "cache_train_features": ctx.cache,
            "knn": {
                "enabled": cfg.KNN.ENABLED,
                "k": list(cfg.KNN.K),
                "temperature": cfg.KNN.TEMPERATURE,
                "feature": cfg.KNN.FEATURE,
            },
            "seed": cfg.SEED_VALUE,
        },
        "runtime": {
            "seconds": time.perf_counter() - t0,
            "device": str(env.device),
            "world_size": env.world_size,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "config": dataclasses.asdict(cfg),
    }
