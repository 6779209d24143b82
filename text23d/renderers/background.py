"""Backgrounds: a solid colour, or DreamFusion's small MLP of the view direction."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from text23d.ops import positional_encoding


class Background(nn.Module):
    """`mode="solid"`: a fixed colour (the built-in prior's white). `mode="learned"`: an MLP of the
    ray direction, so the prior's idea of a backdrop does not have to be painted into the object."""

    def __init__(self, mode: str = "learned", color=(1.0, 1.0, 1.0), n_freqs: int = 2, hidden: int = 16):
        super().__init__()
        self.mode, self.n_freqs = mode, n_freqs
        self.register_buffer("color", torch.tensor(list(color), dtype=torch.float32), persistent=False)
        if mode == "learned":
            self.mlp = nn.Sequential(nn.Linear(3 + 6 * n_freqs, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, dirs: Tensor) -> Tensor:  # (N, 3) → (N, 3)
        if self.mode == "solid":
            return self.color.expand(dirs.shape[0], 3)
        return torch.sigmoid(self.mlp(positional_encoding(dirs, self.n_freqs)))
