"""The training loop: schedule, logging with rates and ETA, checkpoints, resume, a guard against
non-finite steps, evaluation during training, and a clean stop on SIGINT/SIGTERM."""
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Dict, Iterable, Optional

import mindspore as ms
import numpy as np

from src.engine.checkpoint import CheckpointKeeper, TrainingCheckpoint, fitting_params, read_best_ap, save_best
from src.utils.progress import Progress

logger = logging.getLogger("fcos")

# Optimiser parameters that this run's configuration sets (the whole learning-rate schedule and
# the momentum factor): a resumed run takes them from its configuration, not from the checkpoint,
# so that a changed --base_lr or --epochs applies and the logged learning rate is the one used.
CONFIGURED_PARAMS = ("learning_rate", "momentum")


class TrainingStopped(RuntimeError):
    """Raised when too many consecutive steps were not finite."""


class Trainer:
    """Runs ``train_step`` (a TrainStep cell) over epochs of batches (see ``run``).

    evaluate() -> {metric: value} or None; it is called every ``eval_interval`` epochs and the
    best checkpoint by AP is kept as best.ckpt. Checkpoints go to <output_dir>/checkpoints unless
    ``save_checkpoints`` is False (data-parallel ranks other than 0).
    """

    def __init__(self, train_step: ms.nn.Cell, *, steps_per_epoch: int, epochs: int, global_batch: int,
                 lr_schedule: np.ndarray, output_dir: str, save_checkpoints: bool = True, log_interval: int = 20,
                 save_ckpt_epochs: int = 1, save_ckpt_steps: int = 0, keep_ckpt_max: int = 5, max_bad_steps: int = 10,
                 eval_interval: int = 0,
                 evaluate: Optional[Callable[[], Optional[Dict[str, float]]]] = None) -> None:
        self.train_step = train_step
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.global_batch = global_batch
        self.lr_schedule = lr_schedule
        self.save_checkpoints = save_checkpoints
        self.log_interval = max(int(log_interval), 1)
        self.save_ckpt_epochs = save_ckpt_epochs
        self.save_ckpt_steps = save_ckpt_steps
        self.max_bad_steps = max_bad_steps
        self.eval_interval = eval_interval
        self.evaluate = evaluate
        self.ckpt_dir = os.path.join(output_dir, "checkpoints")
        self.keeper = CheckpointKeeper(self.ckpt_dir, keep_ckpt_max)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        # best.ckpt is the folder's best over runs: a new or resumed run replaces it only with a better AP
        self.best_path = os.path.join(self.ckpt_dir, "best.ckpt")
        self.best_ap = read_best_ap(self.best_path) if save_checkpoints else -1.0  # only rank 0 writes it
        self.bad_in_row = 0
        self.bad_total = 0
        self.resumed_from = None
        self._stop_signal = None

    # ---- state ----
    def resume_from(self, checkpoint: TrainingCheckpoint) -> None:
        """Restore weights, optimiser state and the schedule position from a TrainingCheckpoint
        (src.engine.checkpoint.read_training_checkpoint); ValueError if it does not fit.

        On another global batch (devices x batch_size) than the saving run's, the data plan and
        the steps per epoch differ, so the saved step position means nothing here: a checkpoint of
        an epoch's end continues with the next epoch on this run's plan (the schedule position
        becomes epoch x this run's steps per epoch, so lr_steps epochs keep their meaning), one
        from inside an epoch is refused.
        """
        own = {name: param for name, param in self.train_step.parameters_dict().items()
               if name not in CONFIGURED_PARAMS}
        meta = checkpoint.meta
        saved_batch = checkpoint.global_batch
        other_batch = saved_batch is not None and saved_batch != self.global_batch
        if other_batch and meta["step_in_epoch"]:
            raise ValueError(f"{checkpoint.path} was saved inside epoch {meta['epoch'] + 1} with global batch "
                             f"{saved_batch}; this run's is {self.global_batch}: resume from an end-of-epoch "
                             f"checkpoint, or keep devices x batch_size = {saved_batch}")
        ms.load_param_into_net(self.train_step, fitting_params(own, checkpoint.params, checkpoint.path))
        self.epoch, self.step_in_epoch, self.global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
        self.resumed_from = checkpoint.path
        if other_batch:
            self.global_step = self.epoch * self.steps_per_epoch
            self.train_step.optimizer.global_step.set_data(
                ms.Tensor([self.global_step], self.train_step.optimizer.global_step.dtype))
            logger.info("global batch %d -> %d: epoch %d continues on this run's data plan at step %d",
                        saved_batch, self.global_batch, self.epoch + 1, self.global_step)
        logger.info("resumed from %s at epoch %d, step %d of the epoch, global step %d",
                    checkpoint.path, self.epoch + 1, self.step_in_epoch, self.global_step)

    def save(self) -> Optional[str]:
        if not self.save_checkpoints:
            return None
        epoch, step_in_epoch = self.epoch, self.step_in_epoch
        if step_in_epoch == self.steps_per_epoch:  # a step checkpoint at an epoch's end
            epoch, step_in_epoch = epoch + 1, 0
        path = self.keeper.save(self.train_step, epoch, step_in_epoch, self.global_step, self.global_batch)
        logger.info("saved %s", path)
        return path

    # ---- loop ----
    def run(self, make_dataset: Callable[[int, int], Iterable[Any]]) -> bool:
        """Train to the end; False when stopped by SIGINT/SIGTERM (after saving a checkpoint).

        make_dataset(epoch, start_batch) -> an iterable of (images, gt_boxes, gt_labels, gt_mask)
        batches of that epoch from batch ``start_batch`` on (non-zero when resuming mid-epoch).
        """
        total_steps = self.steps_per_epoch * self.epochs
        progress = Progress(total_steps - self.global_step, self.global_batch, warmup=1)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.epoch < self.epochs:
                if not self._run_epoch(make_dataset, progress):
                    return False
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self._end_of_epoch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        logger.info("training finished: %d steps, %d skipped as non-finite", self.global_step, self.bad_total)
        return True

    def _run_epoch(self, make_dataset, progress):
        """Train the rest of the current epoch; False when stopped by a signal."""
        last_step = self.steps_per_epoch * self.epochs
        t_data = time.perf_counter()
        data_seconds = 0.0
        for batch in make_dataset(self.epoch, self.step_in_epoch):
            data_seconds += time.perf_counter() - t_data
            total, loss_cls, loss_reg, loss_ctr, finite = self.train_step(*batch)
            losses = [float(x.asnumpy()) for x in (total, loss_cls, loss_reg, loss_ctr)]
            self._check_finite(bool(finite.asnumpy()), losses)
            self.step_in_epoch += 1
            self.global_step += 1
            progress.step()
            progress.bar(f"epoch {self.epoch + 1}/{self.epochs}")
            # not at every epoch's end: epochs of a few steps (window mode) would log every few steps
            if self.global_step % self.log_interval == 0 or self.global_step == last_step:
                self._log(losses, progress, data_seconds)
                data_seconds = 0.0
            if self.save_ckpt_steps and self.global_step % self.save_ckpt_steps == 0:
                self.save()
            if self._stop_signal is not None:
                logger.warning("received %s: saving a checkpoint and stopping",
                               signal.Signals(self._stop_signal).name)
                self.save()
                return False
            t_data = time.perf_counter()
        return True

    def _end_of_epoch(self):
        if self.save_ckpt_epochs and self.epoch % self.save_ckpt_epochs == 0 or self.epoch == self.epochs:
            self.save()
        if self.evaluate and self.eval_interval and (self.epoch % self.eval_interval == 0 or self.epoch == self.epochs):
            metrics = self.evaluate()
            if not (metrics and self.save_checkpoints):
                return
            if metrics["AP"] > self.best_ap:
                self.best_ap = metrics["AP"]
                path = save_best(self.train_step.network, self.best_path, self.best_ap,
                                 {"epoch": self.epoch, "global_step": self.global_step,
                                  "global_batch": self.global_batch})
                logger.info("new best AP %.4f at epoch %d: %s", self.best_ap, self.epoch, path)
            else:
                logger.info("AP %.4f does not beat %s's %.4f: kept", metrics["AP"], self.best_path, self.best_ap)

    def _check_finite(self, finite, losses):
        if finite and all(math.isfinite(x) for x in losses):
            self.bad_in_row = 0
            return
        self.bad_in_row += 1
        self.bad_total += 1
        logger.warning("step %d: non-finite loss or gradient (loss %s), update skipped (%d in a row)",
                       self.global_step + 1, losses[0], self.bad_in_row)
        if self.bad_in_row >= self.max_bad_steps:
            raise TrainingStopped(f"{self.bad_in_row} non-finite steps in a row at step {self.global_step + 1}; "
                                  f"last good checkpoint: {self.keeper.latest() or self.resumed_from or 'none saved yet'} (try a lower base_lr or "
                                  "grad_clip_norm)")

    def _log(self, losses, progress, data_seconds):
        lr = float(self.lr_schedule[min(self.global_step - 1, len(self.lr_schedule) - 1)])
        total, loss_cls, loss_reg, loss_ctr = losses
        logger.info("epoch %d/%d step %d/%d (global %d) loss %.4f (cls %.4f reg %.4f ctr %.4f) lr %.6f "
                    "%.3f s/step %.2f img/s data %.3f s ETA %s",
                    self.epoch + 1, self.epochs, self.step_in_epoch, self.steps_per_epoch, self.global_step,
                    total, loss_cls,
                    loss_reg, loss_ctr, lr, progress.seconds_per_step(), progress.items_per_second(),
                    data_seconds, progress.eta())

    def _on_signal(self, signum, _frame):
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
