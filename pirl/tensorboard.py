"""TensorBoard event files of a run (VISSL's HOOKS.TENSORBOARD_SETUP), on any fsspec URL.

torch's SummaryWriter writes to a local staging folder; `upload()` copies each event file whole to
the destination through `pirl.storage` (one object write per file, so a reader sees the previous
copy or the new one, never a partial file). The trainer uploads at every checkpoint, every
FLUSH_EVERY_N_MIN minutes and at the end. Only rank 0 writes.

Tags follow VISSL's tensorboard hook where it has one: `Training/Loss`, `Training/Learning_rate`,
`Speed/img_per_sec_per_gpu`, `Parameters/<name>` and `Gradients/<name>` histograms. Ours:
`Speed/img_per_sec` (all ranks), `Training/Epoch_loss`, `Speed/Epoch_seconds`, `Health/<metric>`
(pirl.health, per epoch); every one at the global step. `pirl benchmark` writes its linear
heads' losses and accuracies per epoch and its kNN accuracies (`add_benchmark`).
A resumed run starts its event file with purge_step = the checkpoint's step, so TensorBoard drops
what the interrupted run logged after that checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

from pirl import storage
from pirl.errors import StorageError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("pirl")

# metrics.jsonl record key -> TensorBoard tag
SCALAR_TAGS = {
    "loss": "Training/Loss",
    "lr": "Training/Learning_rate",
    "images_per_sec_per_rank": "Speed/img_per_sec_per_gpu",
    "images_per_sec": "Speed/img_per_sec",
    "epoch_loss": "Training/Epoch_loss",
    "epoch_seconds": "Speed/Epoch_seconds",
}


def event_dir(setup: Any, run_dir: str) -> str:
    """Where the event files go: LOG_DIR/EXPERIMENT_LOG_DIR, LOG_DIR "." meaning `run_dir`."""
    experiment = setup.EXPERIMENT_LOG_DIR
    if "://" in experiment or os.path.isabs(experiment):
        return experiment
    base = run_dir if setup.LOG_DIR in (".", "./") else setup.LOG_DIR
    return storage.join(base, experiment)


class TensorBoardLog:
    """One writer's event file, staged locally and uploaded to `url`."""

    def __init__(
        self,
        url: str,
        flush_every_s: float = 300.0,
        purge_step: int | None = None,
        log_params: bool = False,
        log_gradients: bool = False,
        params_every: int = -1,
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.url = url
        self.flush_every_s = flush_every_s
        self.log_params, self.log_gradients, self.params_every = (
            log_params,
            log_gradients,
            params_every,
        )
        self._staging = tempfile.TemporaryDirectory(prefix="pirl-tensorboard-")
        self.writer = SummaryWriter(
            self._staging.name, purge_step=purge_step, flush_secs=flush_every_s
        )
        self._uploaded_at = time.monotonic()
        self._params_step = -1  # the step whose histograms were written last

    @classmethod
    def open(cls, setup: Any, run_dir: str, global_step: int = 0) -> TensorBoardLog | None:
        """The run's log as HOOKS.TENSORBOARD_SETUP asks (None when USE_TENSORBOARD is off);
        the destination is checked writable now, so a bad URL fails the start, not the end."""
        if not setup.USE_TENSORBOARD:
            return None
        url = event_dir(setup, run_dir)
        storage.check_writable(url)
        log.info("tensorboard: event files go to %s", url)
        return cls(
            url,
            setup.FLUSH_EVERY_N_MIN * 60.0,
            purge_step=global_step or None,
            log_params=setup.LOG_PARAMS,
            log_gradients=setup.LOG_PARAMS_GRADIENTS,
            params_every=setup.LOG_PARAMS_EVERY_N_ITERS,
        )

    def add_record(self, record: dict) -> None:
        """The scalars of one metrics.jsonl record (a step's or an epoch's) at its global_step."""
        step = record["global_step"]
        for key, tag in SCALAR_TAGS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], step)
        for name, value in record.get("health", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"Health/{name}", value, step)
        self.upload_if_due()

    def add_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.upload_if_due()

    def add_model(self, model: nn.Module, step: int, epoch_end: bool = False) -> None:
        """Parameter (and gradient) histograms, as LOG_PARAMS* ask: at epoch ends and every
        LOG_PARAMS_EVERY_N_ITERS steps. Gradients are the last step's, as the optimizer used
        them (times the loss scale under float16 autocast)."""
        if not self.log_params or step == self._params_step:
            return
        if not epoch_end and (self.params_every <= 0 or step % self.params_every):
            return
        self._params_step = step
        for name, param in model.named_parameters():
            self.writer.add_histogram(f"Parameters/{name}", param.detach(), step)
            if self.log_gradients and param.grad is not None:
                self.writer.add_histogram(f"Gradients/{name}", param.grad.detach(), step)

    def upload_if_due(self) -> None:
        if time.monotonic() - self._uploaded_at >= self.flush_every_s:
            self.upload()

    def upload(self) -> None:
        """Copy every staged event file to the destination. A failed copy is a warning, not
        the run's end: the next upload copies the whole file again."""
        self.writer.flush()
        self._uploaded_at = time.monotonic()
        for name in sorted(os.listdir(self._staging.name)):
            with open(os.path.join(self._staging.name, name), "rb") as f:
                data = f.read()
            try:
                storage.write_bytes(storage.join(self.url, name), data)
            except StorageError as exc:
                log.warning("tensorboard: could not upload %s (%s); retried later", name, exc)

    def close(self) -> None:
        self.writer.close()
        self.upload()
        self._staging.cleanup()


def add_benchmark(tb: TensorBoardLog, metrics: dict) -> None:
    """A `pirl benchmark` result, per trunk (trained, random_init) at the linear epoch:
    `<trunk>/Linear/<head>/{train_loss,top1,top5}` (top-1/top-5 at the tested epochs),
    `<trunk>/Linear/lr` and, at the last epoch, `<trunk>/kNN/k<k>/{top1,top5}`."""
    for trunk, result in metrics["trunks"].items():
        history = result["linear_train"]
        for record in history:
            values = {f"{trunk}/Linear/lr": record["lr"]}
            for head, loss in record["loss"].items():
                values[f"{trunk}/Linear/{head}/train_loss"] = loss
            for head, acc in record.get("test", {}).items():
                values[f"{trunk}/Linear/{head}/top1"] = acc["top1"]
                values[f"{trunk}/Linear/{head}/top5"] = acc["top5"]
            tb.add_scalars(values, record["epoch"])
        for k, acc in result.get("knn", {}).items():
            knn = {f"{trunk}/kNN/k{k}/top1": acc["top1"], f"{trunk}/kNN/k{k}/top5": acc["top5"]}
            tb.add_scalars(knn, history[-1]["epoch"])
