"""Shared behaviour of implicit geometries: density bias at init and finite-difference normals."""
from __future__ import annotations

import torch
from torch import Tensor, nn


# Tetrahedron offsets: 4 density evaluations estimate the gradient (vs 6 for central differences).
_TETRA = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]])


class Geometry(nn.Module):
    """A density + albedo field inside the sphere/box of `radius` (world units).

    Subclasses implement `raw(points_normalised) -> (raw_density (N,), raw_albedo (N, 3))`;
    this class adds the density blob, activations and normals.
    """

    provides = frozenset({"density", "albedo", "normals"})  # see systems/parts.py
    needs_previous = frozenset()  # init: previous copies a geometry of its own kind
    needs_colour_field = False  # it has its own colour (a mesh geometry may take an earlier stage's)

    def colour_field(self) -> nn.Module:
        """The module whose albedo colours this geometry: itself."""
        return self

    def __init__(self, radius: float = 1.0, blob_density: float = 10.0, blob_radius: float = 0.5,
                 normal_eps: float = 0.01):
        super().__init__()
        self.radius, self.blob_density, self.blob_radius = radius, blob_density, blob_radius
        self.normal_eps = normal_eps

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x (N, 3) in [-1, 1]
        raise NotImplementedError

    def blob(self, points: Tensor) -> Tensor:
        # Magic3D's density bias: a soft ball at the centre, so optimisation starts from an object
        # rather than empty space (which gives SDS nothing to sculpt).
        return self.blob_density * (1.0 - points.norm(dim=-1) / self.blob_radius)

    def blob_gradient(self, points: Tensor) -> Tensor:
        """∇ of `blob` (N, 3), for analytic normals: −density/radius along the unit vector of each point."""
        norm = points.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        return -self.blob_density / self.blob_radius * points / norm

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points (N, 3) world → density (N,) ≥ 0 and albedo (N, 3) in [0, 1]."""
        raw_density, raw_albedo = self.raw(points / self.radius)
        density = nn.functional.softplus(raw_density + self.blob(points))
        return density, torch.sigmoid(raw_albedo)

    def density(self, points: Tensor) -> Tensor:
        return self(points)[0]

    def albedo(self, points: Tensor) -> Tensor:
        return self(points)[1]

    def albedo_and_normals(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Both at once: a geometry that can share one lookup between the two overrides this."""
        return self.albedo(points), self.normals(points)

    def normals(self, points: Tensor) -> Tensor:
        """Outward unit normals (N, 3): minus the normalised density gradient (finite differences)."""
        offsets = _TETRA.to(points) * self.normal_eps  # (4, 3)
        sigma = self.density((points[:, None, :] + offsets).reshape(-1, 3)).view(-1, 4, 1)
        grad = (sigma * offsets).sum(dim=1)  # ∝ ∇σ
        return -nn.functional.normalize(grad, dim=-1, eps=1e-12)
