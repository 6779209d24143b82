"""NeRF MLP with positional encoding (DreamFusion's geometry, without the mip-NeRF details)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from text23d.geometry.base import Geometry
from text23d.ops import positional_encoding


class NeRFMLP(Geometry):
    def __init__(self, n_freqs: int = 6, hidden: int = 64, layers: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.n_freqs = n_freqs
        dims = [3 + 6 * n_freqs] + [hidden] * layers
        blocks = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(d_in, d_out), nn.ReLU(inplace=True)]
        self.mlp = nn.Sequential(*blocks, nn.Linear(dims[-1], 4))

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.mlp(positional_encoding(x, self.n_freqs))
        return out[:, 0], out[:, 1:]
