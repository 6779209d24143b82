"""Did the pipeline generate what was asked? Scoring assets made on the built-in prior.

For "a {colour} {shape}", the generated asset is rendered from 8 azimuths (the evaluation orbit)
and compared with the true primitive rendered by the data renderer from the same cameras:
- silhouette IoU with the asked shape, best over the data's range of scales (size is free);
- shape classification: the primitive whose silhouettes fit best;
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


def default_pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(held-out pairs, as many seen pairs): one seen pair per shape, its colour 4 steps away
    from that shape's held-out colour, so seen and held-out use different colours."""
    colours = list(COLOURS)
    seen = [(shape, colours[(3 * i + 5) % len(colours)]) for i, shape in enumerate(SHAPES)]
    return held_out_pairs(), seen


def caption_of(shape: str, colour: str) -> str:
    return f"a {colour} {shape}"


@functools.lru_cache(maxsize=4)
def _truth_masks(cam_key: tuple, resolution: int) -> dict:
    """Ground-truth silhouettes {(shape, scale): (V, H, W) bool} for the orbit in cam_key."""
    from text23d.cameras.sampler import RandomCameraSampler

    n_views, elevation, distance, fovy = cam_key
    cams = RandomCameraSampler(eval_elevation=elevation, eval_distance=distance, eval_fovy=fovy).orbit(n_views)
    return {(s, float(k)): render_silhouettes([s] * n_views, cams, float(k), 0.0, resolution, supersample=1).numpy()
            for s in SHAPES for k in EVAL_SCALES}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@torch.no_grad()
def score_asset(system, shape: str, colour: str, n_views: int = 8, resolution: int = 64, particle: int = 0) -> dict:
    """Metrics of one asset (a particle of a trained or initial system) against "a {colour} {shape}"."""
    sampler = system.camera_sampler
    views = system.render_views(sampler.orbit(n_views), resolution, shading="albedo", particle=particle)
    opacity = np.stack([v["opacity"][..., 0] for v in views])  # (V, H, W)
    mask = opacity > 0.5
    truth = _truth_masks((n_views, sampler.eval_elevation, sampler.eval_distance, sampler.eval_fovy), resolution)
    fits = {s: max(((np.mean([_iou(mask[v], truth[(s, float(k))][v]) for v in range(n_views)]), float(k))
                    for k in EVAL_SCALES)) for s in SHAPES}
    predicted_shape = max(fits, key=lambda s: fits[s][0])
    solid = opacity > 0.9 if (opacity > 0.9).sum() >= 8 else mask
    rgb = np.stack([v["rgb"] for v in views])
    albedo = rgb[solid].mean(0) if solid.any() else np.ones(3)
    names = list(COLOURS)
    predicted_colour = names[int(np.argmin([np.linalg.norm(albedo - np.array(COLOURS[c])) for c in names]))]
    return {"shape": shape, "colour": colour, "iou": round(fits[shape][0], 4), "best_scale": fits[shape][1],
            "predicted_shape": predicted_shape, "shape_correct": predicted_shape == shape,
            "predicted_colour": predicted_colour, "colour_correct": predicted_colour == colour,
            "mean_albedo": [round(float(x), 3) for x in albedo],
            "iou_by_shape": {s: round(v[0], 4) for s, v in fits.items()}, "views": views}


def strip(system_views: list[dict], shape: str, colour: str, scale: float, sampler) -> np.ndarray:
    """Generated views (top) over the ground truth (bottom), uint8 (2H, V·W, 3)."""
    n = len(system_views)
    res = system_views[0]["rgb"].shape[0]
    truth = render_primitives([shape] * n, torch.tensor([COLOURS[colour]] * n), sampler.orbit(n), scale, 0.0, res)
    top = np.concatenate([v["rgb"] for v in system_views], axis=1)
    bottom = np.concatenate(list(truth.numpy()), axis=1)
    return (np.concatenate([top, bottom], axis=0).clip(0, 1) * 255).round().astype(np.uint8)


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
    """Accuracies and mean IoU / wall time over a list of per-asset results."""
    if not results:
        return {}
    mean = lambda key: round(float(np.mean([r[key] for r in results])), 4)  # noqa: E731
    out = {"n": len(results), "shape_accuracy": mean("shape_correct"), "colour_accuracy": mean("colour_correct"),
           "mean_iou": mean("iou")}
    for key in ("blob_iou", "wall_time_s"):
        if key in results[0]:
            out[f"mean_{key}"] = mean(key)
    return out
