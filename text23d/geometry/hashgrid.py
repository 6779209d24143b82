"""Instant-NGP's multiresolution hash grid (Müller et al. 2022) with tiny-cuda-nn's conventions,
plus density and albedo MLPs: Magic3D's coarse geometry.

Per level l (tcnn's HashGrid): scale = 2^(l·log2 b)·N_min − 1, resolution = ceil(scale) + 1, a
point u ∈ [0, 1]³ sits at u·scale + 0.5; its 8 surrounding grid points are looked up and blended
trilinearly. A level whose grid fits its table (resolution³ ≤ T) is indexed densely
(x + y·res + z·res²), the others by the spatial hash x·1 ⊕ y·2654435761 ⊕ z·805459861; both modulo
the level's table size, min(T, resolution³) rounded up to a multiple of 8. The tables of all levels
are one flat parameter, level after level, entry after entry, F features each, as tcnn stores
them, so a checkpoint moves between `implementation: tcnn` and `torch` unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from text23d import accel
from text23d.geometry.base import Geometry

PRIMES = (1, 2654435761, 805459861)


def level_layout(n_levels: int, log2_table: int, base_resolution: int, per_level_scale: float):
    """Per level: (scale, resolution, table size, offset into the flat table, hashed?)."""
    levels, offset, T = [], 0, 2**log2_table
    for l in range(n_levels):
        scale = 2.0 ** (l * math.log2(per_level_scale)) * base_resolution - 1.0
        res = int(math.ceil(scale)) + 1
        size = min(T, res**3)
        size = (size + 7) // 8 * 8
        levels.append((scale, res, size, offset, res**3 > size))
        offset += size
    return levels


class HashEncoding(nn.Module):
    """The torch path: u (N, 3) in [0, 1] -> features (N, n_levels · n_features)."""

    def __init__(self, n_levels=16, n_features=2, log2_table=19, base_resolution=16, per_level_scale=1.447269):
        super().__init__()
        self.levels = level_layout(n_levels, log2_table, base_resolution, per_level_scale)
        self.n_features = n_features
        total = self.levels[-1][3] + self.levels[-1][2]
        self.params = nn.Parameter(torch.empty(total * n_features).uniform_(-1e-4, 1e-4))  # tcnn's init
        corners = torch.tensor([[(c >> k) & 1 for k in range(3)] for c in range(8)])
        self.register_buffer("corners", corners, persistent=False)  # (8, 3)
        self.register_buffer("primes", torch.tensor(PRIMES), persistent=False)

    def index(self, grid: Tensor, level: int) -> Tensor:
        """Table rows (…,) of integer grid points (…, 3) on `level`, as tcnn computes them."""
        _, res, size, offset, hashed = self.levels[level]
        if hashed:  # int64 products keep the low bits of tcnn's uint32 arithmetic exact
            h = (grid[..., 0] * self.primes[0]) ^ (grid[..., 1] * self.primes[1]) ^ (grid[..., 2] * self.primes[2])
            return offset + (h & (size - 1) if size & (size - 1) == 0 else h % size)
        return offset + (grid[..., 0] + grid[..., 1] * res + grid[..., 2] * res * res) % size

    def forward(self, u: Tensor) -> Tensor:
        table = self.params.view(-1, self.n_features)
        out = []
        for level, (scale, *_rest) in enumerate(self.levels):
            pos = u * scale + 0.5  # (N, 3)
            base = pos.detach().floor()
            frac = pos - base  # differentiable in u
            grid = base.long()[:, None, :] + self.corners  # (N, 8, 3)
            rows = self.index(grid, level)  # (N, 8)
            w = torch.where(self.corners.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)  # (N, 8)
            feats = table.index_select(0, rows.reshape(-1)).view(*rows.shape, self.n_features)
            out.append((w[..., None] * feats).sum(1))
        return torch.cat(out, -1)


class TcnnHashEncoding(nn.Module):
    """tiny-cuda-nn's HashGrid, its flat parameter exposed as `params` like the torch path's."""

    def __init__(self, tcnn, n_levels, n_features, log2_table, base_resolution, per_level_scale):
        super().__init__()
        self.encoding = tcnn.Encoding(3, {"otype": "HashGrid", "n_levels": n_levels,
                                          "n_features_per_level": n_features, "log2_hashmap_size": log2_table,
                                          "base_resolution": base_resolution, "per_level_scale": per_level_scale})
        # tcnn's module keeps the table as its own `params`, so it would be saved as `encoding.params`
        # here. The hooks rename that one key both ways: the state dict is then exactly the torch
        # path's (`params`, the same shape), and either loads strictly into the other.
        self.register_state_dict_post_hook(_tcnn_to_torch_key)
        self.register_load_state_dict_pre_hook(_torch_to_tcnn_key)

    @property
    def params(self) -> Tensor:
        return self.encoding.params

    def forward(self, u: Tensor) -> Tensor:
        return self.encoding(u).float()


def _tcnn_to_torch_key(module, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + "params"] = state_dict.pop(prefix + "encoding.params")


def _torch_to_tcnn_key(module, state_dict, prefix, *args) -> None:
    if prefix + "params" in state_dict:  # absent: load_state_dict reports it as missing (encoding.params)
        state_dict[prefix + "encoding.params"] = state_dict.pop(prefix + "params")


class HashGrid(Geometry):
    """Density and albedo from a hash encoding and two small MLPs (64 wide, 1 hidden layer, no bias,
    threestudio's implicit volume), on top of the density blob of geometry/base.py."""

    def __init__(self, n_levels: int = 16, n_features: int = 2, log2_table: int = 19, base_resolution: int = 16,
                 per_level_scale: float = 1.447269, hidden: int = 64, implementation: str = "auto",
                 normals: str = "finite_difference", **kwargs):
        super().__init__(**kwargs)
        self.implementation = accel.choose("geometry", implementation, "tinycudann")
        args = (n_levels, n_features, log2_table, base_resolution, per_level_scale)
        self.encoding = (TcnnHashEncoding(accel.load("tinycudann"), *args) if self.implementation == "tinycudann"
                         else HashEncoding(*args))
        width = n_levels * n_features
        self.density_net = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, 1, bias=False))
        self.feature_net = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, 3, bias=False))
        self.normal_type = normals

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x in [-1, 1]
        h = self.encoding((x.clamp(-1, 1) + 1) / 2)
        return self.density_net(h)[:, 0], self.feature_net(h)

    def density(self, points: Tensor) -> Tensor:
        h = self.encoding(((points / self.radius).clamp(-1, 1) + 1) / 2)
        return nn.functional.softplus(self.density_net(h)[:, 0] + self.blob(points))

    def albedo(self, points: Tensor) -> Tensor:
        h = self.encoding(((points / self.radius).clamp(-1, 1) + 1) / 2)
        return torch.sigmoid(self.feature_net(h))

    def normals(self, points: Tensor) -> Tensor:
        if self.normal_type == "finite_difference":
            return super().normals(points)
        training = torch.is_grad_enabled()  # then the normals are differentiable (orientation loss)
        with torch.enable_grad():  # analytic: −∇σ / |∇σ|
            p = points if points.requires_grad else points.detach().requires_grad_(True)
            sigma = self.density(p)
            grad, = torch.autograd.grad(sigma.sum(), p, create_graph=training)
        return -nn.functional.normalize(grad, dim=-1, eps=1e-12)
