"""Time and peak memory of every optimisation step, logged as perf/step_s and perf/peak_mem_gb.

Always on and cheap (a clock, one allocator query): the CSV and TensorBoard logs then say where a
run spends its time and how close it came to the device's memory, and scripts/real_shapes.py
reads them. Peak memory is per step: on CUDA the allocator's peak since the step began; on CPU
the process's peak resident set (VmHWM), reset before each step where Linux allows it
(/proc/self/clear_refs), so it is the step's own peak, not the load's.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import lightning as L
import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
    except OSError:
        pass  # elsewhere the peak is the process's so far: still an upper bound


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class StepStats(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        reset_peak(pl_module.device)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        step_s = time.perf_counter() - self._t
        stats = {"perf/step_s": step_s, "perf/peak_mem_gb": peak_bytes(pl_module.device) / 2**30}
        pl_module.log_dict(stats, batch_size=1, on_step=True, on_epoch=False)
