"""A stage's peak memory, estimated and printed before the first step.

peak ≈ what is in use now (the prior's weights, the 3D parameters, the runtime)
     + what one training step adds on top:
         renders      what the volume renderer keeps for the backward pass, probed: 4 views at
                      16² through the stage's own geometry, cameras and occupancy grid, scaled to
                      the step's rays, times BACKWARD_PEAK for the gradients the backward holds
                      beside it; for the torch rasteriser every (triangle, pixel) pair near a pixel,
                      from a calibrated cost per pixel;
         prior        the prior's activations: what the VAE encoder keeps for the backward pass at
                      the prior's resolution (the SDS gradient flows through it), VSD's LoRA
                      training pass through the whole U-Net, and the largest working set of a
                      no-grad U-Net pass. Counted exactly at the run's shapes by running copies
                      of the networks on the "meta" device (shapes only: no memory, milliseconds);
         optimizer    gradients and Adam's two moments of the trainable parameters.
The estimate is printed for every stage ("memory estimate: stage fine: about 9.8 GiB ..."); one
above what is free is a warning before the stage starts, one above 16× the device's whole memory
is refused. scripts/real_shapes.py compares it with the measured peak (perf/peak_mem_gb).
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
import torch.nn.functional as F

from text23d.errors import ConfigError

log = logging.getLogger("text23d")
BYTES_PER_SAMPLE = 1024      # volume rendering, when the geometry cannot be probed (renderer + MLP)
# The backward pass of the renders holds, beside what the forward kept, the gradients of the
# per-sample tensors it has not yet consumed: the peak of a render's forward + backward, measured
# by the process's peak resident memory, was 1.3-1.8x what the forward keeps (volume renderer,
# 48²-128², 32-256 samples a ray, 1-4 views; tests/test_faults.py compares it at another size).
BACKWARD_PEAK = 1.6
BYTES_PER_PIXEL_RASTER = 8192  # the pure-torch rasteriser; nvdiffrast needs far less
ABSURD = 16                  # an estimate this many times the device's whole memory is refused
GiB = 2**30


def render_size(stage, resolution: int) -> tuple[int, int]:
    """The largest (height, width) the stage renders at in the steps it runs: with resolution
    milestones, only the sizes whose milestone comes before the stage's last step (`stage.steps`,
    set by the system; every size when it is not known)."""
    from text23d.systems.stages import render_size as size_at

    milestones = list(stage.cfg.get("resolution_milestones") or [])
    steps = getattr(stage, "steps", None)
    starts = [0] + [m for m in milestones if steps is None or m < steps]
    sizes = [size_at(stage.cfg, s, resolution) for s in starts]
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def stage_bytes(stage, resolution: int, particles: int, per_sample: int | None = None) -> int:
    """Bytes one training step of this stage needs for its renders (all particles), from a cost per
    sample (volume) or per pixel (the torch rasteriser): what is used where the renders are not probed."""
    height, width = render_size(stage, resolution)
    pixels = stage.cfg.batch_size * height * width * particles
    samples = getattr(stage.renderer, "num_samples", None)
    per_pixel = (per_sample or BYTES_PER_SAMPLE) * samples if samples else BYTES_PER_PIXEL_RASTER
    return int(pixels * per_pixel)


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while `fn` runs (each counted once;
    parameters, which are in memory anyway, not at all)."""
    skip, seen = {id(t) for t in exclude}, {}

    def pack(t):
        if id(t) not in skip:
            seen[id(t)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def probe_renders(stage, device, height: int, width: int, side: int = 16, views: int = 4) -> int | None:
    """Bytes the volume renderer keeps for the backward pass in one step of this stage: `views`
    random views (one view varies too much with where it looks from) rendered at side² with the stage's own geometry, background, cameras and occupancy grid (a copy,
    after the first step's probe), with gradients on, scaled to the step's rays. Every tensor the
    renderer keeps counts, the samples the occupancy grid skips included. The RNG is left as it was."""
    particle, renderer = stage.particles[0], stage.renderer
    if not hasattr(renderer, "num_samples"):
        return None
    sh, steps = stage.cfg.shading, getattr(stage, "steps", None) or 1
    lit = sh.ambient_only_steps < steps and sh.albedo_prob < 1  # lambertian/textureless views: normals
    orient = stage.cfg.loss.get("lambda_orient", 0)
    orient = bool(orient[1] or orient[2]) if isinstance(orient, (list, tuple)) or hasattr(orient, "__len__") else bool(orient)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)  # the same views every time: an estimate that does not vary from run to run
            occupancy = copy.deepcopy(particle.occupancy)
            if occupancy is not None:
                occupancy.update(particle.geometry.density, 0, renderer.sample_spacing)
            cams = stage.camera_sampler.sample(views).to(device)

            def render():
                with torch.enable_grad():
                    renderer(particle.geometry, particle.background, cams, side, side,
                             shading="lambertian" if lit else "albedo",
                             **renderer.accepted(need_normals=orient, jitter=False, occupancy=occupancy))
            kept = saved_bytes(render, list(particle.parameters()))
    except Exception as err:  # a part that cannot be probed this way: the per-sample constant
        log.debug("memory: could not probe the renders of stage %s (%s)", stage.cfg.name, err)
        return None
    return int(BACKWARD_PEAK * kept * height * width / side**2 * stage.cfg.batch_size * len(stage.particles) / views)


def _meta_copy(module, dtype):
    """The same network on the meta device: shapes and dtypes only, no memory."""
    import diffusers.utils.logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # .to(dtype) on a fresh copy warns about modules kept in float32
    try:
        with torch.device("meta"):
            return type(module).from_config(module.config).to(dtype)
    finally:
        dlog.set_verbosity(level)


class _FusedAttention(torch.autograd.Function):
    """What fused attention (flash / memory-efficient, on CPU and CUDA) keeps: q, k, v, the output
    and a log-sum-exp per query. On meta tensors torch falls back to the math path, whose L×L
    attention matrix the real kernels never hold."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextlib.contextmanager
def _fused_attention():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: _FusedAttention.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _peak_transient(fn) -> int:
    """The largest single-op working set (inputs + outputs) of `fn`, run on meta tensors."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def size(ts):
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

    class Peak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = list(args) + list((kwargs or {}).values()) + (list(out) if isinstance(out, (tuple, list)) else [out])
            Peak.peak = max(Peak.peak, size(flat))
            return out
    with Peak():
        fn()
    return Peak.peak


def prior_bytes(prior, stage, height: int, width: int, particles: int) -> int:
    """The prior's activations in one step of this stage (see the module doc)."""
    if prior is None or not hasattr(prior.unet, "config"):
        return 0
    dtype, batch = prior.dtype, stage.cfg.batch_size * particles
    guidance = stage.guidance
    branches = 3 if "text_plain" in guidance.needs else 2  # cond, uncond (, plain)
    unet = _meta_copy(prior.unet, dtype)
    side = prior.resolution // (2 ** (len(prior.vae.config.block_out_channels) - 1) if prior.vae is not None else 1)
    x = torch.zeros(branches * batch, prior.channels, side, side, device="meta", dtype=dtype)
    t = torch.zeros(branches * batch, device="meta", dtype=torch.long)
    width = unet.config.get("encoder_hid_dim") or unet.config.cross_attention_dim  # IF: T5's 4096, projected
    emb = torch.zeros(branches * batch, 77, width, device="meta", dtype=dtype)
    with _fused_attention():
        return int(_prior_parts(prior, unet, guidance, x, t, emb, dtype, batch))


def _prior_parts(prior, unet, guidance, x, t, emb, dtype, batch) -> int:
    total = _peak_transient(lambda: unet(x, t, encoder_hidden_states=emb))
    if prior.vae is not None:
        vae = _meta_copy(prior.vae, dtype)
        rgb = torch.zeros(batch, 3, prior.resolution, prior.resolution, device="meta", dtype=dtype,
                          requires_grad=True)
        total += saved_bytes(lambda: vae.encode(rgb).latent_dist.mean, list(vae.parameters()))
    if guidance.learns_from_renders:  # VSD: the LoRA's training pass, through the whole U-Net
        xb = x[:batch].detach().requires_grad_(True)
        total += saved_bytes(lambda: unet(xb, t[:batch], encoder_hidden_states=emb[:batch]), list(unet.parameters()))
    return total


def optimizer_bytes(stage) -> int:
    """Gradients and Adam's two moments of the stage's trainable parameters (float32)."""
    n = sum(p.numel() for p in stage.particles.parameters() if p.requires_grad)
    return 3 * 4 * n


def in_use(device) -> int:
    """What the process holds now: on CUDA the allocator's tensors, on CPU the resident set."""
    if device is not None and device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def device_memory(device) -> tuple[int, int]:
    """(free, total) bytes of the device that trains."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    import psutil

    vm = psutil.virtual_memory()
    return vm.available, vm.total


def estimate(system, stage, device) -> dict:
    """Bytes by part for one step of `stage` (see the module doc)."""
    resolution = system.prior.resolution if system.prior is not None else 64
    height, width = render_size(stage, resolution)
    particles = len(stage.particles)
    probed = probe_renders(stage, device, height, width)
    parts = {"renders": probed if probed is not None else stage_bytes(stage, resolution, particles),
             "prior": prior_bytes(system.prior, stage, height, width, particles),
             "optimizer": optimizer_bytes(stage)}
    return parts


def check(system, device) -> None:
    """Print every stage's estimate; refuse a stage that cannot fit on any machine like this one;
    warn, before it starts, about one that will not fit in what is free now."""
    free, total = device_memory(device)
    now = in_use(device)
    for stage, steps in zip(system.stages, system.stage_steps):
        if not steps:
            continue
        parts = estimate(system, stage, device)
        need = sum(parts.values())
        c = stage.cfg
        resolution = system.prior.resolution if system.prior is not None else 64
        height, width = render_size(stage, resolution)
        what = f"stage {c.name}: {c.batch_size} view(s) of {width}x{height}"
        log.info("memory estimate: stage %s: about %.2f GiB at peak (in use now %.2f; a step adds renders %.2f, "
                 "prior activations %.2f, gradients and optimizer state %.2f) on %s with %.1f GiB free",
                 c.name, (now + need) / GiB, now / GiB, parts["renders"] / GiB, parts["prior"] / GiB,
                 parts["optimizer"] / GiB, device, free / GiB)
        key = f"system.stage.{c.name}" if len(system.stages) > 1 else "system"
        if need > ABSURD * total:
            raise ConfigError(f"{what} needs about {need / GiB:.1f} GiB a step, {need / total:.0f}× the "
                              f"{total / GiB:.0f} GiB of {device}. Fix: a render size the prior was made for, "
                              f"e.g. {key}.width=64 {key}.height=64")
        if need > free:
            log.warning("%s needs about %.1f GiB a step, more than the %.1f GiB free on %s: it may run out of "
                        "memory. Lower %s.width/height, system.batch_size or renderer.num_samples",
                        what, need / GiB, free / GiB, device, key)
