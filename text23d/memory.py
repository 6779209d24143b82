"""A stage's memory, estimated before it starts. The renders a step makes dominate where runs run
out (ProlificDreamer's 64² → 512² switch), so the estimate counts them: volume rendering keeps every
sample of every ray for the backward pass, the torch rasteriser every (triangle, pixel) pair near a
pixel. Calibrated on CPU with scripts/bench.py's peak memory (sds-builtin-32 → 64: about 270 bytes a
sample on the dense grid; raster-builtin-64 → 128: about 7.5 KB a pixel), with margin for the MLP
geometries. It does not count the prior's own weights and activations."""
from __future__ import annotations

import logging

import torch

from text23d.errors import ConfigError

log = logging.getLogger("text23d")
BYTES_PER_SAMPLE = 1024      # volume rendering, forward + backward (MLP activations included)
BYTES_PER_PIXEL_RASTER = 8192  # the pure-torch rasteriser; nvdiffrast needs far less
ABSURD = 16                  # an estimate this many times the device's whole memory is refused


def stage_bytes(stage, resolution: int, particles: int) -> int:
    """Bytes one training step of this stage needs for its renders (all particles)."""
    c = stage.cfg
    pixels = c.batch_size * (c.height or resolution) * (c.width or resolution) * particles
    samples = getattr(stage.renderer, "num_samples", None)
    per_pixel = BYTES_PER_SAMPLE * samples if samples else BYTES_PER_PIXEL_RASTER
    return int(pixels * per_pixel)


def device_memory(device) -> tuple[int, int]:
    """(free, total) bytes of the device that trains."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    import psutil

    vm = psutil.virtual_memory()
    return vm.available, vm.total


def check(system, device) -> None:
    """Refuse a stage whose renders cannot fit on any machine like this one; warn, before it
    starts, about one that will not fit in what is free now."""
    free, total = device_memory(device)
    for stage, steps in zip(system.stages, system.stage_steps):
        if not steps:
            continue
        need = stage_bytes(stage, system.prior.resolution, len(stage.particles))
        c = stage.cfg
        size = f"{c.width or system.prior.resolution}x{c.height or system.prior.resolution}"
        what = (f"stage {c.name}: {c.batch_size} view(s) of {size} "
                f"needs about {need / 2**30:.1f} GiB for its renders")
        key = f"system.stage.{c.name}" if len(system.stages) > 1 else "system"
        if need > ABSURD * total:
            raise ConfigError(f"{what}, {need / total:.0f}× the {total / 2**30:.0f} GiB of {device}. Fix: a "
                              f"render size the prior was made for, e.g. {key}.width=64 {key}.height=64")
        if need > free:
            log.warning("%s, more than the %.1f GiB free on %s: it may run out of memory. Lower %s.width/height, "
                        "system.batch_size or renderer.num_samples", what, free / 2**30, device, key)
