"""The training record: every per-step, per-epoch and per-checkpoint record goes through
`MetricsLog`, which logs it and keeps it for `metrics.jsonl` in CHECKPOINT.DIR (one JSON record
a line, rewritten whole on every checkpoint, before the checkpoint itself: killed in between,
the file holds every record up to the newest checkpoint, never fewer) and, with
HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD, also into TensorBoard event files (rank 0)."""

from __future__ import annotations

import json
import logging
import time

from torch import nn

from pirl import storage
from pirl.health import collapse_warning
from pirl.tensorboard import TensorBoardLog

log = logging.getLogger("pirl")

FILE = "metrics.jsonl"


def read_metrics(root: str, upto_step: int) -> list[dict]:
    """The records of `root`/metrics.jsonl up to global step `upto_step` (a resumed run drops
    the ones beyond its checkpoint); [] when there is no file yet. A store that fails raises
    (StorageUnavailable is retryable): returning [] would let the next save truncate the
    history."""
    url = storage.join(root, FILE)
    try:
        lines = storage.read_bytes(url).decode().splitlines()
    except FileNotFoundError:
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
        storage.join(root, FILE), "".join(json.dumps(r) + "\n" for r in records).encode()
    )


class MetricsLog:
    """Records and log lines of one run. Rank 0 holds the history read back on resume and
    writes the file; every rank logs (the logging level keeps other ranks' INFO quiet)."""

    def __init__(
        self,
        root: str,
        records: list[dict],
        world_size: int,
        is_main: bool,
        tensorboard: TensorBoardLog | None = None,
    ):
        self.root, self.records = root, records
        self.world_size, self.is_main = world_size, is_main
        self.tensorboard = tensorboard
        self.start_interval()

    @classmethod
    def resume(
        cls, root: str, upto_step: int, world_size: int, is_main: bool, tensorboard_setup=None
    ) -> MetricsLog:
        """The history up to `upto_step` (rank 0); TensorBoard as `tensorboard_setup` asks,
        dropping what a previous attempt logged past `upto_step`."""
        if not is_main:
            return cls(root, [], world_size, is_main)
        history = read_metrics(root, upto_step)
        tb = None
        if tensorboard_setup is not None:
            tb = TensorBoardLog.open(tensorboard_setup, root, upto_step)
        return cls(root, history, world_size, is_main, tb)

    def _add(self, record: dict) -> None:
        self.records.append(record)
        if self.tensorboard:
            self.tensorboard.add_record(record)

    def params(self, model: nn.Module, global_step: int, epoch_end: bool = False) -> None:
        """Parameter/gradient histograms, when TensorBoard's LOG_PARAMS* ask for them."""
        if self.tensorboard:
            self.tensorboard.add_model(model, global_step, epoch_end)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()

    def start_interval(self) -> None:
        """Throughput counts from here: the start of an epoch, or the last step record."""
        self._since, self._images = time.perf_counter(), 0

    def count_images(self, n: int) -> None:
        self._images += n

    def step(
        self, epoch: int, step: int, steps_per_epoch: int, global_step: int, loss: float, lr: float
    ) -> None:
        """A step record (`step` counted from 1), with this rank's and the job's images/s
        since the previous one."""
        seconds = time.perf_counter() - self._since
        record = {
            "epoch": epoch,
            "step": step,
            "global_step": global_step,
            "loss": loss,
            "lr": lr,
            "images_per_sec_per_rank": self._images / seconds,
            "images_per_sec": self._images * self.world_size / seconds,
        }
        self._add(record)
        log.info(
            "epoch %d step %d/%d loss %.4f lr %.5f | %.1f img/s/rank, %.1f img/s",
            epoch,
            step,
            steps_per_epoch,
            loss,
            lr,
            record["images_per_sec_per_rank"],
            record["images_per_sec"],
        )
        self.start_interval()

    def epoch(
        self, epoch: int, global_step: int, epoch_loss: float, seconds: float, health: dict
    ) -> None:
        """An epoch record: mean loss, wall time, the representation's health (pirl.health)."""
        record = {
            "epoch": epoch,
            "global_step": global_step,
            "epoch_loss": epoch_loss,
            "epoch_seconds": seconds,
            "health": health,
        }
        self._add(record)
        log.info(
            "epoch %d done: mean loss %.4f (%.2fx chance) in %.1fs | bank mean cosine %.3f, "
            "alignment %.3f, uniformity %.3f",
            epoch,
            epoch_loss,
            health["loss_vs_chance"],
            seconds,
            health["bank_mean_cosine"],
            health["alignment"],
            health["uniformity"],
        )
        warning = collapse_warning(health, epoch) if self.is_main else None
        if warning:
            log.warning("epoch %d: %s", epoch, warning)

    def checkpoint(self, epoch: int, step_in_epoch: int, global_step: int, digests: dict) -> None:
        """A checkpoint record: every rank's memory-bank and model digests (replicas must agree)."""
        if any(len(set(v)) > 1 for v in digests.values()):
            log.error("replicas differ across ranks: %s", digests)
        self.records.append(
            {
                "epoch": epoch,
                "step": step_in_epoch,
                "global_step": global_step,
                "replica_digests": digests,
            }
        )

    def write(self) -> None:
        """metrics.jsonl rewritten whole (rank 0, just before a checkpoint); the TensorBoard
        event files uploaded with it."""
        write_metrics(self.root, self.records)
        if self.tensorboard:
            self.tensorboard.upload()
