"""Mesh rendering: rasterise the geometry's triangle mesh, shade it like the volume renderer.

`implementation: auto | nvdiffrast | torch`. nvdiffrast (CUDA context) is used when it imports
and CUDA is there; otherwise the pure-torch rasteriser of rasterize.py, announced once. Both give
a z-buffered image with barycentric interpolation of world positions and area-weighted vertex
normals, and a silhouette that is smooth across edges (nvdiffrast's antialias; the torch path's
silhouette_alpha), so vertex positions get gradients at the outline too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from text23d import accel
from text23d.cameras.sampler import Cameras, get_rays
from text23d.errors import ConfigError, Text23dError
from text23d.ops import vertex_normals
from text23d.renderers.base import Renderer
from text23d.renderers.rasterize import barycentrics, interpolate, rasterize, silhouette_alpha
from text23d.renderers.volume import SHADINGS, shade


class MeshRenderer(Renderer):
    needs = frozenset({"mesh", "albedo"})  # from the geometry (systems/parts.py)
    provides = frozenset({"rgb", "opacity", "depth", "normals", "mesh"})  # no per-sample weights
    # Loss terms that mean nothing here; with a non-zero weight they are left out, with a warning.
    ignores = {"orient": "DreamFusion's orientation penalty weighs normals by volume-rendering weights along "
                         "each ray; a rasteriser draws only the surface facing the camera"}

    def __init__(self, radius: float = 1.0, ambient: float = 0.1, diffuse: float = 0.9,
                 implementation: str = "auto", band: float = 1.0):
        super().__init__()  # settings checked in text23d/schema (RasterizeConfig)
        self.radius, self.ambient, self.diffuse, self.band = radius, ambient, diffuse, band
        self.implementation = accel.choose("renderer", implementation, "nvdiffrast")
        self._context = None

    def forward(self, geometry, background, cams: Cameras, height: int, width: int, shading: str = "albedo") -> dict:
        """Render B views: comp_rgb (B,H,W,3), opacity/depth (B,H,W,1), comp_normal (B,H,W,3), and
        the mesh itself (for the normal-consistency and Laplacian regularisers)."""
        if shading not in SHADINGS:
            raise ConfigError(f"shading={shading!r}: allowed are {SHADINGS}")
        verts, faces = geometry.mesh()
        if len(faces) == 0:
            raise Text23dError("the mesh to rasterise is empty (its SDF has no zero crossing): the shape "
                               "vanished. Fix: lower this stage's SDF learning rate, or raise its "
                               "geometry.resolution, or start it from the earlier stage again (init_from=)")
        B = len(cams)
        raster = self._torch if self.implementation == "torch" else self._nvdiffrast
        face_id, pos, normal, alpha = raster(verts, faces, cams, height, width)
        covered = face_id >= 0  # (B, H, W)
        light = cams.light_position[:, None, None].expand(B, height, width, 3)[covered]
        albedo = geometry.albedo(pos[covered])
        colour = shade(albedo, normal[covered], pos[covered], light, shading, self.ambient, self.diffuse)
        fg = pos.new_zeros(B, height, width, 3).index_put((covered,), colour.to(pos.dtype))  # autocast: half
        fg = _spread(fg, covered)  # colour for the outside half of the blend band
        _, dirs = get_rays(cams, height, width)
        bg = background(dirs.reshape(-1, 3)).view(B, height, width, 3)
        a = alpha[..., None]
        depth = torch.where(covered, (pos - cams.c2w[:, None, None, :3, 3]).norm(dim=-1), 0.0)[..., None]
        return {"comp_rgb": a * fg + (1 - a) * bg, "opacity": a, "depth": depth,
                "comp_normal": normal * a, "mesh": (verts, faces)}

    def _torch(self, verts: Tensor, faces: Tensor, cams: Cameras, height: int, width: int):
        face_id = rasterize(verts, faces, cams, height, width)
        bary = barycentrics(verts, faces, face_id, cams)
        pos = interpolate(verts, faces, face_id, bary)
        normal = F.normalize(interpolate(vertex_normals(verts, faces), faces, face_id, bary), dim=-1, eps=1e-12)
        return face_id, pos, normal, silhouette_alpha(verts, faces, cams, face_id, self.band)

    def _nvdiffrast(self, verts: Tensor, faces: Tensor, cams: Cameras, height: int, width: int):
        dr = accel.load("nvdiffrast")
        if self._context is None:
            self._context = dr.RasterizeCudaContext(device=verts.device)  # no OpenGL since 0.4
        clip = clip_space(verts, cams, height, width)
        tri = faces.int().contiguous()
        rast, _ = dr.rasterize(self._context, clip, tri, (height, width))
        pos, _ = dr.interpolate(verts[None].expand(len(cams), -1, -1).contiguous(), rast, tri)
        normal, _ = dr.interpolate(vertex_normals(verts, faces)[None].expand(len(cams), -1, -1).contiguous(), rast, tri)
        alpha = dr.antialias((rast[..., 3:] > 0).float(), rast, clip, tri)[..., 0]
        # nvdiffrast's first row is the bottom of the image (OpenGL); ours is the top.
        face_id, pos, normal, alpha = (x.flip(1) for x in (rast[..., 3].long() - 1, pos, normal, alpha))
        return face_id, pos, F.normalize(normal, dim=-1, eps=1e-12), alpha


def clip_space(verts: Tensor, cams: Cameras, height: int, width: int, near: float = 0.01, far: float = 100.0) -> Tensor:
    """OpenGL clip coordinates (B, V, 4) for the same pinhole `get_rays` uses."""
    f = 1.0 / torch.tan(0.5 * cams.fovy)  # (B,)
    proj = torch.zeros(len(cams), 4, 4, device=verts.device)
    proj[:, 0, 0], proj[:, 1, 1] = f * height / width, f
    proj[:, 2, 2], proj[:, 2, 3] = (far + near) / (near - far), 2 * far * near / (near - far)
    proj[:, 3, 2] = -1.0
    homo = torch.cat([verts, torch.ones_like(verts[:, :1])], -1)
    return torch.einsum("bij,bjk,vk->bvi", proj, torch.linalg.inv(cams.c2w), homo).contiguous()


def _spread(fg: Tensor, covered: Tensor) -> Tensor:
    """Give uncovered pixels next to the mesh the mean colour of their covered neighbours, so the
    blend across the silhouette mixes the object's colour with the background, not black."""
    m = covered[:, None].float()
    rgb = fg.permute(0, 3, 1, 2)
    total = F.avg_pool2d(rgb * m, 3, 1, 1) / F.avg_pool2d(m, 3, 1, 1).clamp_min(1e-6)
    return torch.where(covered[..., None], fg, total.permute(0, 2, 3, 1))
