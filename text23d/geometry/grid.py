"""Dense voxel grid sampled with trilinear `grid_sample`: the fast geometry on CPU."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from text23d.errors import ConfigError
from text23d.geometry.base import Geometry


class DenseGrid(Geometry):
    def __init__(self, resolution: int = 64, **kwargs):
        if resolution < 2:
            raise ConfigError(f"geometry.resolution={resolution}: a grid needs at least 2 cells per axis")
        kwargs.setdefault("normal_eps", 2.0 * kwargs.get("radius", 1.0) / resolution)
        super().__init__(**kwargs)
        self.resolution = resolution
        # Density and albedo start at zero: the blob supplies the initial shape, albedo starts grey.
        self.grid = nn.Parameter(torch.zeros(1, 4, resolution, resolution, resolution))

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # grid_sample reads coordinates as (x, y, z) → (W, H, D) of the grid.
        feats = nn.functional.grid_sample(self.grid, x.view(1, -1, 1, 1, 3), mode="bilinear",
                                          padding_mode="border", align_corners=True)
        feats = feats.view(4, -1).t()  # (N, 4)
        return feats[:, 0], feats[:, 1:]
