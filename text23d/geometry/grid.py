"""Dense voxel grid with trilinear interpolation: the fast geometry on CPU.

Written as 8-corner gathers instead of `grid_sample`: density (1 channel) and albedo (3 channels)
are separate, the trilinear weights are an outer product of per-axis (1 − f, f) pairs, and normals
come from the analytic gradient of the same weights, so a normal costs one density lookup instead
of four (finite differences). Measured on one CPU thread, 32²×64 samples with normals, forward +
backward: 0.13 s, vs 0.27 s for a 4-channel `grid_sample` with finite-difference normals.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from text23d.geometry.base import Geometry

def _outer(wx: Tensor, wy: Tensor, wz: Tensor) -> Tensor:
    """(2, N) per-axis factors → (8, N) corner weights, corner order (dx, dy, dz) with dz fastest.
    Points last: every product runs over contiguous rows of N (a trailing axis of 2 or 8 would not
    vectorise, 3× slower on the CPU)."""
    return (wx[:, None, None] * wy[None, :, None] * wz[None, None, :]).reshape(8, -1)


def _gather(grid: Tensor, idx: Tensor) -> Tensor:
    """grid[idx] for idx (8, N). index_select's backward is 2-7× faster on CPU than indexing's."""
    return grid.index_select(0, idx.reshape(-1)).view(*idx.shape, *grid.shape[1:])


class DenseGrid(Geometry):
    def __init__(self, resolution: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.resolution = resolution
        # Zeros: the blob supplies the initial shape, albedo starts grey (sigmoid(0) = 0.5).
        self.density_grid = nn.Parameter(torch.zeros(resolution**3))
        self.albedo_grid = nn.Parameter(torch.zeros(resolution**3, 3))
        R = resolution
        offsets = [(dz * R + dy) * R + dx for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)]
        self.register_buffer("_offsets", torch.tensor(offsets), persistent=False)

    def _corners(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Flat indices (8, N) of the 8 surrounding grid points and fractions (3, N) in the cell,
        for world points (N, 3) (outside the grid is clamped to the border)."""
        R = self.resolution
        p = ((points / self.radius).clamp(-1, 1) + 1) * (0.5 * (R - 1))
        p0 = p.detach().floor().clamp(0, R - 2)
        i = p0.long()
        base = (i[:, 2] * R + i[:, 1]) * R + i[:, 0]
        return base + self._offsets[:, None], (p - p0).t()

    @staticmethod
    def _pairs(frac: Tensor) -> list[Tensor]:
        return [torch.stack([1 - f, f]) for f in frac]  # 3 × (2, N)

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        idx, frac = self._corners(x * self.radius)
        w = _outer(*self._pairs(frac))
        density = (w * _gather(self.density_grid, idx)).sum(0)
        albedo = (w[..., None] * _gather(self.albedo_grid, idx)).sum(0)
        return density, albedo

    # One field at a time: the renderer needs density at every sample but albedo only at the few
    # that are visible, and each lookup gathers only its own grid.
    def density(self, points: Tensor) -> Tensor:
        idx, frac = self._corners(points)
        raw = (_outer(*self._pairs(frac)) * _gather(self.density_grid, idx)).sum(0)
        return nn.functional.softplus(raw + self.blob(points))

    def albedo(self, points: Tensor) -> Tensor:
        idx, frac = self._corners(points)
        return torch.sigmoid((_outer(*self._pairs(frac))[..., None] * _gather(self.albedo_grid, idx)).sum(0))

    def normals(self, points: Tensor) -> Tensor:
        """Outward normals from the analytic gradient of the trilinear density plus the blob."""
        idx, frac = self._corners(points)
        wx, wy, wz = self._pairs(frac)
        v = _gather(self.density_grid, idx).view(2, 2, 2, -1)  # corner values, axes (x, y, z)
        # ∂/∂f_a of the trilinear sum: the difference along axis a, weighted by the other two axes.
        gx = ((v[1] - v[0]) * wy[:, None] * wz[None, :]).sum((0, 1))
        gy = ((v[:, 1] - v[:, 0]) * wx[:, None] * wz[None, :]).sum((0, 1))
        gz = ((v[:, :, 1] - v[:, :, 0]) * wx[:, None] * wy[None, :]).sum((0, 1))
        grad = torch.stack([gx, gy, gz], -1) * (0.5 * (self.resolution - 1) / self.radius)
        grad = grad + self.blob_gradient(points)
        return -nn.functional.normalize(grad, dim=-1, eps=1e-12)
