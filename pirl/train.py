"""PIRL / NPID pretraining: `python -m pirl.train config=<preset> [+group=file] [config.KEY=VALUE] [--dry-run]`.

The same command runs as one process, under `torchrun --nproc-per-node=N`, and in every pod of
a Kubeflow PyTorchJob (started through torchrun, which reads the operator's PET_* variables).
Every start auto-resumes from the newest complete checkpoint in CHECKPOINT.DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import signal
import sys
import time

import torch
import yaml
from torch import nn
from tqdm import tqdm

from pirl import checkpoint, config, dist, lease, precision, storage
from pirl.data import open_train_data, sample_seed
from pirl.errors import (
    EXIT_RETRYABLE,
    EXIT_TERMINATED,
    ConfigError,
    DataError,
    DivergedError,
    PirlError,
    StorageError,
)
from pirl.health import HealthMeter, collapse_warning
from pirl.loss import NCELossWithMemory
from pirl.models import build_model
from pirl.optim import build_optimizer, set_lr
from pirl.redaction import redact
from pirl.tensorboard import TensorBoardLog
from pirl.transforms import build_collator, build_transform, collate_encoded
from pirl.weights import export_torchvision

log = logging.getLogger("pirl")


class Terminated(Exception):
    """SIGTERM arrived: stop after the current step, write nothing, exit with a retryable code."""


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        stream=sys.stdout,
        force=True,
    )


def read_metrics(root: str, upto_step: int) -> list[dict]:
    url = storage.join(root, "metrics.jsonl")
    try:
        lines = storage.read_bytes(url).decode().splitlines()
    except (FileNotFoundError, storage.StorageError):
        return []
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = "damaged"
        if record is not None and not isinstance(record, dict):
            log.warning("%s line %d is not a JSON record; skipped", url, number)
        elif record is not None and _step_of(record) <= upto_step:
            records.append(record)
    return records


def _step_of(record: dict) -> int:
    step = record.get("global_step", 0)
    return step if isinstance(step, int) else 0


def write_metrics(root: str, records: list[dict]) -> None:
    storage.write_bytes(
        storage.join(root, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in records).encode()
    )


def train(cfg: config.Config, derived: config.Derived, env: dist.DistEnv) -> dict:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return _train(cfg, derived, env)
    finally:  # callers in the same process (tests, notebooks) get their own handler back
        signal.signal(signal.SIGTERM, previous)


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


def build_training(cfg: config.Config, env: dist.DistEnv, num_samples: int, lr: float):
    """Model (placed, SyncBN if asked), loss with its memory bank, optimizer: for the trainer and
    for `pirl bench`, which must time the same thing."""
    device = env.device
    model = precision.place_model(build_model(cfg), cfg.MODEL, device)
    if env.world_size > 1 and cfg.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    criterion = NCELossWithMemory(
        cfg.LOSS.nce_loss_with_memory, num_samples, seed=cfg.SEED_VALUE, rank=env.rank
    ).to(device)
    optimizer = build_optimizer(
        model, cfg.OPTIMIZER, lr=lr, fused=cfg.OPTIMIZER.use_fused and device.type == "cuda"
    )
    return model, criterion, optimizer


def data_parallel(model: nn.Module, cfg: config.Config, env: dist.DistEnv) -> nn.Module:
    """The module a step calls: DDP over the ranks when there are several, then torch.compile
    if MODEL.COMPILE (compiling DDP lets it split the graph at its gradient buckets)."""
    step_model = model
    if env.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            broadcast_buffers=cfg.DISTRIBUTED.BROADCAST_BUFFERS,
        )
    return torch.compile(step_model) if cfg.MODEL.COMPILE else step_model


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


def _train(cfg: config.Config, derived: config.Derived, env: dist.DistEnv) -> dict:
    root = cfg.CHECKPOINT.DIR
    device = env.device
    # ============ data ============
    data = open_data(cfg, env)
    derived = config.derive(cfg, env.world_size, data.num_samples)  # memory size = dataset length
    steps_per_epoch = data.steps_per_epoch
    num_epochs = cfg.OPTIMIZER.num_epochs
    log.info(
        "%d samples, %d rank(s) x batch %d = global batch %d, %d steps/epoch, LR %s",
        data.num_samples,
        env.world_size,
        derived.batch_size_per_rank,
        derived.global_batch_size,
        steps_per_epoch,
        derived.lr,
    )
    for note in derived.notes:
        log.info("config: %s", note)

    # ============ model, loss, optimizer ============
    model, criterion, optimizer = build_training(
        cfg, env, data.num_samples, lr=config.lr_at(derived.lr, 0, num_epochs)
    )
    criterion.meter = HealthMeter()
    amp_dtype = precision.autocast_dtype(cfg.MODEL, device)
    scaler = precision.grad_scaler(device, amp_dtype)
    augment = device_augmentation(cfg, device)

    # ============ resume ============
    start_epoch, start_step, global_step = 0, 0, 0
    resumed = (
        checkpoint.load_latest(root, map_location=device) if cfg.CHECKPOINT.AUTO_RESUME else None
    )
    if resumed is not None:
        state, meta = resumed
        load_model_state(model, state, meta["file"], cfg)
        criterion.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        criterion.generator.set_state(
            state["negatives_rng"][env.rank % len(state["negatives_rng"])].cpu().clone()
        )
        start_epoch, start_step, global_step = (
            state["epoch"],
            state["step_in_epoch"],
            state["global_step"],
        )
        log.info(
            "resumed from %s: epoch %d, step %d (global step %d)",
            meta["file"],
            start_epoch,
            start_step,
            global_step,
        )
    else:
        if cfg.CHECKPOINT.AUTO_RESUME and checkpoint.complete(root):
            # Starting over would also let KEEP_LAST delete the new run's checkpoints in favour
            # of the unusable, higher-numbered ones.
            raise StorageError(
                f"{storage.join(root, 'checkpoints')} holds checkpoints but none verifies "
                "(corrupt, partial or unsafe: see the warnings above); restore a good copy, or "
                "move them away to start from scratch"
            )
        criterion.memory.sync(cfg.LOSS.nce_loss_with_memory.memory_params.init_sync)
    metrics = read_metrics(root, global_step) if env.is_main else []
    tb = (
        TensorBoardLog.open(cfg.HOOKS.TENSORBOARD_SETUP, root, global_step) if env.is_main else None
    )
    unverified = {"check": resumed is not None}  # newer checkpoints than the one resumed from

    ddp_model = data_parallel(model, cfg, env)

    def replica_digests() -> dict:
        """sha256 of every rank's memory bank and model parameters: replicas must be bit-identical.
        (BN running statistics are per rank between steps; DDP broadcasts rank 0's each forward.)"""
        out = {}
        for name, tensors in (
            ("memory", [criterion.memory.memory]),
            ("model", list(model.parameters())),
        ):
            h = hashlib.sha256()
            for t in tensors:
                h.update(
                    t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                )
            digest = torch.tensor(list(h.digest()[:8]), dtype=torch.uint8, device=device)
            out[name] = [bytes(d.tolist()).hex() for d in dist.all_gather_cat(digest[None]).cpu()]
        return out

    def save(epoch: int, step_in_epoch: int) -> None:
        # Every rank's negatives RNG state is gathered so each resumes its own stream.
        digests = replica_digests()
        if any(len(set(v)) > 1 for v in digests.values()):
            log.error("replicas differ across ranks: %s", digests)
        metrics.append(
            {
                "epoch": epoch,
                "step": step_in_epoch,
                "global_step": global_step,
                "replica_digests": digests,
            }
        )
        rng = criterion.generator.get_state()
        rngs = dist.all_gather_cat(rng[None].to(device)).cpu() if env.world_size > 1 else rng[None]
        if env.is_main:
            if unverified["check"]:
                unverified["check"] = False
                for name in checkpoint.unpublish_newer(root, global_step):
                    log.warning("unpublished %s: newer than the resumed one, not verifiable", name)
            state = {
                "model": model.state_dict(),
                "loss": criterion.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "negatives_rng": [r.clone() for r in rngs],  # own storage each: set_state needs it
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": global_step,
                "config": config.dump_yaml(cfg),
            }
            # metrics first: killed in between, metrics.jsonl holds every record up to the newest
            # checkpoint (a resume drops the records beyond it), never fewer
            terminate["saving"] = True
            write_metrics(root, metrics)
            url = checkpoint.save(
                root,
                state,
                epoch=epoch,
                step_in_epoch=step_in_epoch,
                global_step=global_step,
                keep_last=cfg.CHECKPOINT.KEEP_LAST,
            )
            terminate["saving"] = False
            log.info("checkpoint %s", url)
            if tb:
                tb.upload()
        dist.barrier()

    terminate = {"flag": False, "saving": False}

    def on_sigterm(*_) -> None:
        terminate["flag"] = True
        if terminate["saving"]:  # a checkpoint upload can outlast the grace period: abandon it
            storage.interrupt()

    signal.signal(signal.SIGTERM, on_sigterm)
    max_steps = cfg.MAX_STEPS if cfg.MAX_STEPS > 0 else None
    iter_freq = cfg.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY

    # ============ training ============
    for epoch in range(start_epoch, num_epochs):
        model.train()
        criterion.train()
        first = start_step if epoch == start_epoch else 0
        loss_sum, seen, t_epoch = 0.0, 0, time.perf_counter()
        criterion.meter.reset()
        t_log, imgs_log = time.perf_counter(), 0
        # A progress bar on an interactive terminal (rank 0); pod logs get the periodic lines only.
        bar = tqdm(
            total=steps_per_epoch,
            initial=first,
            desc=f"epoch {epoch}",
            leave=False,
            disable=not (env.is_main and sys.stderr.isatty()),
        )
        for step, batch in enumerate(data.batches(epoch, first), start=first):
            bar.update(1)
            if augment is not None:
                batch = augment(batch, epoch)
            lr = config.lr_at(derived.lr, epoch + step / steps_per_epoch, num_epochs)
            set_lr(optimizer, lr)
            index = batch["index"].to(device, non_blocking=True)
            inputs = {
                k: precision.place_input(batch[k], cfg.MODEL, device) for k in model.input_keys
            }
            with precision.autocast(device, amp_dtype):
                outputs = ddp_model(inputs)
            loss = criterion(outputs, index)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            if tb:
                tb.add_model(model, global_step)

            # One all-reduce carries the loss and the SIGTERM flag, so that every rank stops
            # after the same step (and all exit 143) wherever the signal arrived.
            stats = torch.stack(
                [loss.detach().reshape(()), loss.new_tensor(1.0 if terminate["flag"] else 0.0)]
            )
            dist.all_reduce_sum(stats)
            loss_value = (stats[0] / env.world_size).item()
            stop_requested = bool(stats[1].item() > 0)
            if not math.isfinite(loss_value):
                raise DivergedError(
                    f"loss is {loss_value} at epoch {epoch} step {step}: training diverged; lower the LR "
                    "(config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value) or check the data"
                )
            loss_sum += loss_value
            seen += 1
            imgs_log += index.shape[0]
            if (step + 1) % cfg.LOG_FREQUENCY == 0 or step + 1 == steps_per_epoch:
                dt = time.perf_counter() - t_log
                record = {
                    "epoch": epoch,
                    "step": step + 1,
                    "global_step": global_step,
                    "loss": loss_value,
                    "lr": lr,
                    "images_per_sec_per_rank": imgs_log / dt,
                    "images_per_sec": imgs_log * env.world_size / dt,
                }
                metrics.append(record)
                if tb:
                    tb.add_record(record)
                log.info(
                    "epoch %d step %d/%d loss %.4f lr %.5f | %.1f img/s/rank, %.1f img/s",
                    epoch,
                    step + 1,
                    steps_per_epoch,
                    loss_value,
                    lr,
                    record["images_per_sec_per_rank"],
                    record["images_per_sec"],
                )
                t_log, imgs_log = time.perf_counter(), 0
            if stop_requested:  # before any save: a SIGTERM'd job writes nothing more
                raise Terminated()
            stop_now = max_steps is not None and global_step >= max_steps
            if iter_freq > 0 and global_step % iter_freq == 0 and step + 1 < steps_per_epoch:
                save(epoch, step + 1)
            if stop_now:
                log.info("MAX_STEPS=%d reached", max_steps)
                save(epoch, step + 1)
                if tb:
                    tb.close()
                return {"global_step": global_step, "epoch": epoch}
        bar.close()
        if seen:
            record = {
                "epoch": epoch,
                "global_step": global_step,
                "epoch_loss": loss_sum / seen,
                "epoch_seconds": time.perf_counter() - t_epoch,
            }
            health = criterion.meter.summary(
                criterion.memory.memory, record["epoch_loss"], criterion.chance()
            )
            record["health"] = health
            metrics.append(record)
            if tb:
                tb.add_record(record)
                tb.add_model(model, global_step, epoch_end=True)
            log.info(
                "epoch %d done: mean loss %.4f (%.2fx chance) in %.1fs | bank mean cosine %.3f, "
                "alignment %.3f, uniformity %.3f",
                epoch,
                record["epoch_loss"],
                health["loss_vs_chance"],
                record["epoch_seconds"],
                health["bank_mean_cosine"],
                health["alignment"],
                health["uniformity"],
            )
            warning = collapse_warning(health, epoch) if env.is_main else None
            if warning:
                log.warning("epoch %d: %s", epoch, warning)
        if (epoch + 1) % cfg.CHECKPOINT.CHECKPOINT_FREQUENCY == 0 or epoch + 1 == num_epochs:
            save(epoch + 1, 0)

    if env.is_main:
        export_torchvision(model.state_dict(), root)  # trunk.safetensors + trunk.pt
        storage.write_bytes(
            storage.join(root, "train_config.yaml"), config.dump_yaml(cfg, derived).encode()
        )
        log.info("done: trunk exported to %s", storage.join(root, "trunk.safetensors"))
    if tb:
        tb.close()
    return {"global_step": global_step, "epoch": num_epochs}


PEER_FAILURE_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "peer")


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank died or stalled (retryable), not a bug here."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    return any(m in str(exc).lower() for m in PEER_FAILURE_MARKERS)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, derived = config.load(args.overrides, world_size=args.world_size)
        if args.dry_run:
            sys.stdout.write(config.dump_yaml(cfg, derived))
            return 0
        env = dist.init(cfg.MACHINE.DEVICE, cfg.DISTRIBUTED.TIMEOUT_SECONDS)
        setup_logging(env.rank)
        config.derive(cfg, env.world_size)  # world-size check against NUM_NODES x NUM_PROC_PER_NODE
        held = None
        if env.is_main:
            storage.check_writable(cfg.CHECKPOINT.DIR)
            held = lease.acquire(cfg.CHECKPOINT.DIR, "pirl train", "CHECKPOINT.DIR")
        seed_everything(cfg.SEED_VALUE, env.rank)
        try:
            train(cfg, derived, env)
        except (RuntimeError, torch.distributed.DistError) as exc:
            if env.world_size == 1 or not is_peer_failure(exc):
                raise
            # A peer died or a collective timed out: retryable, the restarted job resumes.
            print(
                redact(f"pirl train: lost a peer or timed out in a collective: {exc}"),
                file=sys.stderr,
            )
            return EXIT_RETRYABLE
        finally:
            if held is not None:
                held.release()  # not after SIGTERM stopped an upload: the lease then expires
            storage.clear_interrupt()
            dist.cleanup()
        return 0
    except PirlError as exc:
        print(redact(f"pirl train: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print(
            "pirl train: SIGTERM received; stopped without writing (resume picks up the last checkpoint)",
            file=sys.stderr,
        )
        return EXIT_TERMINATED


if __name__ == "__main__":
    sys.exit(main())
