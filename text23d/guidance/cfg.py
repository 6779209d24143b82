"""Classifier-free guidance of the frozen prior, shared by SDS and VSD's pretrained term.

    ε̂ = ε_u + s·(ε_c − ε_u)                                  (Ho & Salimans 2022)

With a view guidance scale s_v the prompt and its view words ("…, front right view") get scales of
their own (compositional guidance, Liu et al. 2022, with ε_y the prompt without view words):

    ε̂ = ε_u + s·(ε_y − ε_u) + s_v·(ε_c − ε_y)                (s_v = s: plain CFG)

A small prior that barely heeds its view words makes rotationally symmetric objects (a cube turns
into a barrel, its silhouette no longer changing as it turns); a larger s_v makes the view count
without raising the object's CFG, which brings floaters and saturated colours.
"""
from __future__ import annotations

import torch

from text23d.errors import ConfigError


def guided_noise(prior, x_t, t, text_cond, text_uncond, scale: float, view_scale: float | None = None,
                 text_plain=None) -> torch.Tensor:
    """ε̂ (B, C, h, w) for x_t (B, C, h, w), t (B,), text (B, L, D), in one batched U-Net call."""
    if view_scale is None:
        eps_cond, eps_uncond = prior.predict_noise(
            torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([text_cond, text_uncond])).chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)
    if text_plain is None:
        raise ConfigError("guidance.view_guidance_scale needs the prompt without view words, which this system "
                          "does not pass. Fix: guidance.view_guidance_scale=null")
    eps_cond, eps_uncond, eps_plain = prior.predict_noise(
        torch.cat([x_t, x_t, x_t]), torch.cat([t, t, t]), torch.cat([text_cond, text_uncond, text_plain])).chunk(3)
    return eps_uncond + scale * (eps_plain - eps_uncond) + view_scale * (eps_cond - eps_plain)
