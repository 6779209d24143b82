"""Volume rendering in pure torch: bounded sphere, stratified samples, alpha compositing."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from text23d.cameras.sampler import Cameras, get_rays
from text23d.errors import ConfigError
from text23d.renderers.base import Renderer

SHADINGS = ("albedo", "lambertian", "textureless", "normal")


def ray_sphere(origins: Tensor, dirs: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """near, far (N,) of unit rays against the sphere |x| = radius, and a hit mask (N,)."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius**2
    disc = b * b - c
    hit = disc > 0
    root = disc.clamp_min(0).sqrt()
    near = (-b - root).clamp_min(0.0)
    far = (-b + root).clamp_min(0.0)
    return near, far, hit & (far > near)


def shade(albedo: Tensor, normals: Tensor | None, points: Tensor, light: Tensor, mode: str,
          ambient: float, diffuse: float) -> Tensor:
    """DreamFusion shading (Sec. 3.1): albedo, lambertian = albedo·(ambient + diffuse·max(0, n·l)),
    textureless = the same with white albedo (forces geometry, not texture, to explain the image);
    normal = the unit normal as a colour, (n + 1) / 2 (ProlificDreamer's geometry stage)."""
    if mode == "albedo":
        return albedo
    if mode == "normal":
        return normals * 0.5 + 0.5
    light_dir = nn.functional.normalize(light - points, dim=-1)
    lam = ambient + diffuse * (normals * light_dir).sum(-1, keepdim=True).clamp_min(0.0)
    base = albedo if mode == "lambertian" else torch.ones_like(albedo)
    return (base * lam).clamp(0.0, 1.0)


class VolumeRenderer(Renderer):
    needs = frozenset({"density", "albedo"})  # from the geometry (systems/parts.py)
    provides = frozenset({"rgb", "opacity", "depth", "sample_weights", "normals"})
    normals_from_geometry = True
    options = frozenset({"need_normals", "jitter", "occupancy"})

    def __init__(self, radius: float = 1.0, num_samples: int = 64, ambient: float = 0.1,
                 diffuse: float = 0.9, skip_weight: float = 1e-4, occupancy: dict | None = None):
        super().__init__()
        self.radius, self.num_samples = radius, num_samples
        self.ambient, self.diffuse = ambient, diffuse
        self.skip_weight = skip_weight
        self.occupancy = dict(occupancy) if occupancy else None  # settings of each particle's grid

    def make_occupancy(self):
        """A fresh occupancy grid for one particle (renderers/occupancy.py), or None if off."""
        from text23d.renderers.occupancy import OccupancyGrid

        return None if self.occupancy is None else OccupancyGrid(radius=self.radius, **self.occupancy)

    @property
    def sample_spacing(self) -> float:
        """The longest distance between samples (a ray through the centre), for the occupancy test."""
        return 2 * self.radius / self.num_samples

    def forward(self, geometry, background, cams: Cameras, height: int, width: int,
                shading: str = "albedo", need_normals: bool = False, jitter: bool = False, occupancy=None) -> dict:
        """Render B views. Returns comp_rgb (B,H,W,3), opacity/depth (B,H,W,1), comp_normal
        (B,H,W,3) when normals are needed, and per-sample `weights`/`normals`/`dirs` for losses."""
        if shading not in SHADINGS:
            raise ConfigError(f"shading={shading!r}: allowed are {SHADINGS}")
        need_normals = need_normals or shading != "albedo"
        B = len(cams)
        origins, dirs = get_rays(cams, height, width)
        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)  # (R, 3)
        near, far, hit = ray_sphere(o, d, self.radius)
        n = self.num_samples
        u = torch.rand(o.shape[0], n, device=o.device) if jitter else torch.full((1, n), 0.5, device=o.device)
        span = (far - near)[:, None]
        t = near[:, None] + (torch.arange(n, device=o.device) + u) / n * span  # (R, n) stratified
        delta = span / n
        pts = o[:, None] + d[:, None] * t[..., None]  # (R, n, 3)
        flat = pts.reshape(-1, 3)
        # Density everywhere (it decides the weights); colour and normals only where a sample's
        # weight reaches skip_weight. Empty space and samples behind the surface are skipped:
        # their colour could change the image by < skip_weight each.
        if occupancy is None:
            density = geometry.density(flat)
        else:  # samples in empty cells never reach the field
            live = occupancy.lookup(flat)
            density = flat.new_zeros(flat.shape[0]).index_put((live,), geometry.density(flat[live]).float())
        alpha = 1.0 - torch.exp(-density.view(-1, n) * delta)  # (R, n)
        alpha = alpha * hit[:, None]
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], 1), 1)[:, :-1]
        weights = alpha * trans  # (R, n)
        keep = (weights.detach() >= self.skip_weight).reshape(-1) if self.skip_weight > 0 else None
        sub = flat if keep is None else flat[keep]
        albedo, normals_sub = geometry.albedo_and_normals(sub) if need_normals else (geometry.albedo(sub), None)
        light = cams.light_position[:, None].expand(B, height * width * n, 3).reshape(-1, 3)
        light = light if keep is None else light[keep]
        color_sub = shade(albedo, normals_sub, sub, light, shading, self.ambient, self.diffuse)
        color, normals = color_sub, normals_sub
        if keep is not None:  # float32: under bf16/16-mixed autocast the fields' MLPs answer in half precision
            color = flat.new_zeros(flat.shape[0], 3).index_put((keep,), color_sub.float())
            if need_normals:
                normals = flat.new_zeros(flat.shape[0], 3).index_put((keep,), normals_sub.float())

        opacity = weights.sum(1, keepdim=True)  # (R, 1)
        rgb_fg = (weights[..., None] * color.view(-1, n, 3)).sum(1)
        rgb = rgb_fg + (1.0 - opacity) * background(d)
        depth = (weights * t).sum(1, keepdim=True) / opacity.clamp_min(1e-6)

        def img(x: Tensor) -> Tensor:
            return x.view(B, height, width, -1)

        out = {"comp_rgb": img(rgb), "opacity": img(opacity), "depth": img(depth),
               "weights": weights, "dirs": d, "points": pts}
        if normals is not None:
            normals = normals.view(-1, n, 3)
            out["normals"] = normals
            out["comp_normal"] = img((weights[..., None] * normals).sum(1))
        return out
