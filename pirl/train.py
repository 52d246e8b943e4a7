"""PIRL / NPID pretraining: `python -m pirl.train config=<preset> [+group=file] [config.KEY=VALUE] [--dry-run]`.

The same command runs as one process, under `torchrun --nproc-per-node=N`, and in every pod of
a Kubeflow PyTorchJob (started through torchrun, which reads the operator's PET_* variables).
Every start auto-resumes from the newest complete checkpoint in CHECKPOINT.DIR.

Read top to bottom: `_train` opens the data, builds the `Training` (model, loss with its memory
bank, optimizer, scaler), `resume`s, then runs `train_one_epoch` per epoch, each step one
`train_step` (the function `pirl throughput` times); `MetricsLog` records, `Checkpointer` saves.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import yaml
from torch import nn
from tqdm import tqdm

from pirl import checkpoint, config, dist, lease, precision, storage
from pirl.checkpointer import Checkpointer, TrainState
from pirl.data import open_train_data, sample_seed
from pirl.entry import Terminated, run_main, start
from pirl.errors import ConfigError, DataError, DivergedError, StorageError
from pirl.health import HealthMeter
from pirl.loss import NCELossWithMemory
from pirl.metrics_log import MetricsLog
from pirl.models import build_model
from pirl.optim import build_optimizer, set_lr
from pirl.schema import Model
from pirl.transforms import build_collator, build_transform, collate_encoded
from pirl.weights import export_torchvision

log = logging.getLogger("pirl")


def open_data(cfg: config.Config, env: dist.DistEnv):
    """This rank's training data, with the configured transforms and collator (or, with
    TRANSFORMS_ON_DEVICE, undecoded images for `device_augmentation`)."""
    split = cfg.DATA.TRAIN
    on_device = split.TRANSFORMS_ON_DEVICE
    return open_train_data(
        split,
        None if on_device else build_transform(split.TRANSFORMS),
        collate_encoded
        if on_device
        else build_collator(split.COLLATE_FUNCTION, split.INPUT_KEY_NAMES),
        rank=env.rank,
        world=env.world_size,
        seed=cfg.SEED_VALUE,
        num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
        pin_memory=cfg.DATA.PIN_MEMORY and env.device.type == "cuda",
        encoded=on_device,
    )


def device_augmentation(cfg: config.Config, device: torch.device):
    """With TRANSFORMS_ON_DEVICE, batch -> batch with the views made on `device` (decode, then the
    configured transforms, batched; each sample's draws seeded by (seed, epoch, index) as on the
    CPU path); otherwise None."""
    split = cfg.DATA.TRAIN
    if not split.TRANSFORMS_ON_DEVICE:
        return None
    from pirl import device_transforms

    transform = device_transforms.build_device_transform(
        split.TRANSFORMS, split.COLLATE_FUNCTION, split.INPUT_KEY_NAMES
    )

    def augment(batch: dict, epoch: int) -> dict:
        indices = batch["index"].tolist()
        try:
            images = device_transforms.decode(batch["encoded"], device)
        except DataError as exc:
            raise DataError(f"{exc} (the images of the batch are samples {indices})") from None
        seeds = [sample_seed(cfg.SEED_VALUE, epoch, i) for i in indices]
        return {**transform(images, seeds), "index": batch["index"], "label": batch["label"]}

    return augment


@dataclass
class Training:
    """What a training step touches. `model` is the bare model (its state dict, its input
    keys); `step_model` is what the forward calls (DDP and/or compiled, see `data_parallel`)."""

    model: nn.Module
    step_model: nn.Module
    criterion: NCELossWithMemory
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    model_cfg: Model
    device: torch.device


def build_training(cfg: config.Config, env: dist.DistEnv, num_samples: int, lr: float) -> Training:
    """Model (placed, SyncBN if asked), loss with its memory bank, optimizer and loss scaler: for
    the trainer and for `pirl throughput`, which must time the same thing. `step_model` is the
    bare model until `data_parallel` wraps it (after a resume has loaded the weights)."""
    device = env.device
    model = precision.place_model(build_model(cfg), cfg.MODEL, device)
    if env.world_size > 1 and cfg.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    criterion = NCELossWithMemory(
        cfg.LOSS.nce_loss_with_memory, num_samples, seed=cfg.SEED_VALUE, rank=env.rank
    ).to(device)
    criterion.meter = HealthMeter()
    optimizer = build_optimizer(
        model, cfg.OPTIMIZER, lr=lr, fused=cfg.OPTIMIZER.use_fused and device.type == "cuda"
    )
    amp_dtype = precision.autocast_dtype(cfg.MODEL, device)
    scaler = precision.grad_scaler(device, amp_dtype)
    return Training(model, model, criterion, optimizer, scaler, amp_dtype, cfg.MODEL, device)


def data_parallel(model: nn.Module, cfg: config.Config, env: dist.DistEnv) -> nn.Module:
    """The module a step calls: DDP over the ranks when there are several, then torch.compile
    if MODEL.COMPILE (compiling DDP lets it split the graph at its gradient buckets)."""
    step_model = model
    if env.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            forward_sync_buffers=cfg.DISTRIBUTED.BROADCAST_BUFFERS,
        )
    return torch.compile(step_model) if cfg.MODEL.COMPILE else step_model


def untimed(phase: str) -> AbstractContextManager:
    return nullcontext()


def train_step(
    t: Training,
    batch: dict,
    lr: float,
    timed: Callable[[str], AbstractContextManager] = untimed,
) -> torch.Tensor:
    """One optimisation step on `batch` at learning rate `lr`; returns this rank's loss.
    `timed(phase)` wraps each phase ("forward", "loss_memory", "backward", "optimizer") for
    `pirl throughput`; training leaves it untimed."""
    set_lr(t.optimizer, lr)
    index = batch["index"].to(t.device, non_blocking=True)
    inputs = {k: precision.place_input(batch[k], t.model_cfg, t.device) for k in t.model.input_keys}
    with timed("forward"), precision.autocast(t.device, t.amp_dtype):
        outputs = t.step_model(inputs)
    with timed("loss_memory"):
        loss = t.criterion(outputs, index)
    with timed("backward"):
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
    with timed("optimizer"):
        t.scaler.step(t.optimizer)
        t.scaler.update()
    return loss


def describe_trunk(trunk: dict) -> str:
    r = trunk.get("RESNETS", {})
    return (
        f"{trunk.get('NAME')} DEPTH={r.get('DEPTH')} WIDTH_MULTIPLIER={r.get('WIDTH_MULTIPLIER')}"
    )


def load_model_state(model: nn.Module, state: dict, name: str, cfg: config.Config) -> None:
    """Load a resumed checkpoint's weights; one made by another model is a config error (the
    run folder belongs to another architecture), naming both."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        try:
            saved = yaml.safe_load(state.get("config") or "")["config"]["MODEL"]["TRUNK"]
        except (yaml.YAMLError, TypeError, KeyError):
            saved = {}
        ours = config.to_dict(cfg)["config"]["MODEL"]["TRUNK"]
        raise ConfigError(
            f"{storage.join(cfg.CHECKPOINT.DIR, 'checkpoints', name)} was made by "
            f"{describe_trunk(saved)} but this config builds {describe_trunk(ours)} (the weights "
            f"do not fit: {str(exc).splitlines()[0]}); use another CHECKPOINT.DIR, or the run's "
            "own model config"
        ) from None


def resume(cfg: config.Config, env: dist.DistEnv, t: Training) -> TrainState:
    """Load the newest checkpoint that verifies into `t`, or start from scratch (memory bank
    synchronised across ranks); where training stands."""
    root = cfg.CHECKPOINT.DIR
    found = (
        checkpoint.load_latest(root, map_location=env.device)
        if cfg.CHECKPOINT.AUTO_RESUME
        else None
    )
    if found is None:
        if cfg.CHECKPOINT.AUTO_RESUME and checkpoint.complete(root):
            # Starting over would also let KEEP_LAST delete the new run's checkpoints in favour
            # of the unusable, higher-numbered ones.
            raise StorageError(
                f"{storage.join(root, 'checkpoints')} holds checkpoints but none verifies "
                "(corrupt, partial or unsafe: see the warnings above); restore a good copy, or "
                "move them away to start from scratch"
            )
        t.criterion.memory.sync(cfg.LOSS.nce_loss_with_memory.memory_params.init_sync)
        return TrainState()
    state, meta = found
    load_model_state(t.model, state, meta["file"], cfg)
    t.criterion.load_state_dict(state["loss"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scaler.load_state_dict(state["scaler"])
    rngs = state["negatives_rng"]
    t.criterion.generator.set_state(rngs[env.rank % len(rngs)].cpu().clone())
    resumed = TrainState(state["epoch"], state["step_in_epoch"], state["global_step"], True)
    log.info(
        "resumed from %s: epoch %d, step %d (global step %d)",
        meta["file"],
        resumed.epoch,
        resumed.step_in_epoch,
        resumed.global_step,
    )
    return resumed


class SigtermFlag:
    """SIGTERM handler of the loop: notes the signal (every rank then stops after the same step,
    writing nothing more) and abandons a checkpoint upload in progress, which could outlast the
    grace period."""

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer, self.received = checkpointer, False

    def __call__(self, *_) -> None:
        self.received = True
        if self.checkpointer.saving:
            storage.interrupt()


def mean_loss_and_stop(loss: torch.Tensor, stop: bool, world_size: int) -> tuple[float, bool]:
    """The loss averaged over ranks and whether any rank got SIGTERM, in one all-reduce, so
    that every rank stops after the same step (and all exit 143) wherever the signal arrived."""
    stats = torch.stack([loss.detach().reshape(()), loss.new_tensor(1.0 if stop else 0.0)])
    dist.all_reduce_sum(stats)
    return (stats[0] / world_size).item(), bool(stats[1].item() > 0)


def train_one_epoch(
    t: Training,
    data,
    augment,
    state: TrainState,
    *,
    cfg: config.Config,
    lr_schedule: dict,
    metrics: MetricsLog,
    checkpointer: Checkpointer,
    sigterm: SigtermFlag,
    world_size: int,
) -> bool:
    """Train `state.epoch` from `state.step_in_epoch`, advancing `state`; mid-epoch checkpoints
    every CHECKPOINT_ITER_FREQUENCY steps. False when MAX_STEPS stopped it before the end."""
    epoch, first = state.epoch, state.step_in_epoch
    steps_per_epoch, num_epochs = data.steps_per_epoch, cfg.OPTIMIZER.num_epochs
    last = int(min(steps_per_epoch, first + state.steps_left(cfg.MAX_STEPS)))
    iter_freq = cfg.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY
    t.model.train()
    t.criterion.train()
    t.criterion.meter.reset()
    metrics.start_interval()
    loss_sum, seen, started = 0.0, 0, time.perf_counter()
    # A progress bar on an interactive terminal (rank 0); pod logs get the periodic lines only.
    bar = tqdm(
        total=steps_per_epoch,
        initial=first,
        desc=f"epoch {epoch}",
        leave=False,
        disable=not (metrics.is_main and sys.stderr.isatty()),
    )
    batches = data.batches(epoch, first)
    if last < steps_per_epoch:  # MAX_STEPS: stop without drawing another batch
        batches = itertools.islice(batches, last - first)
    for step, batch in enumerate(batches, start=first):
        bar.update(1)
        if augment is not None:
            batch = augment(batch, epoch)
        lr = config.lr_at(lr_schedule, epoch + step / steps_per_epoch, num_epochs)
        loss = train_step(t, batch, lr)
        state.global_step, state.step_in_epoch = state.global_step + 1, step + 1
        loss_value, stop = mean_loss_and_stop(loss, sigterm.received, world_size)
        if not math.isfinite(loss_value):
            raise DivergedError(
                f"loss is {loss_value} at epoch {epoch} step {step}: training diverged; lower the LR "
                "(config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value) or check the data"
            )
        loss_sum, seen = loss_sum + loss_value, seen + 1
        metrics.count_images(len(batch["index"]))
        metrics.params(t.model, state.global_step)
        if (step + 1) % cfg.LOG_FREQUENCY == 0 or step + 1 == steps_per_epoch:
            metrics.step(epoch, step + 1, steps_per_epoch, state.global_step, loss_value, lr)
        if stop:  # before any save: a SIGTERM'd job writes nothing more
            raise Terminated()
        if iter_freq > 0 and state.global_step % iter_freq == 0 and step + 1 < steps_per_epoch:
            checkpointer.save(state)
    bar.close()
    if state.step_in_epoch < steps_per_epoch:
        return False
    if seen:
        epoch_loss = loss_sum / seen
        health = t.criterion.meter.summary(
            t.criterion.memory.memory, epoch_loss, t.criterion.chance()
        )
        metrics.epoch(epoch, state.global_step, epoch_loss, time.perf_counter() - started, health)
        metrics.params(t.model, state.global_step, epoch_end=True)
    state.epoch, state.step_in_epoch = epoch + 1, 0
    return True


def train(cfg: config.Config, derived: config.Derived, env: dist.DistEnv) -> dict:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return _train(cfg, derived, env)
    finally:  # callers in the same process (tests, notebooks) get their own handler back
        signal.signal(signal.SIGTERM, previous)


def _train(cfg: config.Config, derived: config.Derived, env: dist.DistEnv) -> dict:
    data = open_data(cfg, env)
    cfg, derived = config.fit_dataset(cfg, derived, data.num_samples)  # memory = dataset size
    log_plan(data, env, derived)
    num_epochs = cfg.OPTIMIZER.num_epochs
    t = build_training(cfg, env, data.num_samples, config.lr_at(derived.lr, 0, num_epochs))
    state = resume(cfg, env, t)
    t.step_model = data_parallel(t.model, cfg, env)
    metrics = MetricsLog.resume(
        cfg.CHECKPOINT.DIR,
        state.global_step,
        env.world_size,
        env.is_main,
        cfg.HOOKS.TENSORBOARD_SETUP,
    )
    checkpointer = Checkpointer(cfg, env, t, metrics, start=state)
    sigterm = SigtermFlag(checkpointer)
    signal.signal(signal.SIGTERM, sigterm)
    augment = device_augmentation(cfg, env.device)

    while state.epoch < num_epochs and state.steps_left(cfg.MAX_STEPS) > 0:
        completed = train_one_epoch(
            t,
            data,
            augment,
            state,
            cfg=cfg,
            lr_schedule=derived.lr,
            metrics=metrics,
            checkpointer=checkpointer,
            sigterm=sigterm,
            world_size=env.world_size,
        )
        if completed and (
            state.epoch % cfg.CHECKPOINT.CHECKPOINT_FREQUENCY == 0 or state.epoch == num_epochs
        ):
            checkpointer.save(state)
    if state.steps_left(cfg.MAX_STEPS) == 0:
        log.info("MAX_STEPS=%d reached", cfg.MAX_STEPS)
    checkpointer.save_unless_saved(state)  # MAX_STEPS stopped it between checkpoints
    if env.is_main:
        export(cfg, derived, t.model)
    metrics.close()
    return {"global_step": state.global_step, "epoch": state.epoch}


def log_plan(data, env: dist.DistEnv, derived: config.Derived) -> None:
    log.info(
        "%d samples, %d rank(s) x batch %d = global batch %d, %d steps/epoch, LR %s",
        data.num_samples,
        env.world_size,
        derived.batch_size_per_rank,
        derived.global_batch_size,
        data.steps_per_epoch,
        derived.lr,
    )
    for note in derived.notes:
        log.info("config: %s", note)


def export(cfg: config.Config, derived: config.Derived, model: nn.Module) -> None:
    """The run's outputs beside its checkpoints: the trunk for torchvision and the config used."""
    root = cfg.CHECKPOINT.DIR
    export_torchvision(model.state_dict(), root)  # trunk.safetensors + trunk.pt
    storage.write_bytes(
        storage.join(root, "train_config.yaml"), config.dump_yaml(cfg, derived).encode()
    )
    log.info("done: trunk exported to %s", storage.join(root, "trunk.safetensors"))


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def parse_args(argv: list[str]) -> argparse.Namespace:
    return config.override_parser(
        "pirl train",
        "PIRL/NPID pretraining with VISSL's config names, e.g. "
        "config=pretrain/pirl/pirl_jigsaw_4node_resnet50 config.OPTIMIZER.num_epochs=100",
        "Hydra overrides: config=<preset>, +config/<group>=<file>, config.KEY=VALUE",
    ).parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> int:
    cfg, derived = config.load(args.overrides, world_size=args.world_size)
    if args.dry_run:
        sys.stdout.write(config.dump_yaml(cfg, derived))
        return 0
    dcfg = cfg.DISTRIBUTED
    env = start(cfg.MACHINE.DEVICE, dcfg.TIMEOUT_SECONDS, dcfg.BACKEND)
    config.check_world_size(cfg, env.world_size)
    held = None
    try:
        if env.is_main:
            storage.check_writable(cfg.CHECKPOINT.DIR)
            held = lease.acquire(cfg.CHECKPOINT.DIR, "pirl train", "CHECKPOINT.DIR")
        seed_everything(cfg.SEED_VALUE, env.rank)
        train(cfg, derived, env)
    finally:
        if held is not None:
            held.release()  # not after SIGTERM stopped an upload: the lease then expires
        storage.clear_interrupt()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_main("pirl train", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
