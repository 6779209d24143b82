"""What a finished run leaves for people: turntable video, image grid, meshes."""
from __future__ import annotations

import logging
from pathlib import Path

from text23d.config import export_formats
from text23d.export.mesh import extract_mesh, save_mesh
from text23d.export.threshold import auto_threshold
from text23d.export.video import make_grid, save_image, save_video, to_uint8

log = logging.getLogger("text23d")


def export_artifacts(system, out_dir: Path, step: int) -> dict:
    """Video + grid of the evaluation orbit and the mesh, under `out_dir/save/`. Needs only the
    3D representation (no diffusion model), so it runs the same from a live run or a checkpoint."""
    ex, save = system.cfg.export, Path(out_dir) / "save"
    system.eval()
    views = system.render_views(system.camera_sampler.orbit(ex.video_views), ex.video_resolution)
    frames = [to_uint8(_side_by_side(v["rgb"], v["normal"])) for v in views]
    artifacts = {"video": save_video(frames, save / f"it{step:06d}-test.mp4", fps=ex.fps)}
    k = max(1, len(views) // 8)
    artifacts["grid"] = save_image(make_grid([to_uint8(v["rgb"]) for v in views[::k][:8]], ncol=8),
                                   save / f"it{step:06d}-test.png")
    geometry, radius = system.geometry, system.renderer.radius
    threshold = ex.isosurface_threshold
    metrics = {}
    if threshold == "auto":
        threshold, iou = auto_threshold(geometry, system.camera_sampler.orbit(8), radius)
        metrics["mesh_silhouette_iou"] = iou
        log.info("isosurface threshold %.3g chosen automatically (silhouette IoU %.3f vs renders)", threshold, iou)
    mesh = extract_mesh(geometry.density, geometry.albedo, radius, ex.resolution, float(threshold))
    paths = save_mesh(mesh, save / f"it{step:06d}-export", "model", export_formats(system.cfg))
    artifacts.update({f"mesh_{fmt}": p for fmt, p in paths.items()})
    metrics.update({"isosurface_threshold": float(threshold), "mesh_vertices": len(mesh.vertices),
                    "mesh_faces": len(mesh.faces)})
    return {"artifacts": {k: str(v) for k, v in artifacts.items()}, "metrics": metrics}


def _side_by_side(rgb, normal):
    import numpy as np
    return np.concatenate([rgb, normal], axis=1)
