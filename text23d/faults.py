"""What a run survives: signals, non-finite steps, out-of-memory; and the `faults.*` injection that
tests and drills use to provoke them (README: "What survives what").

A run never dies between two steps with its work lost: a signal (SIGTERM, SIGINT, SLURM's SIGUSR1,
submitit's SIGUSR2) is noted and acted on at the next step boundary, where a checkpoint is written
and the run ends with 128 + the signal number; a NaN/Inf loss or gradient is never applied; a CUDA
out-of-memory error saves the last complete state and says what to lower."""
from __future__ import annotations

import logging
import math
import os
import signal
import threading

from text23d.errors import DiskFull, RunStopped  # noqa: F401  (raised and caught as faults.*)

log = logging.getLogger("text23d")
SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")) if s)


class Interrupted(RunStopped):
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class NonFiniteError(RunStopped):
    exit_code = 3


class OutOfMemory(RunStopped):
    exit_code = 4


JOB_FILE = ".submitit-job"  # in a run folder: the submitit job that runs there


def submitit_job() -> str | None:
    """The id of the submitit job this process runs in (a requeued job keeps it); None outside one."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # noqa: BLE001 (not a submitit job after all)
        return None


def requeued(folder) -> bool:
    """Whether this process is a submitit job started again (pre-empted, timed out) in its own folder."""
    job, f = submitit_job(), os.path.join(str(folder), JOB_FILE)
    if job is None or not os.path.isfile(f):
        return False
    with open(f) as fh:
        return fh.read().strip() == job


def mark_job(folder) -> None:
    job = submitit_job()
    if job is not None:
        from text23d.fileio import write_text_atomic

        write_text_atomic(os.path.join(str(folder), JOB_FILE), job)


def inject(faults, step: int, rank: int) -> float:
    """`faults.*`: raise the injected error at this step (on `faults.rank` only, if set); returns
    the factor for the loss (NaN at `faults.nan_at_steps`, else 1)."""
    import torch

    if faults is None or (faults.get("rank") is not None and faults.rank != rank):
        return 1.0
    if faults.get("raise_at_step") == step:
        raise RuntimeError(f"injected fault (faults.raise_at_step={step}, rank {rank})")
    if faults.get("oom_at_step") == step:
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 20.00 GiB (injected: faults.oom_at_step={step})")
    return math.nan if step in list(faults.get("nan_at_steps") or []) else 1.0


class SignalWatch:
    """Notes the first of SIGNALS while installed; a second SIGINT (Ctrl+C twice) stops at once.
    Handlers installed before (submitit's requeue handler) are kept, to be called at the boundary."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> "SignalWatch":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only (a joblib worker thread, say)
        for s in SIGNALS:
            self.previous[s] = signal.getsignal(s)
            signal.signal(s, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: stopping at the end of this step, with a checkpoint",
                        signal.Signals(signum).name)

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def pass_on(self) -> None:
        """After the checkpoint: hand the signal to a handler that was there before (submitit
        requeues the job from it), if it is a Python function."""
        handler = self.previous.get(self.signum)
        if callable(handler) and handler not in (signal.default_int_handler,):
            handler(self.signum, None)


def oom_advice(error: BaseException, stage_cfg, device) -> str:
    """The memory asked for and available, and what to lower first for this stage."""
    import re

    import torch

    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", str(error))
    free = ""
    if device is not None and device.type == "cuda":
        f, total = torch.cuda.mem_get_info(device)
        free = f"; {f / 2**30:.1f} GiB of {total / 2**30:.1f} GiB free on {device}"
    size = f"{stage_cfg.width or 'prior'}x{stage_cfg.height or 'prior'}"
    return (f"out of memory in stage {stage_cfg.name} (asked for {asked.group(1) if asked else 'more than is free'}"
            f"{free}). Lower, in this order: the render size (system.stage.{stage_cfg.name}.width/height, now "
            f"{size}), the batch (system.batch_size, now {stage_cfg.batch_size}), the samples per ray "
            "(renderer.num_samples), or use half precision for the prior (prior.dtype=float16)")


def callback(watch: SignalWatch, save):
    """A Lightning callback that acts on a noted signal at the step boundary, and saves the last
    complete state when a run stops on its own (non-finite steps, out of memory). `save(trainer)`
    writes ckpts/last.ckpt (call it on every rank: Lightning writes on rank 0 only)."""
    import lightning as L
    import torch

    class _Guard(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            signum = watch.signum
            if trainer.world_size > 1:  # a signal that reached one rank stops them all, together
                t = torch.tensor([float(signum or 0)], device=pl_module.device)
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                signum = int(t.item()) or None
            if signum is None:
                return
            watch.signum = signum
            save(trainer)
            name = signal.Signals(signum).name
            out = pl_module.out_dir
            message = (f"interrupted by {name} at step {trainer.global_step}: checkpoint saved in "
                       f"{out / 'ckpts' / 'last.ckpt'}; nothing was exported. Resume with: text23d resume={out}")
            if callable(watch.previous.get(signum)) and watch.previous[signum] is not signal.default_int_handler:
                log.warning("%s at step %d: checkpoint saved; handing the signal to the launcher (submitit "
                            "requeues the job, which then resumes from this step)", name, trainer.global_step)
            watch.pass_on()  # submitit's handler requeues the job from here (and exits)
            raise Interrupted(signum, message)

        def on_exception(self, trainer, pl_module, exception) -> None:
            if isinstance(exception, (NonFiniteError, OutOfMemory)):
                if isinstance(exception, OutOfMemory) and trainer.world_size > 1:
                    # DDP: the OOM may be this rank's alone, the others waiting in a collective that a
                    # save (it ends in a barrier) never joins: all would hang. This rank exits instead,
                    # which ends the job; it resumes from the last periodic checkpoint.
                    return
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                save(trainer)

    return _Guard()
