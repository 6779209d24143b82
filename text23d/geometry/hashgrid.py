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

import torch
from torch import Tensor, nn

from text23d import accel
from text23d.geometry.base import Geometry
from text23d.geometry.hashenc import HashFunction, HashLayout, encode, level_layout

class HashEncoding(nn.Module):
    """The torch path: u (N, 3) in [0, 1] -> features (N, n_levels · n_features), every level in one
    batched computation (geometry/hashenc.py)."""

    def __init__(self, n_levels=16, n_features=2, log2_table=19, base_resolution=16, per_level_scale=1.447269):
        super().__init__()
        self.levels = level_layout(n_levels, log2_table, base_resolution, per_level_scale)
        self.layout = HashLayout(self.levels)
        self.n_features = n_features
        total = self.levels[-1][3] + self.levels[-1][2]
        self.params = nn.Parameter(torch.empty(total * n_features).uniform_(-1e-4, 1e-4))  # tcnn's init

    def forward(self, u: Tensor, jacobian: bool = False):
        """Features, and with `jacobian` also their derivatives in u, (3, N, n_levels · n_features)."""
        if self.layout.lut.device != u.device:
            self.layout.to(u.device)
        u = u.clamp(0, 1)
        if u.requires_grad and torch.is_grad_enabled():  # a gradient in the points (twice, for normals')
            return encode(u, self.params, self.layout, self.n_features)
        return HashFunction.apply(u, self.params, self.layout, self.n_features, jacobian)


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

    def _u(self, points: Tensor) -> Tensor:
        return ((points / self.radius).clamp(-1, 1) + 1) / 2

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x in [-1, 1]
        h = self.encoding((x.clamp(-1, 1) + 1) / 2)
        return self.density_net(h)[:, 0], self.feature_net(h)

    def density(self, points: Tensor) -> Tensor:
        h = self.encoding(self._u(points))
        return nn.functional.softplus(self.density_net(h)[:, 0] + self.blob(points))

    def albedo(self, points: Tensor) -> Tensor:
        return torch.sigmoid(self.feature_net(self.encoding(self._u(points))))

    def normals(self, points: Tensor) -> Tensor:
        if self.normal_type == "finite_difference":
            return super().normals(points)
        if points.requires_grad or self.implementation == "tinycudann":
            return self._autograd_normals(points)
        return self._jacobian_normals(points)[1]

    def albedo_and_normals(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Both from one encoding of the points where the torch path can give its Jacobian."""
        if self.normal_type == "finite_difference" or points.requires_grad or self.implementation == "tinycudann":
            return self.albedo(points), self.normals(points)
        h, normals = self._jacobian_normals(points)
        return torch.sigmoid(self.feature_net(h)), normals

    def _jacobian_normals(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """The encoding h of the points and −∇σ/|∇σ| from its Jacobian: ∂σ_raw/∂h through the
        density MLP only (softplus' positive factor does not change the direction)."""
        h, jacobian = self.encoding(self._u(points), jacobian=True)
        training = torch.is_grad_enabled()  # then the normals are differentiable (orientation loss)
        with torch.enable_grad():
            leaf = h if h.requires_grad else h.detach().requires_grad_(True)
            grad_h, = torch.autograd.grad(self.density_net(leaf)[:, 0].sum(), leaf, create_graph=training)
        inside = ((points / self.radius).abs() <= 1).all(-1, keepdim=True)  # the clamp's gradient
        grad = (grad_h * jacobian).sum(-1).t() * (inside / (2 * self.radius))  # (N, 3)
        return h, -nn.functional.normalize(grad + self.blob_gradient(points), dim=-1, eps=1e-12)

    def _autograd_normals(self, points: Tensor) -> Tensor:
        training = torch.is_grad_enabled()
        with torch.enable_grad():  # analytic: −∇σ / |∇σ|
            p = points if points.requires_grad else points.detach().requires_grad_(True)
            sigma = self.density(p)
            grad, = torch.autograd.grad(sigma.sum(), p, create_graph=training)
        return -nn.functional.normalize(grad, dim=-1, eps=1e-12)
