"""Dense voxel grid with trilinear interpolation: the fast geometry on CPU.

Written as 8-corner gathers instead of `grid_sample`: density (1 channel) and albedo (3 channels)
are separate, and normals come from the analytic gradient of the same trilinear weights, so a
normal costs one density lookup instead of four (finite differences). Measured on one CPU thread,
32²×64 samples with normals, forward + backward: 0.13 s, vs 0.27 s for a 4-channel `grid_sample`
with finite-difference normals.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from text23d.errors import ConfigError
from text23d.geometry.base import Geometry

_CORNERS = torch.tensor([[dx, dy, dz] for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)])  # (8, 3)


class DenseGrid(Geometry):
    def __init__(self, resolution: int = 64, **kwargs):
        if resolution < 2:
            raise ConfigError(f"geometry.resolution={resolution}: a grid needs at least 2 cells per axis")
        super().__init__(**kwargs)
        self.resolution = resolution
        # Zeros: the blob supplies the initial shape, albedo starts grey (sigmoid(0) = 0.5).
        self.density_grid = nn.Parameter(torch.zeros(resolution**3))
        self.albedo_grid = nn.Parameter(torch.zeros(resolution**3, 3))

    def _corners(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Flat indices (N, 8) of the 8 surrounding grid points and fractions (N, 3) in the cell,
        for x (N, 3) in [-1, 1] (outside is clamped to the border)."""
        R = self.resolution
        p = (x.clamp(-1, 1) + 1) * (0.5 * (R - 1))
        p0 = p.detach().floor().clamp(0, R - 2)
        i = p0.long()[:, None, :] + _CORNERS.to(x.device)  # (N, 8, 3)
        return (i[..., 2] * R + i[..., 1]) * R + i[..., 0], p - p0

    @staticmethod
    def _weights(frac: Tensor) -> Tensor:
        c = _CORNERS.to(frac)  # (8, 3)
        return torch.where(c.bool(), frac[:, None], 1 - frac[:, None]).prod(-1)  # (N, 8)

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        idx, frac = self._corners(x)
        w = self._weights(frac)
        density = (w * self.density_grid[idx]).sum(1)
        albedo = (w[..., None] * self.albedo_grid[idx]).sum(1)
        return density, albedo

    def normals(self, points: Tensor) -> Tensor:
        """Outward normals from the analytic gradient of the trilinear density plus the blob."""
        x = points / self.radius
        idx, f = self._corners(x)
        c = _CORNERS.to(f)
        factors = torch.where(c.bool(), f[:, None], 1 - f[:, None])  # (N, 8, 3)
        sign = c * 2 - 1  # d/df of f is +1, of (1 - f) is -1
        grads = []
        for axis in range(3):
            others = [a for a in range(3) if a != axis]
            grads.append((sign[:, axis] * factors[..., others[0]] * factors[..., others[1]]))
        dw = torch.stack(grads, -1)  # (N, 8, 3): ∂w/∂f
        values = self.density_grid[idx]  # (N, 8)
        grad = (dw * values[..., None]).sum(1) * (0.5 * (self.resolution - 1) / self.radius)
        norm = points.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        grad = grad - self.blob_density / self.blob_radius * points / norm
        return -nn.functional.normalize(grad, dim=-1, eps=1e-12)
