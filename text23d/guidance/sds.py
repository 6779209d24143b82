"""Score Distillation Sampling (DreamFusion, Poole et al. 2022, arXiv:2209.14988).

    ∇θ L_SDS = E_{t,ε}[ w(t) · (ε̂(x_t; y, t) − ε) · ∂x/∂θ ]            (DreamFusion eq. 3)

with x = g(θ) the render in the prior's model space, x_t = sqrt(ᾱ_t)·x + sqrt(1−ᾱ_t)·ε and ε̂ the
classifier-free-guided noise prediction. The U-Net Jacobian ∂ε̂/∂x_t is dropped (eq. 3 vs eq. 2),
so the U-Net runs without grad and only the renderer (and, for latent priors, the VAE encoder)
is backpropagated through. The timesteps, w(t), CFG and the surrogate loss are base.py's; SDS adds
only its baseline: the sampled noise ε.
"""
from __future__ import annotations

from torch import Tensor

from text23d.guidance.base import ScoreDistillation, Text


class SDSGuidance(ScoreDistillation):
    name = "sds"

    def __init__(
        self,
        guidance_scale: float = 100.0,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        weighting: str = "sds",
        grad_clip: float | None = None,
        anneal_max_step_percent: float | None = None,
        anneal_at_fraction: float = 0.5,
        view_guidance_scale: float | None = None,
    ):
        super().__init__(guidance_scale, min_step_percent, max_step_percent, weighting, grad_clip,
                         anneal_max_step_percent, anneal_at_fraction, view_guidance_scale)

    def baseline(self, x_t: Tensor, t: Tensor, noise: Tensor, text: Text, cams) -> Tensor:
        return noise  # ε̂ − ε: the views need no camera
