"""One progress bar, counted in optimisation steps (with rate and ETA), not in epochs."""
from __future__ import annotations

import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, shown once as "steps" (never "Training", then "Epoch 0"), its total the run's
    steps; a resumed run's bar starts at the step it resumes from, so its rate and ETA count only the
    steps this process makes (never a negative it/s)."""

    def init_train_tqdm(self):
        """Made with its total and its start, so its first line is already right (no "0/?")."""
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        return Tqdm(desc="steps", total=self.trainer.max_steps, initial=self.trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one epoch of all the run's steps: the bar made in init_train_tqdm counts them

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            _update_n(bar, trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
