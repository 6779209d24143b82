"""What a finished run leaves for people: turntable video, image grid, meshes (per particle)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from text23d.config import export_formats
from text23d.export.mesh import composited_colors, extract_mesh, save_mesh, to_rgb8
from text23d.export.texture import save_textured, textured_mesh
from text23d.export.threshold import auto_threshold
from text23d.export.video import make_grid, save_image, save_video, to_uint8

log = logging.getLogger("text23d")


def export_views(system, settings, out_dir: Path, step: int) -> dict:
    """The turntable and views of the stage a system is in, without a mesh: what a stage that
    hands over to the next leaves behind."""
    return export_artifacts(system, settings, out_dir, step, mesh=False)["artifacts"]


def export_artifacts(system, settings, out_dir: Path, step: int, mesh: bool = True,
                     save_dir: Path | None = None) -> dict:
    """Video + grid of the evaluation orbit and the mesh of every particle, under `out_dir/save/`.
    Needs only the 3D representation (no diffusion model): the same from a live run or a checkpoint.
    One particle: save/it<N>-test.{mp4,png}, save/it<N>-export/model.{obj,glb}. Several: the same
    with a -particle<i> / particle<i> tag each, and save/it<N>-particles.png side by side. A system
    of several stages prefixes each name with the stage that made it (save/fine-it<N>-test.mp4).
    `settings`: the export block (ExportConfig), handed in: export never reads the system's config.
    `save_dir`: another folder for all of them (a re-export's exports/<n>/)."""
    save = Path(save_dir) if save_dir is not None else Path(out_dir) / "save"
    system.eval()
    n = len(system.particles)
    stage = system.stage_tag()
    artifacts, metrics, rows = {}, {}, []
    for i in range(n):
        tag = "" if n == 1 else f"-particle{i}"
        a, m, views = _export_particle(system, settings, i, save, step, tag, stage, mesh)
        rows.append([to_uint8(v["rgb"]) for v in views])
        if n == 1:
            artifacts, metrics = a, m
        else:
            artifacts.setdefault("particles", []).append(a)
            metrics.update({f"particle{i}/{k}": v for k, v in m.items()})
    if n > 1:
        grid = make_grid([t for row in rows for t in row], ncol=len(rows[0]),
                         labels=[f"particle {i}" if j == 0 else "" for i, row in enumerate(rows) for j in range(len(row))])
        artifacts["grid"] = save_image(grid, save / f"{stage}it{step:06d}-particles.png")
        artifacts.update({k: v for k, v in artifacts["particles"][0].items() if k != "grid"})
    return {"artifacts": artifacts, "metrics": metrics}


def _export_particle(system, ex, i: int, save: Path, step: int, tag: str, stage: str,
                     mesh: bool) -> tuple[dict, dict, list]:
    particle, radius = system.particles[i], system.renderer.radius
    video = ex.get("video", True)  # false: no turntable (a machine without ffmpeg), the 8-view grid still
    views = system.render_views(system.camera_sampler.orbit(ex.video_views if video else 8), ex.video_resolution,
                                particle=i)
    artifacts = {}
    if video:
        frames = [to_uint8(np.concatenate([v["rgb"], v["normal"]], axis=1)) for v in views]  # rgb | normals
        artifacts["video"] = save_video(frames, save / f"{stage}it{step:06d}{tag}-test.mp4", fps=ex.fps)
    picks = views[:: max(1, len(views) // 8)][:8]
    artifacts["grid"] = save_image(make_grid([to_uint8(v["rgb"]) for v in picks], ncol=8),
                                   save / f"{stage}it{step:06d}{tag}-test.png")
    if not mesh:
        return {k: str(v) for k, v in artifacts.items()}, {}, picks
    if hasattr(particle.geometry, "mesh"):  # a mesh geometry exports its own surface: no level to choose
        return _export_own_mesh(system, ex, particle, save, step, tag, stage, artifacts, picks, i)
    threshold, metrics = ex.isosurface_threshold, {}
    if threshold == "auto":
        threshold, iou = auto_threshold(particle.geometry, system.camera_sampler.orbit(8), radius)
        metrics["mesh_silhouette_iou"] = iou
        log.info("isosurface threshold %.3g chosen automatically (silhouette IoU %.3f vs renders)", threshold, iou)
    geometry = particle.geometry
    mesh = extract_mesh(geometry.density, None, radius, ex.resolution, float(threshold))
    metrics["isosurface_threshold"] = float(threshold)
    return _save_particle_mesh(system, ex, mesh, rendered_colour(geometry, radius, ex.resolution), save, step, tag,
                               stage, artifacts, metrics, picks, i)


def rendered_colour(geometry, radius: float, resolution: int):
    """colour(points, normals) of a density geometry's marching-cubes mesh (`resolution` a side): what
    the renders show there, not the albedo of its outer haze; composited from two voxels outside."""
    start = 2 * 2 * radius / (resolution - 1)
    return lambda points, normals: composited_colors(geometry.density, geometry.albedo, points, normals, radius, start)


def _save_particle_mesh(system, ex, mesh, colour, save, step, tag, stage, artifacts, metrics, picks, i):
    """Write one particle's mesh: textured (UV atlas, baked albedo) or with vertex colours."""
    stem = "model" if not tag else f"particle{i}"
    folder = save / f"{stage}it{step:06d}-export"
    device = _device_of(system)
    if ex.get("texture", False):
        mesh, info = textured_mesh(mesh, colour, ex.texture_size, ex.get("target_faces"), device)
        paths = save_textured(mesh, str(folder), stem, export_formats(ex))
        metrics.update(info)
    else:
        verts = torch.tensor(np.asarray(mesh.vertices), dtype=torch.float32, device=device)
        normals = torch.tensor(np.asarray(mesh.vertex_normals), dtype=torch.float32, device=device)
        rgba = np.full((len(verts), 4), 255, np.uint8)
        with torch.no_grad():
            rgba[:, :3] = to_rgb8(torch.cat([colour(v, n) for v, n in zip(verts.split(65536), normals.split(65536))])
                                  .cpu().numpy())
        mesh.visual.vertex_colors = rgba
        paths = save_mesh(mesh, str(folder), stem, export_formats(ex))
        metrics.update({"mesh_vertices": len(mesh.vertices), "mesh_faces": len(mesh.faces)})
    artifacts.update({f"mesh_{fmt}": p for fmt, p in paths.items()})
    return {k: str(v) for k, v in artifacts.items()}, metrics, picks


def _device_of(system) -> torch.device:
    return next(iter(system.parameters()), torch.empty(0)).device


@torch.no_grad()
def _export_own_mesh(system, ex, particle, save, step, tag, stage, artifacts, picks, i):
    """A mesh geometry (DMTet): its marching-tetrahedra surface, coloured by its albedo field on
    the surface itself, which is what the rasteriser shows."""
    import trimesh

    verts, faces = particle.geometry.mesh()
    mesh = trimesh.Trimesh(verts.cpu().numpy(), faces.cpu().numpy(), process=False)
    return _save_particle_mesh(system, ex, mesh, lambda points, normals: particle.geometry.albedo(points), save,
                               step, tag, stage, artifacts, {}, picks, i)
