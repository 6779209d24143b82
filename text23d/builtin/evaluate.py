"""Did the pipeline generate what was asked? Scoring assets made on the built-in prior.

For "a {colour} {shape}", an asset is seen from the evaluation orbit and compared with the true
primitive rendered by the data renderer from the same cameras. It is judged twice: on the volume
renders (`score_asset`) and on the exported mesh file (`score_mesh`: the GLB a user takes away,
rasterised with its vertex colours). Each judgement has
- silhouette IoU with the asked shape over 8 azimuths, best over the data's range of scales and,
  for the shapes with corners, over rotations about the vertical axis (size and turn are free);
- shape classification: the primitive whose silhouettes fit best, overruled by rotational
  symmetry: a cube or pyramid must have corners about the vertical axis, a cylinder, cone, sphere
  or torus must not. A barrel is not a cube even when its silhouettes happen to fit one. On
  renders, corners show as a 90°-periodic part of the silhouette area over 16 azimuths; a mesh is
  3D, so there the test reads its horizontal sections directly (`section_symmetry`), a far
  stronger signal (true shapes: 0.07 against 0.0001, where silhouette areas give 0.0068 at best);
- colour classification: the named colour nearest to the mean albedo inside the silhouette.
The initial density blob already *is* a sphere, so every prompt is also scored before training
(`blob_*`): a method must beat that starting point, not merely keep it.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

from text23d.builtin.data import COLOURS, SCALE_RANGE, SHAPES, held_out_pairs, render_primitives, render_silhouettes

EVAL_SCALES = np.linspace(SCALE_RANGE[0] * 0.85, SCALE_RANGE[1] * 1.15, 7)
CORNERED = ("cube", "pyramid")  # 90°-periodic about the vertical axis; the other shapes are round
ROTATIONS = (0.0, 15.0, 30.0, 45.0, 60.0, 75.0)  # a cornered shape repeats every 90°
SYMMETRY_VIEWS = 16


def default_pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(held-out pairs, as many seen pairs): one seen pair per shape, its colour 4 steps away
    from that shape's held-out colour, so seen and held-out use different colours."""
    colours = list(COLOURS)
    seen = [(shape, colours[(3 * i + 5) % len(colours)]) for i, shape in enumerate(SHAPES)]
    return held_out_pairs(), seen


def caption_of(shape: str, colour: str) -> str:
    return f"a {colour} {shape}"


def _orbit(key: tuple, n_views: int):
    from text23d.cameras.sampler import RandomCameraSampler

    elevation, distance, fovy = key
    return RandomCameraSampler(eval_elevation=elevation, eval_distance=distance, eval_fovy=fovy).orbit(n_views)


def _cam_key(sampler) -> tuple:
    return (sampler.eval_elevation, sampler.eval_distance, sampler.eval_fovy)


@functools.lru_cache(maxsize=4)
def _truth_masks(cam_key: tuple, n_views: int, resolution: int) -> dict:
    """Ground-truth silhouettes {(shape, scale, rotation): (V, H, W) bool} for the orbit."""
    cams = _orbit(cam_key, n_views)
    return {(s, float(k), r): render_silhouettes([s] * n_views, cams, float(k), r, resolution, supersample=1).numpy()
            for s in SHAPES for k in EVAL_SCALES for r in (ROTATIONS if s in CORNERED else (0.0,))}


def symmetry(masks: np.ndarray) -> float:
    """The 90°-periodic part of the silhouette area over a full turn (masks (16, H, W) from evenly
    spaced azimuths), relative to the mean area: ~0 for a body of revolution, clearly positive for
    a cube or pyramid whatever its rotation (the magnitude of a Fourier coefficient has no phase)."""
    area = masks.reshape(len(masks), -1).sum(1).astype(np.float64)
    k = np.arange(len(area))
    return float(np.abs((area * np.exp(-2j * np.pi * 4 * k / len(area))).sum()) / max(area.sum(), 1.0))


@functools.lru_cache(maxsize=4)
def symmetry_threshold(cam_key: tuple, resolution: int) -> float:
    """Halfway between the most cornered-looking round primitive and the least cornered-looking
    cube or pyramid (true shapes, the data's scales and rotations)."""
    cams = _orbit(cam_key, SYMMETRY_VIEWS)
    values = {}
    for s in SHAPES:
        for k in (SCALE_RANGE[0], SCALE_RANGE[1]):
            for r in (ROTATIONS if s in CORNERED else (0.0,)):
                masks = render_silhouettes([s] * SYMMETRY_VIEWS, cams, k, r, resolution, supersample=1).numpy()
                values.setdefault(s in CORNERED, []).append(symmetry(masks))
    return 0.5 * (max(values[False]) + min(values[True]))


# Fractions of a body's height from its base, over its whole height: a cube is square at every
# height, so one square only in its lower half (a box that rounds off above) is not a cube.
SECTION_HEIGHTS = (0.15, 0.3, 0.5, 0.7, 0.85)
SECTION_BINS = 72  # angular bins of the outline's radius: 5°


def _outline(section, spacing: float = 0.002) -> np.ndarray:
    """Points every `spacing` along all closed curves of a planar section (Path3D), (P, 2)."""
    points = []
    for curve in section.discrete:
        a, b = curve[:-1, :2], curve[1:, :2]
        n = np.maximum((np.linalg.norm(b - a, axis=1) / spacing).astype(int), 1)  # points per segment
        seg = np.repeat(np.arange(len(a)), n)
        t = np.arange(len(seg)) - np.repeat(np.cumsum(n) - n, n)  # 0..n-1 within each segment
        points.append(a[seg] + (b - a)[seg] * (t / n[seg])[:, None])
    return np.concatenate(points) if points else np.zeros((0, 2))


def section_symmetry(mesh) -> float:
    """How cornered a mesh is about the vertical axis, from its horizontal sections.

    At 15 %, 30 %, 50 %, 70 % and 85 % of its height (a pyramid's section at 85 % is still 15 % of
    its base), the outline's radius around its centre is read in 72 angular bins (the largest
    radius per bin, so a torus's hole does not count) and the 90°-periodic Fourier coefficient is
    taken relative to the mean radius. A square section gives ~0.075 whatever its turn, a circle
    ~0. The result is the median over the five heights: three of them must be cornered, so one odd
    section (lumps at a box's bottom corners, a floater) does not decide, and a body that is square
    only in its lower half is round."""
    bottom, top = mesh.bounds[:, 2]
    values = []
    for fraction in SECTION_HEIGHTS:
        section = mesh.section(plane_origin=[0.0, 0.0, bottom + fraction * (top - bottom)],
                               plane_normal=[0.0, 0.0, 1.0])
        points = _outline(section) if section is not None else np.zeros((0, 2))
        if len(points) < SECTION_BINS:
            continue
        d = points - points.mean(0)
        angle, radius = np.arctan2(d[:, 1], d[:, 0]), np.hypot(d[:, 0], d[:, 1])
        bins = np.floor((angle + np.pi) / (2 * np.pi) * SECTION_BINS).astype(int) % SECTION_BINS
        profile = np.full(SECTION_BINS, np.nan)
        np.fmax.at(profile, bins, radius)
        profile = np.where(np.isnan(profile), np.nanmean(profile), profile)
        k = np.arange(SECTION_BINS)
        values.append(abs((profile * np.exp(-2j * np.pi * 4 * k / SECTION_BINS)).sum()) / profile.sum())
    return float(np.median(values)) if values else 0.0


def primitive_mesh(shape: str, scale: float, rotation: float = 0.0, resolution: int = 96):
    """A true primitive of the data world as a marching-cubes mesh (world frame, z up)."""
    import mcubes
    import trimesh

    from text23d.builtin.data import SDFS

    g = np.linspace(-1.0, 1.0, resolution)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    a = np.deg2rad(-rotation)  # into the object frame, as the data renderer does
    ox, oy = np.cos(a) * x - np.sin(a) * y, np.sin(a) * x + np.cos(a) * y
    coords = (torch.from_numpy(np.ascontiguousarray(c / scale, dtype=np.float32)).ravel() for c in (ox, oy, z))
    sdf = SDFS[shape](*coords).numpy().reshape(x.shape)
    verts, faces = mcubes.marching_cubes(-sdf, 0.0)
    return trimesh.Trimesh(verts / (resolution - 1) * 2.0 - 1.0, faces, process=False)


@functools.lru_cache(maxsize=1)
def section_symmetry_threshold() -> float:
    """Halfway between the most cornered-looking round primitive and the least cornered-looking
    cube or pyramid (true shapes as meshes, the data's extreme scales, turns every 15°), the same
    rule as `symmetry_threshold`."""
    values = {}
    for s in SHAPES:
        for k in SCALE_RANGE:
            for r in (ROTATIONS if s in CORNERED else (0.0,)):
                values.setdefault(s in CORNERED, []).append(section_symmetry(primitive_mesh(s, k, r)))
    return 0.5 * (max(values[False]) + min(values[True]))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def classify(opacity: np.ndarray, rgb: np.ndarray, sym: float, threshold: float, shape: str, colour: str,
             sampler) -> dict:
    """Score one asset from its orbit views: opacity (8, H, W) and rgb (8, H, W, 3) at the 8
    evaluation azimuths, and its symmetry measure with the threshold above which it has corners."""
    n_views, resolution = opacity.shape[0], opacity.shape[1]
    mask = opacity > 0.5
    truth = _truth_masks(_cam_key(sampler), n_views, resolution)
    fits = {}
    for (s, k, r), m in truth.items():
        iou = float(np.mean([_iou(mask[v], m[v]) for v in range(n_views)]))
        if iou > fits.get(s, (-1.0,))[0]:
            fits[s] = (iou, k, r)
    allowed = CORNERED if sym >= threshold else tuple(s for s in SHAPES if s not in CORNERED)
    predicted_shape = max(allowed, key=lambda s: fits[s][0])
    solid = opacity > 0.9 if (opacity > 0.9).sum() >= 8 else mask
    albedo = rgb[solid].mean(0) if solid.any() else np.ones(3)
    names = list(COLOURS)
    predicted_colour = names[int(np.argmin([np.linalg.norm(albedo - np.array(COLOURS[c])) for c in names]))]
    return {"shape": shape, "colour": colour, "iou": round(fits[shape][0], 4), "best_scale": fits[shape][1],
            "best_rotation": fits[shape][2], "predicted_shape": predicted_shape,
            "shape_correct": predicted_shape == shape, "predicted_colour": predicted_colour,
            "colour_correct": predicted_colour == colour, "mean_albedo": [round(float(x), 3) for x in albedo],
            "symmetry": round(sym, 4), "symmetry_threshold": round(threshold, 4),
            "iou_by_shape": {s: round(v[0], 4) for s, v in fits.items()}}


@torch.no_grad()
def score_asset(system, shape: str, colour: str, n_views: int = 8, resolution: int = 64, particle: int = 0) -> dict:
    """Metrics of one asset (a particle of a trained or initial system) from its volume renders."""
    sampler = system.camera_sampler
    views = system.render_views(sampler.orbit(n_views), resolution, shading="albedo", particle=particle)
    turn = system.render_views(sampler.orbit(SYMMETRY_VIEWS), resolution, shading="albedo", particle=particle)
    opacity = np.stack([v["opacity"][..., 0] for v in views])  # (V, H, W)
    result = classify(opacity, np.stack([v["rgb"] for v in views]), *_silhouette_symmetry(turn, sampler),
                      shape, colour, sampler)
    return {**result, "views": views}


def load_exported_mesh(path):
    """An exported GLB (y-up, as glTF wants) back in the world frame (z-up), or an OBJ as it is."""
    import trimesh

    from text23d.export.mesh import Z_UP_TO_Y_UP

    mesh = trimesh.load(str(path), force="mesh", process=False)
    if str(path).endswith(".glb"):
        mesh.apply_transform(np.linalg.inv(Z_UP_TO_Y_UP))
    return mesh


@torch.no_grad()
def mesh_views(mesh, cams, resolution: int) -> list[dict]:
    """The mesh rasterised with its texture or vertex colours (no shading) on white: rgb (H, W, 3) and
    opacity (H, W, 3) per view, like `system.render_views` returns them."""
    from text23d.renderers.rasterize import barycentrics, interpolate, rasterize

    verts = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long)
    face_id = rasterize(verts, faces, cams, resolution, resolution)
    bary = barycentrics(verts, faces, face_id, cams)
    texture = _texture_of(mesh)
    if texture is None:
        colors = torch.as_tensor(np.asarray(mesh.visual.vertex_colors)[:, :3], dtype=torch.float32) / 255.0
        rgb = interpolate(colors, faces, face_id, bary)
    else:  # a textured file: each pixel's UV, then the texture there (bilinear)
        uv = interpolate(torch.as_tensor(np.asarray(mesh.visual.uv), dtype=torch.float32), faces, face_id, bary)
        rgb = sample_texture(texture, uv)
    covered = (face_id >= 0)[..., None].float()
    rgb = rgb * covered + (1 - covered)  # white background
    return [{"rgb": rgb[i].numpy(), "opacity": covered[i].expand(-1, -1, 3).numpy()} for i in range(len(cams))]


def _texture_of(mesh) -> torch.Tensor | None:
    """The base-colour texture (H, W, 3) in [0, 1] of a textured mesh, else None."""
    visual = mesh.visual
    if getattr(visual, "kind", None) != "texture" or getattr(visual, "uv", None) is None:
        return None
    material = visual.material
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is None:
        return None
    return torch.as_tensor(np.asarray(image.convert("RGB")), dtype=torch.float32) / 255.0


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear look-up of texture (H, W, 3) at uv (..., 2) (OBJ convention: v up, image row 0 at
    v = 1), clamped at the border."""
    h, w = texture.shape[:2]
    x = (uv[..., 0] * w - 0.5).clamp(0, w - 1)
    y = ((1 - uv[..., 1]) * h - 0.5).clamp(0, h - 1)
    x0, y0 = x.floor().long(), y.floor().long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = texture[y0, x0] * (1 - fx) + texture[y0, x1] * fx
    bottom = texture[y1, x0] * (1 - fx) + texture[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def score_mesh(path, shape: str, colour: str, sampler, n_views: int = 8, resolution: int = 64) -> dict:
    """Metrics of an exported mesh file, judged exactly as `score_asset` judges renders."""
    mesh = load_exported_mesh(path)
    views = mesh_views(mesh, sampler.orbit(n_views), resolution)
    turn = mesh_views(mesh, sampler.orbit(SYMMETRY_VIEWS), resolution)
    silhouette, silhouette_threshold = _silhouette_symmetry(turn, sampler)
    result = classify(np.stack([v["opacity"][..., 0] for v in views]), np.stack([v["rgb"] for v in views]),
                      section_symmetry(mesh), section_symmetry_threshold(), shape, colour, sampler)
    return {**result, "views": views, "faces": len(mesh.faces), "silhouette_symmetry": round(silhouette, 4),
            "silhouette_symmetry_threshold": round(silhouette_threshold, 4)}


def _silhouette_symmetry(turn: list[dict], sampler) -> tuple[float, float]:
    masks = np.stack([v["opacity"][..., 0] > 0.5 for v in turn])
    return symmetry(masks), symmetry_threshold(_cam_key(sampler), masks.shape[1])


def _erode(mask: np.ndarray) -> np.ndarray:
    """A boolean image less its outline (pixels with a 4-neighbour outside the mask)."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def colour_error(render_views: list[dict], mesh_views_: list[dict]) -> float:
    """Mean absolute RGB difference (0-1) between the volume renders and the rendered mesh, over the
    pixels both cover, less the one-pixel outline where either blends with the background: how far
    the exported file's colours are from what the renders showed."""
    diffs = []
    for r, m in zip(render_views, mesh_views_):
        both = _erode((r["opacity"][..., 0] > 0.5) & (m["opacity"][..., 0] > 0.5))
        if both.any():
            diffs.append(np.abs(r["rgb"][both] - m["rgb"][both]).mean())
    return round(float(np.mean(diffs)), 4) if diffs else float("nan")


def colour_tolerance() -> float:
    """The largest colour error (`colour_error`) an exported mesh may have: half the smallest mean
    |ΔRGB| between two named colours (orange and yellow: 0.15), so a mesh within it of its renders is
    nearer to them than any neighbouring named colour is. Taken from the colour table alone, never
    from the assets it judges."""
    rgb = [np.array(c) for c in COLOURS.values()]
    return 0.5 * min(float(np.abs(a - b).mean()) for a, b in itertools.combinations(rgb, 2))


def export_agreement(system, path, n_views: int = 8, resolution: int = 64, particle: int = 0) -> dict:
    """How well an exported mesh file shows what the system renders, from the evaluation orbit:
    the silhouette IoU between the file (rasterised) and the renders, the floor it must reach (the
    IoU of the renders' silhouettes with themselves less their one-pixel outline: a mesh may differ
    from the renders along the outline, not more), and the colour error (`colour_error`)."""
    cams = system.camera_sampler.orbit(n_views)
    renders = system.render_views(cams, resolution, shading="albedo", particle=particle)
    mesh = mesh_views(load_exported_mesh(path), cams, resolution)
    a = [r["opacity"][..., 0] > 0.5 for r in renders]
    b = [m["opacity"][..., 0] > 0.5 for m in mesh]
    iou = float(np.mean([_iou(x, y) for x, y in zip(a, b)]))
    floor = float(np.mean([_erode(x).sum() / max(x.sum(), 1) for x in a]))
    return {"iou": round(iou, 4), "iou_floor": round(floor, 4), "colour_error": colour_error(renders, mesh)}


def strip(system_views: list[dict], shape: str, colour: str, scale: float, rotation: float, sampler,
          mesh_views_: list[dict] | None = None) -> np.ndarray:
    """Rows: generated renders, the exported mesh (if given), the ground truth; uint8 (R·H, V·W, 3)."""
    n = len(system_views)
    res = system_views[0]["rgb"].shape[0]
    truth = render_primitives([shape] * n, torch.tensor([COLOURS[colour]] * n), sampler.orbit(n), scale, rotation, res)
    rows = [np.concatenate([v["rgb"] for v in system_views], axis=1)]
    if mesh_views_ is not None:
        rows.append(np.concatenate([v["rgb"] for v in mesh_views_], axis=1))
    rows.append(np.concatenate(list(truth.numpy()), axis=1))
    return (np.concatenate(rows, axis=0).clip(0, 1) * 255).round().astype(np.uint8)


def diversity(view_sets: list[list[dict]]) -> dict:
    """How different several assets of one prompt are (the particles of a VSD run, or runs with
    different seeds), from their evaluation views: the mean pairwise silhouette IoU (1: the same
    shape; lower is more diverse) and the mean pairwise absolute RGB difference (0: identical)."""
    if len(view_sets) < 2:
        raise ValueError(f"diversity needs at least 2 assets, got {len(view_sets)}")
    masks = [np.stack([v["opacity"][..., 0] > 0.5 for v in views]) for views in view_sets]
    rgbs = [np.stack([v["rgb"] for v in views]) for views in view_sets]
    pairs = list(itertools.combinations(range(len(view_sets)), 2))
    ious = [np.mean([_iou(masks[a][v], masks[b][v]) for v in range(len(masks[a]))]) for a, b in pairs]
    l1s = [float(np.abs(rgbs[a] - rgbs[b]).mean()) for a, b in pairs]
    return {"n": len(view_sets), "pairwise_iou": round(float(np.mean(ious)), 4),
            "min_pairwise_iou": round(float(np.min(ious)), 4), "pairwise_rgb_l1": round(float(np.mean(l1s)), 4)}


def summarise(results: list[dict]) -> dict:
    """Accuracies and means over a list of per-asset results (renders, and the mesh when judged)."""
    if not results:
        return {}
    mean = lambda key: round(float(np.nanmean([r[key] for r in results])), 4)  # noqa: E731
    out = {"n": len(results), "shape_accuracy": mean("shape_correct"), "colour_accuracy": mean("colour_correct"),
           "mean_iou": mean("iou")}
    if "mesh_shape_correct" in results[0]:
        out["both_accuracy"] = round(float(np.mean([r["shape_correct"] and r["colour_correct"] for r in results])), 4)
        out.update({"mesh_shape_accuracy": mean("mesh_shape_correct"), "mesh_colour_accuracy": mean("mesh_colour_correct"),
                    "mesh_both_accuracy": round(float(np.mean([r["mesh_shape_correct"] and r["mesh_colour_correct"]
                                                                for r in results])), 4),
                    "mean_mesh_iou": mean("mesh_iou"), "mean_mesh_colour_error": mean("mesh_colour_error")})
    for key in ("blob_iou", "wall_time_s"):
        if key in results[0]:
            out[f"mean_{key}"] = mean(key)
    return out
