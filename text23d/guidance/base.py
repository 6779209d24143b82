"""What every score-distillation guidance shares: one call, one output, one gradient recipe.

    ∇θ L = E_{t,ε}[ w(t) · (ε̂(x_t; y, t) − b) · ∂x/∂θ ]

x = g(θ) is the render in the prior's model space, x_t = sqrt(ᾱ_t)·x + sqrt(1−ᾱ_t)·ε, ε̂ the
classifier-free-guided noise prediction of the frozen prior (cfg.py) and b the *baseline* a method
subtracts: the sampled noise ε for SDS (sds.py), the LoRA's estimate of the renders' own score for
VSD (vsd.py). This module holds the rest, once: the timestep range, its ramp or anneal, w(t), the
gradient's NaN guard and clip, and the surrogate loss whose gradient is that direction.

A system calls every guidance the same way,

    out = guidance(prior, rgb, text, cams, step=step, max_steps=steps)   # -> Guided

and reads the same output: `out.loss` (weighed by the stage's lambda_<out.name>), `out.grad_norm`,
`out.nonfinite` (the step is skipped), `out.t`, and `out.x0` (the detached model-space renders, for
a guidance that learns from them: `learns_from_renders`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import Tensor

from text23d.guidance.cfg import guided_noise



@dataclass
class Text:
    """The prompt embeddings of a batch of views, each (B, L, D)."""

    cond: Tensor  # the prompt with each view's direction words
    uncond: Tensor  # the negative (empty) prompt
    plain: Tensor | None = None  # the prompt without view words: needed when view_guidance_scale is set


@dataclass
class Guided:
    """What a guidance returns for one batch of views."""

    name: str  # the loss term's name: the stage weighs `loss` by lambda_<name>
    loss: Tensor  # the surrogate loss: its gradient in x is the guidance's direction / B
    grad_norm: Tensor  # ‖w(t)·(ε̂ − b)‖ after the NaN guard and clip
    nonfinite: Tensor  # the raw direction held a NaN/Inf: the system skips the step
    t: Tensor  # (B,) the timesteps drawn
    x0: Tensor  # (B, C, h, w) the model-space renders, detached


def max_step_ramp(max_step_percent) -> tuple[float, tuple | None]:
    """max_step_percent as (its value at the first step, the ramp or None). A ramp [start_step,
    start_value, end_value, end_step] goes linearly from one value to the other over stage-local steps
    (threestudio's [5000, 0.98, 0.5, 5001]: 0.98, then 0.5 after 5,000 steps)."""
    if isinstance(max_step_percent, (list, tuple, ListConfig)):
        ramp = tuple(max_step_percent)
        return float(ramp[1]), ramp
    return float(max_step_percent), None


def ramp_at(ramp: tuple, step: int) -> float:
    """The ramp's value at `step` (a deliberate copy of systems/losses.scheduled: guidance stays a leaf)."""
    start_step, start_value, end_value, end_step = ramp
    if end_step <= start_step:
        return float(end_value if step >= end_step else start_value)
    frac = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return float(start_value + frac * (end_value - start_value))


class ScoreDistillation:
    """The shared machinery; a method sets `name` and `needs`, and implements `baseline`."""

    name = "sd"
    needs = frozenset({"rgb", "text"})  # what the system must hand it (systems/parts.py)
    provides = frozenset()
    learns_from_renders = False  # True: the system calls `learn(out.x0, text, cams)` after each step

    def __init__(self, guidance_scale: float, min_step_percent: float, max_step_percent, weighting: str,
                 grad_clip: float | None, anneal_max_step_percent: float | None, anneal_at_fraction: float,
                 view_guidance_scale: float | None):
        # Every value was checked against its schema (text23d/schema/parts.py: GuidanceConfig) when the
        # config was composed; a constructor trusts its arguments.
        start, self.max_step_ramp = max_step_ramp(max_step_percent)
        self.guidance_scale = float(guidance_scale)
        self.view_guidance_scale = None if view_guidance_scale is None else float(view_guidance_scale)
        self.weighting = weighting
        self.grad_clip = grad_clip
        self.min_step_percent = float(min_step_percent)
        self.max_step_percent = start  # a ramp's first value
        self.anneal_max_step_percent = None if anneal_max_step_percent is None else float(anneal_max_step_percent)
        self.anneal_at_fraction = float(anneal_at_fraction)
        if self.view_guidance_scale is not None:  # the prompt without view words, from the system
            self.needs = self.needs | {"text_plain"}

    # --- timesteps ----------------------------------------------------------------------------

    def max_step_at(self, step: int | None, max_steps: int | None) -> float:
        """max t as a fraction of T at stage-local `step`: the ramp's value, or max_step_percent, then
        anneal_max_step_percent once step ≥ anneal_at_fraction · max_steps (late steps at lower noise
        refine what the early ones shaped)."""
        if self.max_step_ramp is not None:
            return self.max_step_percent if step is None else ramp_at(self.max_step_ramp, step)
        if self.anneal_max_step_percent is None or step is None or max_steps is None:
            return self.max_step_percent
        return self.anneal_max_step_percent if step >= self.anneal_at_fraction * max_steps else self.max_step_percent

    def sample_timesteps(self, prior, batch_size: int, max_step_percent: float | None = None) -> Tensor:
        """t ~ U{min·T, ..., max·T}, one per view, from torch's global CPU RNG (device independent)."""
        steps = prior.num_train_timesteps
        low = int(self.min_step_percent * steps)
        top = self.max_step_percent if max_step_percent is None else max_step_percent
        high = min(int(top * steps), steps - 1)
        return torch.randint(low, high + 1, (batch_size,)).to(prior.device)

    # --- the gradient ---------------------------------------------------------------------------

    def __call__(self, prior, rgb: Tensor, text: Text, cams=None, step=None, max_steps=None, t=None,
                 noise=None) -> Guided:
        """rgb (B, H, W, 3) in [0, 1], text the batch's embeddings, cams its Cameras (or None for a
        method that ignores the views), step/max_steps stage-local -> Guided."""
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"{type(self).__name__} expects rgb in renderer layout (B, H, W, 3), got {tuple(rgb.shape)}")
        x = prior.images_to_model_space(rgb.permute(0, 3, 1, 2))  # (B, C, h, w)
        return self.from_model_space(prior, x, text, cams, step=step, max_steps=max_steps, t=t, noise=noise)

    def from_model_space(self, prior, x: Tensor, text: Text, cams=None, step=None, max_steps=None, t=None,
                         noise=None) -> Guided:
        """The same for an x already in model space (B, C, h, w); gradients flow to x."""
        batch = x.shape[0]
        x = x.float()  # the surrogate loss and its gradient in float32 even for a half-precision prior
        if t is None:
            t = self.sample_timesteps(prior, batch, self.max_step_at(step, max_steps))
        t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(batch)
        if noise is None:
            noise = torch.randn(x.shape).to(x.device)  # CPU RNG: same draw on every device
        alpha = prior.alphas_cumprod[t].view(-1, 1, 1, 1)  # ᾱ_t (B, 1, 1, 1)

        with torch.no_grad():  # the U-Net Jacobians are skipped (DreamFusion eq. 3)
            x_t = alpha.sqrt() * x + (1 - alpha).sqrt() * noise  # forward diffusion q(x_t | x)
            eps_hat = guided_noise(prior, x_t, t, text.cond, text.uncond, self.guidance_scale,
                                   self.view_guidance_scale, text.plain)  # CFG (cfg.py)
            # w(t) = 1 − ᾱ_t (DreamFusion appendix A.4): small at low noise, where ε̂ − b is mostly
            # the model's error on a clean-looking image rather than a useful direction.
            weight = (1 - alpha) if self.weighting == "sds" else torch.ones_like(alpha)
            raw = weight * (eps_hat - self.baseline(x_t, t, noise, text, cams))  # (B, C, h, w)
            # A NaN/Inf here (fp16 overflow, a broken prior) makes the system skip the step; the
            # gradient is still made finite, so the logged loss stays readable.
            nonfinite = ~torch.isfinite(raw).all()
            grad = torch.nan_to_num(raw)
            if self.grad_clip is not None:
                grad = grad.clamp(-self.grad_clip, self.grad_clip)

        # Surrogate: d/dx 0.5·||x − sg(x − grad)||² = grad. Summed, then divided by B so a larger
        # batch of views averages the per-view gradients instead of adding them (each view's x
        # receives grad / B; exactly grad when B = 1).
        target = (x - grad).detach()
        loss = 0.5 * F.mse_loss(x, target, reduction="sum") / batch
        return Guided(self.name, loss, grad.norm().detach(), nonfinite, t, x.detach())

    def baseline(self, x_t: Tensor, t: Tensor, noise: Tensor, text: Text, cams) -> Tensor:
        """b (B, C, h, w): what is subtracted from the prior's guided ε̂ (called without grad)."""
        raise NotImplementedError
