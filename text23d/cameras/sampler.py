"""Camera sampling: random training views and the evaluation orbit.

World is z-up; a camera at (elevation e, azimuth a, distance d) sits at
(d·cos e·cos a, d·cos e·sin a, d·sin e) and looks at the origin. Azimuth 0 is the "front".
c2w matrices follow the OpenGL convention (camera looks down its -z, +y is up).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from text23d.errors import ConfigError


@dataclass
class Cameras:
    c2w: Tensor  # (B, 4, 4)
    fovy: Tensor  # (B,) radians
    elevation: Tensor  # (B,) degrees
    azimuth: Tensor  # (B,) degrees in [-180, 180)
    distance: Tensor  # (B,)
    light_position: Tensor  # (B, 3) world-space point light

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def to(self, device) -> "Cameras":
        return Cameras(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def __getitem__(self, index) -> "Cameras":
        """The views at `index` (a slice keeps them a batch)."""
        return Cameras(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    @staticmethod
    def cat(batches: list["Cameras"]) -> "Cameras":
        """One batch of every view of `batches`, in order."""
        return Cameras(*(torch.cat([getattr(b, f) for b in batches]) for f in Cameras.__dataclass_fields__))


def look_at(position: Tensor, target: Tensor | None = None) -> Tensor:
    """c2w (B, 4, 4) for cameras at `position` (B, 3) looking at `target` (origin), z-up."""
    target = torch.zeros_like(position) if target is None else target
    forward = torch.nn.functional.normalize(target - position, dim=-1)
    up = torch.tensor([0.0, 0.0, 1.0], device=position.device).expand_as(forward)
    right = torch.nn.functional.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.eye(4, device=position.device).repeat(position.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2] = right, true_up, -forward
    c2w[:, :3, 3] = position
    return c2w


def spherical_to_position(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    e, a = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    return torch.stack(
        [distance * torch.cos(e) * torch.cos(a), distance * torch.cos(e) * torch.sin(a),
         distance * torch.sin(e)], dim=-1)


def _range(value) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)  # checked against CameraConfig's rule when the config was composed
    return lo, hi


class RandomCameraSampler:
    """Random training cameras (DreamFusion/threestudio ranges) and a fixed evaluation orbit."""

    def __init__(self, elevation_range=(-10.0, 45.0), azimuth_range=(-180.0, 180.0),
                 distance_range=(1.5, 2.0), fovy_range=(40.0, 70.0), batch_uniform_azimuth: bool = True,
                 light_distance_range=(0.8, 1.5), light_perturb: float = 1.0,
                 eval_elevation: float = 15.0, eval_distance: float = 1.75, eval_fovy: float = 55.0):
        self.elevation_range = _range(elevation_range)
        self.azimuth_range = _range(azimuth_range)
        self.distance_range = _range(distance_range)
        self.fovy_range = _range(fovy_range)
        self.light_distance_range = _range(light_distance_range)
        self.batch_uniform_azimuth = batch_uniform_azimuth
        self.light_perturb = light_perturb
        self.eval_elevation, self.eval_distance, self.eval_fovy = eval_elevation, eval_distance, eval_fovy

    @staticmethod
    def _uniform(n: int, rng: tuple[float, float]) -> Tensor:
        return rng[0] + (rng[1] - rng[0]) * torch.rand(n)

    def sample(self, batch_size: int) -> Cameras:
        """Random cameras; all randomness comes from torch's global RNG (saved in checkpoints)."""
        elevation = self._uniform(batch_size, self.elevation_range)
        lo, hi = self.azimuth_range
        if self.batch_uniform_azimuth:
            # One random offset, views spread evenly over the range: every batch sees all sides.
            azimuth = lo + (torch.rand(1) + torch.arange(batch_size)) / batch_size * (hi - lo)
        else:
            azimuth = self._uniform(batch_size, self.azimuth_range)
        azimuth = (azimuth + 180.0) % 360.0 - 180.0
        distance = self._uniform(batch_size, self.distance_range)
        fovy = torch.deg2rad(self._uniform(batch_size, self.fovy_range))
        position = spherical_to_position(elevation, azimuth, distance)
        # Light near the camera (DreamFusion): camera direction + noise, at a random distance.
        light_dir = torch.nn.functional.normalize(
            position + self.light_perturb * torch.randn(batch_size, 3) * distance[:, None] / 2, dim=-1)
        light = light_dir * self._uniform(batch_size, self.light_distance_range)[:, None]
        return Cameras(look_at(position), fovy, elevation, azimuth, distance, light)

    def orbit(self, n_views: int, elevation: float | None = None) -> Cameras:
        """`n_views` cameras evenly around the object (turntable), starting at the front."""
        if n_views < 1:
            raise ConfigError(f"n_views={n_views}: an orbit needs at least 1 view")
        elev = torch.full((n_views,), float(self.eval_elevation if elevation is None else elevation))
        azimuth = torch.arange(n_views) / n_views * 360.0
        azimuth = (azimuth + 180.0) % 360.0 - 180.0
        distance = torch.full((n_views,), float(self.eval_distance))
        fovy = torch.full((n_views,), math.radians(self.eval_fovy))
        position = spherical_to_position(elev, azimuth, distance)
        # Light from the camera side, a little above: a fixed, reproducible shading for videos.
        light = spherical_to_position(elev + 30.0, azimuth, torch.full_like(distance, 1.2))
        return Cameras(look_at(position), fovy, elev, azimuth, distance, light)


def get_rays(cams: Cameras, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Ray origins and unit directions in world space, each (B, H, W, 3), through pixel centres."""
    device = cams.c2w.device
    j, i = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32) + 0.5,
                          torch.arange(width, device=device, dtype=torch.float32) + 0.5, indexing="ij")
    focal = 0.5 * height / torch.tan(0.5 * cams.fovy)  # (B,)
    x = (i[None] - 0.5 * width) / focal[:, None, None]
    y = -(j[None] - 0.5 * height) / focal[:, None, None]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (B, H, W, 3)
    dirs = torch.einsum("bij,bhwj->bhwi", cams.c2w[:, :3, :3], dirs_cam)
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    origins = cams.c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs
