"""Procedural training data for the built-in prior: coloured primitives, captioned "a red cone".

The built-in prior must be trainable on a 2-core CPU and checkable by tests, so its world is small
and exactly known: six analytic shapes × eight colours, rendered by sphere tracing their signed
distance functions (SDFs) under the same random cameras SDS training uses. The evaluation renders
its ground truth with the same functions, so `render_primitives` / `render_silhouettes` are the
public API here; `make_dataset` adds the random draws and the captions.

Conventions (see .notes/INTERFACES.md): world z-up, object centred at the origin, azimuth 0 is the
front (+x). Each shape fits a ball of radius ≈ `scale` (at most BOUND·scale); its rotation is about
the vertical (z) axis only, so "front view" keeps meaning the same side of the object.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from text23d.cameras.sampler import Cameras, RandomCameraSampler, get_rays
from text23d.errors import ConfigError
from text23d.prompts.processor import PromptProcessor, directions_of

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")  # also the caption words
# Saturated colours that read clearly on white. Black is a dark grey so its shading stays visible.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "orange": (1.00, 0.50, 0.05),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.10, 0.65, 0.20),
    "blue": (0.10, 0.30, 0.90),
    "purple": (0.55, 0.15, 0.75),
    "gray": (0.50, 0.50, 0.50),
    "black": (0.12, 0.12, 0.12),
}
AMBIENT = 0.35  # shade = colour · (AMBIENT + (1 − AMBIENT) · max(0, n·l))
BOUND = 1.25  # every shape lies inside a ball of radius BOUND (in units of its scale)
SCALE_RANGE = (0.45, 0.60)
# The objects face the front (+x) exactly, and captions name the view in 8 sectors of 45°: "front"
# is then a face of a cube, "front right" its corner. With 4 wide sectors and objects turned by up
# to ±15°, "front view" showed faces and corners alike, and SDS settled on round barrels that
# look equally cube-like from every side.
ROTATION_RANGE = (0.0, 0.0)  # degrees about z
VIEW_SECTORS = 8  # prior=builtin sets system.prompt_processor.view_sectors to the same
DIRECTIONS = directions_of(VIEW_SECTORS)
# Most captions name the view: score distillation asks for a view in every step, and a prior that
# learnt the suffix from only half its captions largely ignored it (cubes came out as barrels).
SUFFIX_PROBABILITY = 0.85


# --- held-out pairs and captions ------------------------------------------------------------


def held_out_pairs() -> list[tuple[str, str]]:
    """The (shape, colour) pairs never shown in training: one per shape, each colour at most once.

    A Latin-square style rule, colour index = (3·shape index + 1) mod 8: 3 is invertible mod 8, so
    distinct shapes get distinct colours. 6 of the 48 pairs (1 in 8) are held out, and every shape
    and every colour still appears in training, so generating a held-out pair tests composition.
    """
    colours = list(COLOURS)
    return [(shape, colours[(3 * i + 1) % len(colours)]) for i, shape in enumerate(SHAPES)]


HELD_OUT: tuple[tuple[str, str], ...] = tuple(held_out_pairs())


def vocabulary() -> list[str]:
    """Every word a caption can contain; each becomes one token of the prior's tokenizer."""
    words = [w for d in DIRECTIONS for w in d.split()]
    return list(dict.fromkeys(["a", *COLOURS, *SHAPES, *words, "view"]))


# Words that carry no meaning for this world, read as the article the captions use.
ALIASES = {"an": "a", "the": "a"}


def write_vocabulary(folder) -> None:
    """`vocabulary.json` beside the model: the prompt processor warns about any other word."""
    import json
    from pathlib import Path

    text = json.dumps({"words": vocabulary(), "aliases": ALIASES}, indent=2) + "\n"
    (Path(folder) / "vocabulary.json").write_text(text, encoding="utf-8")


def caption(shape: str, colour: str, view: str | None = None) -> str:
    """ "a red cone", or with a view (one of DIRECTIONS) "a red cone, side view"."""
    _check_names([shape], [colour])
    if view is not None and view not in DIRECTIONS:
        raise ConfigError(f"view={view!r} is not one of {DIRECTIONS}; pass one of them or None")
    return f"a {colour} {shape}" + ("" if view is None else f", {view} view")


def view_directions(elevation_deg, azimuth_deg) -> list[str]:
    """The view word per camera, by the same rule view-dependent prompting uses in SDS training."""
    # Reusing PromptProcessor's rule (not a copy) keeps training captions and SDS prompts in sync.
    return PromptProcessor("a", view_sectors=VIEW_SECTORS).directions(elevation_deg, azimuth_deg)


def _check_names(shapes: Iterable[str], colours: Iterable[str]) -> None:
    for shape in shapes:
        if shape not in SHAPES:
            raise ConfigError(f"shape {shape!r} is unknown; allowed: {SHAPES}")
    for colour in colours:
        if colour not in COLOURS:
            raise ConfigError(f"colour {colour!r} is unknown; allowed: {tuple(COLOURS)}")


# --- signed distance functions (object frame, unit scale) -------------------------------------
# Each takes the coordinates x, y, z as separate (M,) tensors (pure elementwise arithmetic: ~3×
# faster on CPU than reductions over a trailing axis of 3) and returns (M,). Exact SDFs where they
# are short; the cone and the pyramid use the max of their face planes, a 1-Lipschitz bound with
# the exact zero set, which is all sphere tracing needs (it only steps shorter near the apex).


def _hypot(a: Tensor, b: Tensor) -> Tensor:
    return torch.sqrt(a * a + b * b)


def _sdf_sphere(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y + z * z) - 1.0


def _sdf_cube(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    h = 0.62  # half-size: corners at 1.07, a visual size similar to the sphere's
    qx, qy, qz = x.abs() - h, y.abs() - h, z.abs() - h
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2 + qz.clamp(min=0) ** 2)
    return outside + torch.maximum(torch.maximum(qx, qy), qz).clamp(max=0)


def _sdf_cylinder(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    radius, half_height = 0.65, 0.70
    dr, dz = _hypot(x, y) - radius, z.abs() - half_height
    return torch.maximum(dr, dz).clamp(max=0) + _hypot(dr.clamp(min=0), dz.clamp(min=0))


def _sdf_cone(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    # Base radius 0.75 at z = −0.75, apex at z = +0.75; in the (ρ, z) half-plane the side is the line
    # through (0.75, −0.75) and (0, 0.75), outward normal ∝ (1.5, 0.75).
    side = (1.5 * _hypot(x, y) + 0.75 * (z - 0.75)) / math.hypot(1.5, 0.75)
    return torch.maximum(side, -z - 0.75)


def _sdf_torus(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    major, minor = 0.65, 0.30  # lying flat (ring axis z): the hole is visible from above
    return _hypot(_hypot(x, y) - major, z) - minor


def _sdf_pyramid(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    # Square base of half-width 0.7 at z = −0.7, apex at z = +0.7, faces towards ±x and ±y (a face,
    # not an edge, looks at the front camera). max(|x|, |y|) folds the four faces into one plane.
    side = (1.4 * torch.maximum(x.abs(), y.abs()) + 0.7 * (z - 0.7)) / math.hypot(1.4, 0.7)
    return torch.maximum(side, -z - 0.7)


SDFS = {
    "sphere": _sdf_sphere,
    "cube": _sdf_cube,
    "cylinder": _sdf_cylinder,
    "cone": _sdf_cone,
    "torus": _sdf_torus,
    "pyramid": _sdf_pyramid,
}
# Tetrahedral finite differences: 4 SDF evaluations give the gradient (6 with central differences).
_TETRA = ((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, 1.0))
_COMPACT_EVERY = 8  # drop finished rays every few steps: most converge or escape within ~10


# --- sphere tracing ---------------------------------------------------------------------------


def _sphere_trace(
    sdf, origins: Tensor, dirs: Tensor, iterations: int, hit_eps: float
) -> tuple[Tensor, Tensor]:
    """March rays (M, 3) in the unit object frame. Returns hit (M,) bool and points (M, 3).

    Rays start where they enter the bounding ball, so no step is spent on empty space, and only
    rays that cross the ball are marched; rays that have converged or left the ball are dropped
    every few steps. The cap is generous (128) because rays grazing a surface (the torus seen from
    a low elevation) need ~100 small steps; with 48 they stop on the rim and leave light speckles.
    Compaction makes the extra steps nearly free: only those few rays are still marching.
    """
    b = (origins * dirs).sum(-1)  # (M,) ray-ball intersection: t² + 2bt + c = 0
    c = (origins * origins).sum(-1) - BOUND**2
    disc = b * b - c
    cand = (disc > 0).nonzero().squeeze(1)  # rays that cross the bounding ball
    root = disc[cand].sqrt()
    t_near, t_far = (-b[cand] - root).clamp(min=0), -b[cand] + root
    t_final = t_far + 1.0  # (K,) a miss unless a ray converges
    # Marching state, compacted as rays finish: coordinates as separate contiguous (k,) tensors.
    ox, oy, oz = origins[cand].T.contiguous()
    dx, dy, dz = dirs[cand].T.contiguous()
    t, far, idx = t_near, t_far, torch.arange(len(cand), device=origins.device)
    for step in range(iterations):
        dist = sdf(ox + t * dx, oy + t * dy, oz + t * dz)
        t = t + dist
        if (step + 1) % _COMPACT_EVERY == 0 or step == iterations - 1:
            done = (dist < 0.25 * hit_eps) | (t > far)
            t_final[idx[done]] = t[done]
            keep = ~done
            ox, oy, oz, dx, dy, dz, t, far, idx = (
                v[keep] for v in (ox, oy, oz, dx, dy, dz, t, far, idx))
    t_final[idx] = t  # rays still marching at the cap: judged by the hit test below
    points = origins[cand] + t_final[:, None] * dirs[cand]  # (K, 3)
    ok = (sdf(*points.T) < hit_eps) & (t_final < t_far)
    hit = torch.zeros(origins.shape[0], dtype=torch.bool, device=origins.device)
    hit[cand[ok]] = True
    all_points = torch.zeros_like(origins)
    all_points[cand[ok]] = points[ok]
    return hit, all_points


def _normals(sdf, points: Tensor, h: float = 1e-3) -> Tensor:
    """Unit outward normals (M, 3): the SDF gradient by tetrahedral finite differences."""
    grad = torch.zeros_like(points)
    for k in _TETRA:
        offset = torch.tensor(k, device=points.device)
        value = sdf(*(points + h * offset).T)  # (M,)
        grad += value[:, None] * offset
    return F.normalize(grad, dim=-1)


def _rotation_z(degrees: Tensor) -> Tensor:
    """(N, 3, 3) rotations about +z by `degrees` (N,)."""
    a = torch.deg2rad(degrees)
    cos, sin, zero, one = torch.cos(a), torch.sin(a), torch.zeros_like(a), torch.ones_like(a)
    return torch.stack(
        [torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1),
         torch.stack([zero, zero, one], -1)], dim=-2)


def _shape_indices(shape_ids) -> Tensor:
    if isinstance(shape_ids, Tensor):
        ids = shape_ids.long().reshape(-1).cpu()
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(SHAPES)):
            raise ConfigError(f"shape ids must be in [0, {len(SHAPES)}); got {ids.unique().tolist()}")
        return ids
    names = [shape_ids] if isinstance(shape_ids, str) else list(shape_ids)
    _check_names(names, [])
    return torch.tensor([SHAPES.index(name) for name in names], dtype=torch.long)


def _as_batch(value, n: int, name: str, device) -> Tensor:
    out = torch.as_tensor(value, dtype=torch.float32, device=device)
    out = out.expand(n) if out.ndim == 0 else out.reshape(-1)
    if out.shape[0] != n:
        raise ValueError(f"{name} has {out.shape[0]} entries for {n} cameras; pass one per camera")
    return out


@contextlib.contextmanager
def _one_cpu_thread(device):
    """Run CPU rendering on one thread, then restore the caller's setting.

    Sphere tracing is hundreds of small memory-bound elementwise ops. With 2 threads each op ends in
    a barrier, and on a busy 2-core machine one thread is often descheduled: we measured 11 images/s
    with 2 threads against 600 with 1 while another process was running (and only ~1.4× gain on an
    idle machine).
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _render(shape_ids, colour_rgb, cams: Cameras, scale, rotation_deg, size: int,
            iterations: int, hit_eps: float) -> tuple[Tensor, Tensor]:
    """Shaded rgb (N, size, size, 3) on white and coverage (N, size, size) float, no supersampling."""
    n, device = len(cams), cams.c2w.device
    ids = _shape_indices(shape_ids)
    if ids.shape[0] != n:
        raise ValueError(f"{ids.shape[0]} shapes for {n} cameras; pass one shape per camera")
    colour = torch.as_tensor(colour_rgb, dtype=torch.float32, device=device).reshape(n, 3)
    scale = _as_batch(scale, n, "scale", device)
    rotation = _as_batch(rotation_deg, n, "rotation_deg", device)

    # Into the unit object frame: undo the object's rotation, divide by its scale. A rigid map, so
    # SDF values, normals and the light direction all stay consistent there.
    to_object = _rotation_z(-rotation)  # (N, 3, 3)
    origins, dirs = get_rays(cams, size, size)  # each (N, S, S, 3)
    origins = torch.einsum("nij,nhwj->nhwi", to_object, origins) / scale[:, None, None, None]
    dirs = torch.einsum("nij,nhwj->nhwi", to_object, dirs)
    light = torch.einsum("nij,nj->ni", to_object, cams.light_position.float()) / scale[:, None]

    rgb = torch.ones(n, size * size, 3, device=device)  # white background
    mask = torch.zeros(n, size * size, device=device)
    with _one_cpu_thread(device):
        for shape_index in ids.unique().tolist():  # one shape per sub-batch: one SDF, no wasted work
            _shade_shape(shape_index, ids, origins, dirs, light, colour, rgb, mask, iterations, hit_eps)
    return rgb.reshape(n, size, size, 3), mask.reshape(n, size, size)


def _shade_shape(shape_index: int, ids: Tensor, origins: Tensor, dirs: Tensor, light: Tensor,
                 colour: Tensor, rgb: Tensor, mask: Tensor, iterations: int, hit_eps: float) -> None:
    """Trace and shade every image showing SHAPES[shape_index]; writes into rgb and mask in place.

    origins, dirs (N, S, S, 3) and light (N, 3) are in the unit object frame; rgb (N, S·S, 3), mask (N, S·S).
    """
    sel = (ids == shape_index).nonzero().squeeze(1).to(origins.device)  # images with this shape
    sdf = SDFS[SHAPES[shape_index]]
    o, d = origins[sel].reshape(-1, 3), dirs[sel].reshape(-1, 3)  # (k·S·S, 3)
    hit, points = _sphere_trace(sdf, o, d, iterations, hit_eps)
    hit, points = hit.reshape(len(sel), -1), points.reshape(len(sel), -1, 3)
    img, pix = hit.nonzero(as_tuple=True)  # hit pixels: image index within sel, pixel index
    p = points[img, pix]  # (H, 3)
    normal = _normals(sdf, p)
    to_light = F.normalize(light[sel][img] - p, dim=-1)
    lambert = (normal * to_light).sum(-1).clamp(min=0)  # (H,)
    shade = AMBIENT + (1 - AMBIENT) * lambert
    rgb[sel[img], pix] = colour[sel][img] * shade[:, None]
    mask[sel[img], pix] = 1.0


def render_primitives(
    shape_ids: Sequence[str] | Tensor,
    colour_rgb,
    cams: Cameras,
    scale,
    rotation_deg,
    resolution: int = 32,
    supersample: int = 2,
    iterations: int = 128,
    hit_eps: float = 1e-3,
) -> Tensor:
    """Render one primitive per camera: (N, resolution, resolution, 3) float in [0, 1], white background.

    shape_ids: N names from SHAPES (or their indices); colour_rgb: (N, 3) in [0, 1];
    scale: (N,) or a number, ≈ the object's radius; rotation_deg: (N,) or a number, about z.
    Rendered at resolution·supersample and average-pooled down (anti-aliased edges).
    """
    rgb, _ = _render(shape_ids, colour_rgb, cams, scale, rotation_deg, resolution * supersample,
                     iterations, hit_eps)
    return _pool(rgb.permute(0, 3, 1, 2), supersample).permute(0, 2, 3, 1).clamp(0, 1)


def render_silhouettes(
    shape_ids: Sequence[str] | Tensor,
    cams: Cameras,
    scale,
    rotation_deg,
    resolution: int = 32,
    supersample: int = 2,
    iterations: int = 128,
    hit_eps: float = 1e-3,
) -> Tensor:
    """Object masks (N, resolution, resolution) bool: pixels more than half covered by the object."""
    n = len(cams)
    grey = torch.full((n, 3), 0.5, device=cams.c2w.device)
    _, cover = _render(shape_ids, grey, cams, scale, rotation_deg, resolution * supersample,
                       iterations, hit_eps)
    return _pool(cover[:, None], supersample)[:, 0] > 0.5


def _pool(x: Tensor, factor: int) -> Tensor:
    return F.avg_pool2d(x, factor) if factor > 1 else x  # (N, C, H, W) -> (N, C, H/f, W/f)


# --- the dataset ------------------------------------------------------------------------------


def make_dataset(
    n: int,
    seed: int,
    held_out: Iterable[tuple[str, str]] = HELD_OUT,
    resolution: int = 32,
    batch_size: int = 256,
    progress=None,
) -> tuple[np.ndarray, list[str], dict]:
    """`n` captioned renders, deterministic for `seed` (and batch_size); the global RNG is untouched.

    Returns images uint8 (n, resolution, resolution, 3), captions, and meta: a dict of per-image
    lists ("shape", "colour", "view": the camera's direction word, "suffix": whether the caption
    names it) and float tensors (n,) ("elevation", "azimuth", "distance", "fovy" (radians),
    "scale", "rotation" (degrees)). Pairs are drawn uniformly from the 48 minus `held_out`;
    cameras from RandomCameraSampler's defaults, the distribution SDS training uses.
    `progress(done, n)` is called after each batch if given.
    """
    held = {tuple(pair) for pair in held_out}
    _check_names([s for s, _ in held], [c for _, c in held])
    pairs = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in held]
    if n < 1 or not pairs:
        raise ConfigError(f"make_dataset needs n >= 1 and at least one allowed pair (n={n}, "
                          f"{len(held)} pairs held out)")
    sampler = RandomCameraSampler()
    images, captions, parts = [], [], []
    # fork_rng: the sampler draws from torch's global RNG; seeding a fork of it keeps the data
    # deterministic without changing the stream the caller (or a test) sees afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            cams = sampler.sample(b)
            pair = torch.randint(len(pairs), (b,))
            scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * torch.rand(b)
            rotation = ROTATION_RANGE[0] + (ROTATION_RANGE[1] - ROTATION_RANGE[0]) * torch.rand(b)
            suffix = torch.rand(b) < SUFFIX_PROBABILITY
            shapes = [pairs[i][0] for i in pair.tolist()]
            colours = [pairs[i][1] for i in pair.tolist()]
            rgb = torch.tensor([COLOURS[c] for c in colours])
            img = render_primitives(shapes, rgb, cams, scale, rotation, resolution)
            images.append((img * 255).round().to(torch.uint8).numpy())
            views = view_directions(cams.elevation, cams.azimuth)
            captions += [caption(s, c, v if x else None)
                         for s, c, v, x in zip(shapes, colours, views, suffix.tolist())]
            parts.append(dict(shape=shapes, colour=colours, view=views, suffix=suffix.tolist(),
                              elevation=cams.elevation, azimuth=cams.azimuth, distance=cams.distance,
                              fovy=cams.fovy, scale=scale, rotation=rotation))
            if progress is not None:
                progress(start + b, n)
    meta = {key: (sum((p[key] for p in parts), []) if isinstance(parts[0][key], list)
                  else torch.cat([p[key] for p in parts]))
            for key in parts[0]}
    return np.concatenate(images), captions, meta
