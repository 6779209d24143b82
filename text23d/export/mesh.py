"""Isosurface extraction from a density field, and OBJ/GLB writing with vertex colours.

The field is sampled on a regular grid, marching cubes (PyMCubes) finds the surface
`density == threshold`, and the colour field is queried once per vertex.
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Sequence

import mcubes
import numpy as np
import torch
import trimesh

from text23d.config import MESH_FORMATS
from text23d.errors import ConfigError, Text23dError
from text23d.fileio import atomic_output

# Our world is z-up; glTF is y-up. (x, y, z) -> (x, z, -y) is a -90° rotation about x
# (det = +1, so face winding and outward normals survive), and viewers then show the object
# upright. OBJ has no up-axis convention, so it keeps world coordinates.
Z_UP_TO_Y_UP = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, -1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def grid_axis(radius: float, resolution: int) -> np.ndarray:
    """World coordinates of the grid samples along one axis, endpoints included.  # (R,)"""
    return np.linspace(-radius, radius, resolution, dtype=np.float64)


def _field_device(fn: Callable) -> torch.device:
    """Device of the module a bound method such as `geometry.density` belongs to; else CPU."""
    owner = getattr(fn, "__self__", fn)
    if isinstance(owner, torch.nn.Module):
        for t in itertools.chain(owner.parameters(), owner.buffers()):
            return t.device
    return torch.device("cpu")


def _eval_chunked(fn: Callable, points: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over points (N, 3) in chunks of `chunk` rows, results concatenated on the CPU."""
    with torch.no_grad():
        outs = [fn(points[i : i + chunk]).float().cpu() for i in range(0, len(points), chunk)]
        return torch.cat(outs)


def sample_density_grid(
    density_fn: Callable[[torch.Tensor], torch.Tensor],
    radius: float,
    resolution: int,
    chunk: int = 65536,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Density on a resolution³ grid over [-radius, radius]³: grid[i, j, k] = σ(x_i, y_j, z_k).

    Points are built per chunk from flat indices, so a 512³ grid never holds all its
    coordinates (1.6 GB) in memory at once.
    """
    with torch.no_grad():
        if resolution < 2:
            raise ConfigError(
                f"export.resolution={resolution} is too small: the grid needs at least 2 "
                "samples per axis (64-256 is typical). Fix: export.resolution=128."
            )
        axis = torch.as_tensor(grid_axis(radius, resolution), dtype=torch.float32, device=device)
        n = resolution**3
        out = torch.empty(n, dtype=torch.float32)  # (R³,)
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n), device=device)
            i, j, k = idx // resolution**2, (idx // resolution) % resolution, idx % resolution
            pts = torch.stack([axis[i], axis[j], axis[k]], dim=-1)  # (C, 3)
            out[start : start + len(idx)] = density_fn(pts).reshape(-1).float().cpu()
        # NaN would silently punch holes in marching cubes; read it as density 0, empty space.
        return torch.nan_to_num(out, nan=0.0).reshape(resolution, resolution, resolution).numpy()


def density_range(grid: np.ndarray) -> tuple[float, float]:
    """(min, max) of a sampled density grid, for messages and threshold choices."""
    return float(grid.min()), float(grid.max())


def extract_mesh(
    density_fn: Callable[[torch.Tensor], torch.Tensor],
    color_fn: Callable[[torch.Tensor], torch.Tensor],
    radius: float,
    resolution: int,
    threshold: float,
    chunk: int = 65536,
    device: str | torch.device | None = None,
) -> trimesh.Trimesh:
    """Mesh of the surface density == threshold inside [-radius, radius]³, in world coordinates.

    density_fn: (N, 3) float32 world points -> (N,) densities (higher = inside).
    color_fn:   (N, 3) -> (N, 3) RGB in [0, 1] at each vertex, stored as uint8 RGBA vertex colours;
                None leaves them white (`surface_colors` then sets what the asset shows).
    device:     where query points are built; None = the device of density_fn's module (if it
                is a bound method of an nn.Module, e.g. geometry.density), else CPU.
    """
    with torch.no_grad():
        device = _field_device(density_fn) if device is None else torch.device(device)
        grid = sample_density_grid(density_fn, radius, resolution, chunk, device)  # (R, R, R)
        lo, hi = density_range(grid)
        if not lo < threshold < hi:
            raise Text23dError(
                f"No surface to extract: density over [-{radius}, {radius}]³ ranges from {lo:.4g} "
                f"to {hi:.4g}, and export.isosurface_threshold={threshold:g} is not inside that "
                "range. Fix: pick a level inside it "
                f"(e.g. export.isosurface_threshold={(lo + hi) / 2:.4g}), use "
                "export.isosurface_threshold=auto, or train longer so the field forms an object."
            )
        # PyMCubes returns vertices in array-index units, ordered like the array axes (i, j, k).
        # Its winding makes normals point towards *decreasing* values; density is higher inside,
        # so the faces already face outward and need no flip (tests/test_export.py guards this).
        verts_idx, faces = mcubes.marching_cubes(grid, float(threshold))  # (V, 3), (F, 3)
        if len(faces) == 0:  # crossings only between samples closer than float precision
            raise Text23dError(
                f"Marching cubes found no faces at export.isosurface_threshold={threshold:g} "
                f"(density range {lo:.4g}..{hi:.4g}). Fix: raise export.resolution."
            )
        voxel = 2.0 * radius / (resolution - 1)
        verts = (verts_idx * voxel - radius).astype(np.float32)  # (V, 3) world coordinates

        rgba = np.full((len(verts), 4), 255, dtype=np.uint8)
        if color_fn is not None:
            rgb = _eval_chunked(color_fn, torch.from_numpy(verts).to(device), chunk).numpy()  # (V, 3)
            rgba[:, :3] = to_rgb8(rgb)
        # process=False keeps vertex order aligned with the colours we computed.
        return trimesh.Trimesh(
            vertices=verts, faces=faces.astype(np.int64), vertex_colors=rgba, process=False
        )


def to_rgb8(rgb: np.ndarray) -> np.ndarray:
    return np.round(np.clip(np.nan_to_num(rgb[:, :3]), 0.0, 1.0) * 255.0).astype(np.uint8)


def surface_colors(
    density_fn: Callable[[torch.Tensor], torch.Tensor],
    albedo_fn: Callable[[torch.Tensor], torch.Tensor],
    mesh: trimesh.Trimesh,
    radius: float,
    start: float,
    chunk: int = 8192,
) -> np.ndarray:
    """The colour a viewer looking straight at each vertex sees, (V, 3) in [0, 1].

    The isosurface is where the density crosses a level, which can be a thin haze in front of what
    the renders show: the albedo there was never constrained by any view (a black torus whose
    shell is grey-blue). So each vertex gets the volume-rendered albedo along its inward normal,
    from `start` outside the surface to where the ray leaves the scene's ball, composited with
    the renderer's weights and normalised by their sum; that is the colour of the surface the
    renders show at that point. A vertex whose ray meets (almost) nothing keeps its own albedo.
    """
    with torch.no_grad():
        device = _field_device(density_fn)
        verts = torch.tensor(np.array(mesh.vertices), dtype=torch.float32, device=device)
        normals = torch.tensor(np.array(mesh.vertex_normals), dtype=torch.float32, device=device)
        return composited_colors(density_fn, albedo_fn, verts, normals, radius, start, chunk).cpu().numpy()


SKIP_WEIGHT = 1e-4  # a sample below this weight is not asked its albedo (the renderer's skip_weight)
NEAR_STEPS, FAR_STEPS = 10, 6  # `sample_edges`: even steps through the surface, then growing ones


def sample_edges(start: float, radius: float) -> torch.Tensor:
    """Where the intervals a composite samples begin and end, as distances along the ray from its origin
    `start` outside the surface (NEAR_STEPS + FAR_STEPS + 1,): NEAR_STEPS even steps of start/3 (2/3 of
    a voxel, `start` being two) from 2 voxels outside the surface to 4.7 inside, then FAR_STEPS steps,
    each longer by one ratio, to 2·radius (the longest way through the scene's ball).
    An opaque surface puts its weight within a voxel of where the ray enters it, which may lie a few
    voxels below an isosurface in haze: steps there must be fractions of a voxel, and even, or the
    colour depends on where the isosurface lies. A soft body spreads its weight deep, where the
    transmittance falls slowly and long steps integrate it as well. Against the 64 evenly spaced
    samples this replaced (measured in docs/benchmarks.md): colours within 0.5/255 of theirs and as
    close to the renders, for 16 density look-ups instead of 64."""
    step = start / 3
    ratio = _growth(step, 2 * radius - NEAR_STEPS * step, FAR_STEPS)
    steps = torch.cat([torch.full((NEAR_STEPS,), step, dtype=torch.float64),
                       step * ratio ** torch.arange(1, FAR_STEPS + 1, dtype=torch.float64)])
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(steps, 0)]).float()


def _growth(step: float, length: float, n: int) -> float:
    """The ratio q ≥ 1 for which the n steps step·q, step·q², …, step·qⁿ add up to `length` (by
    bisection); 1 where even steps already reach that far."""
    total = lambda q: step * q * (q**n - 1) / (q - 1)  # noqa: E731
    if step * n >= length:
        return 1.0
    lo, hi = 1.0, 2.0
    while total(hi) < length:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < length else (lo, mid)
    return hi


def composited_colors(density_fn, albedo_fn, verts: torch.Tensor, normals: torch.Tensor, radius: float,
                      start: float, chunk: int = 8192) -> torch.Tensor:
    """`surface_colors` for any surface points (N, 3) with unit normals (N, 3): (N, 3) on their device.
    Samples are spaced by `sample_edges`; those past where the ray leaves the ball count as empty."""
    with torch.no_grad():
        edges = sample_edges(start, radius).to(verts.device)
        t, delta = (edges[1:] + edges[:-1]) / 2, edges[1:] - edges[:-1]  # (n,) midpoints and lengths
        out = [_composite(density_fn, albedo_fn, v, n, radius, start, t, delta)
               for v, n in zip(verts.split(chunk), normals.split(chunk)) if len(v)]
        return torch.cat(out) if out else torch.zeros(0, 3, device=verts.device)


def _composite(density_fn, albedo_fn, v: torch.Tensor, n: torch.Tensor, radius: float, start: float,
               t: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """One chunk of `composited_colors`: density at every sample, the renderer's weights, albedo only
    where a weight reaches SKIP_WEIGHT (behind an opaque skin and in empty space nothing is asked)."""
    origin, direction = v + start * n, -n  # (C, 3): just outside, looking in
    b = (origin * direction).sum(-1)  # exit of the ball |x| = radius along the ray
    far = (-b + (b * b - (origin * origin).sum(-1) + radius**2).clamp_min(0).sqrt()).clamp_min(2 * start)
    pts = origin[:, None] + direction[:, None] * t[:, None]  # (C, n, 3)
    sigma = density_fn(pts.reshape(-1, 3)).float().view(-1, len(t)) * (t < far[:, None])  # 0 past the ball
    alpha = 1 - torch.exp(-sigma * delta)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], 1), 1)[:, :-1]
    weights = alpha * trans  # (C, n), as in renderers/volume.py
    albedo = _fill(albedo_fn, pts, weights > SKIP_WEIGHT, torch.zeros(*pts.shape, device=v.device))
    total = weights.sum(1, keepdim=True)
    colour = (weights[..., None] * albedo).sum(1) / total.clamp_min(1e-6)
    return _fill(albedo_fn, v, total[:, 0] <= 1e-3, colour)  # a ray that met (almost) nothing: own albedo


def _fill(fn, points: torch.Tensor, where: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` with fn(points[where]) written where `where` holds. fn is not called for no points: a
    hash grid cannot reshape an empty batch."""
    return out.index_put((where,), fn(points[where]).float()) if where.any() else out


def save_mesh(
    mesh: trimesh.Trimesh,
    out_dir: str,
    stem: str,
    formats: Sequence[str] = MESH_FORMATS,
) -> dict[str, str]:
    """Write `<stem>.obj` (world coordinates, "v x y z r g b") and/or `<stem>.glb` (y-up, COLOR_0).

    Returns {format: absolute path}.
    """
    if isinstance(formats, str):  # "glb" would otherwise iterate as "g", "l", "b"
        formats = (formats,)
    unknown = [f for f in formats if f not in MESH_FORMATS]
    if unknown:
        raise ConfigError(
            f"Unknown mesh format(s) {unknown}; allowed: {list(MESH_FORMATS)}. "
            "Fix: e.g. export.format=[obj,glb]."
        )
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for fmt in dict.fromkeys(formats):  # de-duplicated, order kept
        path = os.path.abspath(os.path.join(out_dir, f"{stem}.{fmt}"))
        if fmt == "obj":
            data = mesh.export(file_type="obj", include_normals=False, include_color=True)
        else:
            yup = mesh.copy()
            yup.apply_transform(Z_UP_TO_Y_UP)
            data = yup.export(file_type="glb")
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        paths[fmt] = path
    return paths
