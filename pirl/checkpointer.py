"""Saving the trainer's state: the replicas' digests, then metrics.jsonl, then the checkpoint
(pirl.checkpoint writes it whole and publishes it by its sidecar)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pirl import checkpoint, config, dist
from pirl.metrics_log import MetricsLog

if TYPE_CHECKING:
    from pirl.train import Training

log = logging.getLogger("pirl")


@dataclass
class TrainState:
    """Where training stands: the next step is `step_in_epoch` of `epoch`; `global_step` steps
    are done. `resumed`: the state came from a checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    resumed: bool = False

    def steps_left(self, max_steps: int) -> float:
        """Steps before config.MAX_STEPS (<= 0: no limit) stops the run."""
        return max(max_steps - self.global_step, 0) if max_steps > 0 else float("inf")


def replica_digests(tensors_by_name: dict[str, list[torch.Tensor]]) -> dict[str, list[str]]:
    """{name: [every rank's sha256 prefix of its tensors]}, in rank order: replicas must be
    bit-identical."""
    out = {}
    for name, tensors in tensors_by_name.items():
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        device = tensors[0].device
        digest = torch.tensor(list(h.digest()[:8]), dtype=torch.uint8, device=device)
        out[name] = [bytes(d.tolist()).hex() for d in dist.all_gather_cat(digest[None]).cpu()]
    return out


class Checkpointer:
    """Saves the model, loss (memory bank), optimizer, scaler and every rank's negatives RNG
    into CHECKPOINT.DIR. Every rank calls `save` (it gathers); rank 0 writes. `saving` is true
    while rank 0 uploads, so a SIGTERM handler can abandon an upload that would outlast the
    grace period."""

    def __init__(
        self,
        cfg: config.Config,
        env: dist.DistEnv,
        training: Training,
        metrics: MetricsLog,
        start: TrainState,
    ):
        self.cfg, self.env, self.training, self.metrics = cfg, env, training, metrics
        self.root = cfg.CHECKPOINT.DIR
        self.saving = False
        self.last_saved_step = start.global_step if start.resumed else None
        # a resumed run unpublishes, before its first save, the checkpoints newer than the one
        # it resumed from (they failed verification)
        self._unpublish_newer = start.resumed

    def save(self, state: TrainState) -> None:
        t = self.training
        digests = replica_digests(
            {"memory": [t.criterion.memory.memory], "model": list(t.model.parameters())}
        )
        # (BN running statistics are per rank between steps; DDP broadcasts rank 0's each forward.)
        self.metrics.checkpoint(state.epoch, state.step_in_epoch, state.global_step, digests)
        rng = t.criterion.generator.get_state()
        rngs = (
            dist.all_gather_cat(rng[None].to(self.env.device)).cpu()
            if self.env.world_size > 1
            else rng[None]
        )
        if self.env.is_main:
            self._write(state, rngs)
        self.last_saved_step = state.global_step
        dist.barrier()

    def save_unless_saved(self, state: TrainState) -> None:
        if self.last_saved_step != state.global_step:
            self.save(state)

    def _write(self, state: TrainState, rngs: torch.Tensor) -> None:
        if self._unpublish_newer:
            self._unpublish_newer = False
            for name in checkpoint.unpublish_newer(self.root, state.global_step):
                log.warning("unpublished %s: newer than the resumed one, not verifiable", name)
        t = self.training
        payload = {
            "model": t.model.state_dict(),
            "loss": t.criterion.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scaler": t.scaler.state_dict(),
            "negatives_rng": [r.clone() for r in rngs],  # own storage each: set_state needs it
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "config": config.dump_yaml(self.cfg),
        }
        self.saving = True
        try:  # metrics first: see pirl.metrics_log
            self.metrics.write()
            url = checkpoint.save(
                self.root,
                payload,
                epoch=state.epoch,
                step_in_epoch=state.step_in_epoch,
                global_step=state.global_step,
                keep_last=self.cfg.CHECKPOINT.KEEP_LAST,
            )
        finally:
            self.saving = False
        log.info("checkpoint %s", url)
