"""Choosing the isosurface level: the mesh should look like the renders.

A fixed density threshold is why exported meshes in other tools are much worse than their renders:
the level that matches the image depends on the run. Here every candidate level is scored by how
well the silhouettes of {density > level} match the rendered opacity (> 0.5) from several views,
and the best one wins. Densities are evaluated once; each candidate costs only a comparison.
"""
from __future__ import annotations

import torch

from text23d.cameras.sampler import get_rays
from text23d.renderers.volume import ray_sphere


def auto_threshold(geometry, cams, radius: float, resolution: int = 48, num_samples: int = 64,
                   n_candidates: int = 32) -> tuple[float, float]:
    """Returns (threshold, silhouette IoU at that threshold) over the views in `cams`."""
    with torch.no_grad():
        origins, dirs = get_rays(cams, resolution, resolution)
        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        near, far, hit = ray_sphere(o, d, radius)
        t = near[:, None] + (torch.arange(num_samples, device=o.device) + 0.5) / num_samples * (far - near)[:, None]
        pts = (o[:, None] + d[:, None] * t[..., None]).reshape(-1, 3)
        sigma = torch.cat([geometry.density(p) for p in pts.split(1 << 16)]).view(-1, num_samples)
        sigma = sigma * hit[:, None]
        delta = ((far - near) / num_samples)[:, None]
        rendered = (1 - torch.exp(-(sigma * delta).sum(1))) > 0.5  # the image's silhouette
        top = float(sigma.max())
        if top <= 0:
            return 1.0, 0.0
        candidates = torch.logspace(-2, 0, n_candidates, device=sigma.device) * top
        best = (candidates[0].item(), -1.0)
        for level in candidates:
            solid = (sigma > level).any(1)  # a ray that meets the solid is opaque
            iou = (solid & rendered).sum() / (solid | rendered).sum().clamp_min(1)
            if iou.item() > best[1]:
                best = (level.item(), iou.item())
        return best
