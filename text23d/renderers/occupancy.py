"""Empty-space skipping for the volume renderer, in pure torch (nerfacc's estimator needs CUDA).

Instant-NGP's occupancy grid: a coarse grid over the scene box keeps an exponential moving
average of the density seen in each cell. Every `update_every` steps each cell (all of them during
the warm-up, then a quarter at random plus a quarter of the occupied ones) is probed at a random
point; the EMA decays by `decay` and takes the new value if it is higher. A cell is occupied when
its EMA could make a sample visible (σ·δ above `threshold`, δ the renderer's sample spacing); the
occupied set is dilated by one cell so that a surface between probes is never cut off. Samples in
unoccupied cells skip the density network (their density is taken as 0).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn



class OccupancyGrid(nn.Module):
    def __init__(self, resolution: int = 32, radius: float = 1.0, threshold: float = 0.01, decay: float = 0.95,
                 update_every: int = 16, warmup_steps: int = 256):
        super().__init__()
        self.resolution, self.radius, self.threshold, self.decay = resolution, radius, threshold, decay
        self.update_every, self.warmup_steps = update_every, warmup_steps
        n = resolution**3
        self.register_buffer("density_ema", torch.full((n,), float("inf")))  # unknown = occupied
        self.register_buffer("occupied", torch.ones(n, dtype=torch.bool))

    def cells(self, points: Tensor) -> Tensor:
        """Flat cell index (N,) of world points (N, 3); outside the box is clamped to the border."""
        R = self.resolution
        ijk = ((points / self.radius).clamp(-1, 1 - 1e-6) + 1) * (R / 2)
        i = ijk.long().clamp(0, R - 1)
        return (i[:, 0] * R + i[:, 1]) * R + i[:, 2]

    def lookup(self, points: Tensor) -> Tensor:
        """Which points (N,) lie in occupied cells."""
        return self.occupied[self.cells(points)]

    @torch.no_grad()
    def update(self, density_fn, step: int, sample_spacing: float) -> bool:
        """Probe cells and refresh the grid every `update_every` steps; returns whether it did."""
        if step % self.update_every:
            return False
        R, n, device = self.resolution, self.resolution**3, self.occupied.device
        if step < self.warmup_steps or not torch.isfinite(self.density_ema).all():
            probe = torch.arange(n, device=device)
        else:  # a quarter of all cells at random, and a quarter of the occupied ones
            rand = torch.randint(0, n, (n // 4,), device=device)
            occ = self.occupied.nonzero().squeeze(1)
            probe = torch.cat([rand, occ[torch.randint(0, len(occ), (n // 4,), device=device)]]) if len(occ) else rand
        i = torch.stack([probe // (R * R), (probe // R) % R, probe % R], -1).float()
        points = ((i + torch.rand(i.shape, device=device)) / R * 2 - 1) * self.radius
        sigma = torch.cat([density_fn(p) for p in points.split(65536)]).float()
        ema = torch.where(torch.isfinite(self.density_ema), self.density_ema, torch.zeros_like(self.density_ema))
        ema[probe] = torch.maximum(ema[probe] * self.decay, sigma)
        self.density_ema.copy_(ema)
        occupied = (ema * sample_spacing > self.threshold).view(1, 1, R, R, R).float()
        dilated = torch.nn.functional.max_pool3d(occupied, 3, 1, 1) > 0
        self.occupied.copy_(dilated.reshape(-1))
        return True
