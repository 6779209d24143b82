"""Textured export's speed by stage, and how close the baked texture is to the renders. JSON out.

    python scripts/bench_texture.py texture-50k [texture-10k ...]

Each configuration unwraps (xatlas) and bakes a 1024² texture for a marching-cubes mesh of about
that many faces, decimated first where it says so, as `export.texture` does. The asset is the
built-in prior's geometry (a 64³ dense grid) holding a soft ball with ripples, so the surface has
detail for the atlas to cut, and a colour pattern: its colours are composited through the field
like any density asset's (`rendered_colour`). The colour error compares the textured mesh,
rasterised, with the volume renders from the evaluation orbit (mean |ΔRGB| in 0-255 over the pixels
both cover, less the outline: `colour_error` of text23d/builtin/evaluate.py).
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: faces of the mesh, and export.target_faces (None: no decimation); bench.py's rows of the same names.
TEXTURE_CONFIGS = {
    "texture-10k": {"faces": 10_000, "target_faces": None},
    "texture-50k": {"faces": 50_000, "target_faces": None},
    "texture-200k": {"faces": 200_000, "target_faces": None},
    "texture-200k-to-100k": {"faces": 200_000, "target_faces": 100_000},
    "texture-200k-decimated": {"faces": 200_000, "target_faces": 50_000},  # export.target_faces's default
}
SIZE = 1024
RADIUS = 1.0


def rippled_ball():
    """A 64³ dense grid: density softplus(50·(1 - r/ρ)) with ρ = 0.5 + 0.03·sin(12x)·cos(12y), whose
    level softplus(0) is the rippled sphere r = ρ; inside, the density rises by 100 per unit, about as
    steeply as in the built-in prior's assets (a trained cone's: ~140), so rays see some way in. Albedo:
    a colour pattern that changes along the surface and with depth."""
    import torch

    from text23d.geometry.grid import DenseGrid

    grid = DenseGrid(resolution=64, radius=RADIUS, blob_density=0.0)
    axis = torch.linspace(-RADIUS, RADIUS, 64)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")  # flat index (z·R + y)·R + x, as the grid's
    p = torch.stack([x, y, z], -1).reshape(-1, 3)
    rho = 0.5 + 0.03 * torch.sin(12 * p[:, 0]) * torch.cos(12 * p[:, 1])
    grid.density_grid.data = 50 * (1 - p.norm(dim=-1) / rho)
    grid.albedo_grid.data = 2 * torch.sin(6 * p + torch.tensor([0.0, 2.1, 4.2]))
    return grid


def marching_cubes_mesh(geometry, faces: int):
    """The level softplus(0) of the field on a grid fine enough for about `faces` faces (a sphere of
    radius 0.5 gives ~1.2·resolution² faces), decimated to `faces`; and that grid's resolution."""
    import math

    from text23d.export.mesh import extract_mesh
    from text23d.export.texture import decimate

    resolution = int((faces / 1.2) ** 0.5) + 8
    return decimate(extract_mesh(geometry.density, None, RADIUS, resolution, math.log(2)), faces), resolution


def colour_error_255(geometry, mesh) -> float:
    """The textured mesh against the field's volume renders, 8 views of the evaluation orbit at 64²."""
    import torch

    from text23d.builtin.evaluate import colour_error, mesh_views
    from text23d.cameras.sampler import RandomCameraSampler
    from text23d.renderers.background import Background
    from text23d.renderers.volume import VolumeRenderer

    cams = RandomCameraSampler().orbit(8)
    with torch.no_grad():
        out = VolumeRenderer(radius=RADIUS, num_samples=128)(geometry, Background("solid"), cams, 64, 64)
    renders = [{"rgb": out["comp_rgb"][i].numpy(), "opacity": out["opacity"][i].expand(-1, -1, 3).numpy()}
               for i in range(len(cams))]
    return round(255 * colour_error(renders, mesh_views(mesh, cams, 64)), 2)


def bench_texture(name: str) -> dict:
    """Seconds per stage (decimate, unwrap, rasterise texels to surface points, bake = the colour field
    at every covered texel, pad), faces, coverage, peak memory and colour error of one configuration."""
    import torch

    from text23d.export.artifacts import rendered_colour
    from text23d.export.texture import textured_mesh

    config = TEXTURE_CONFIGS[name]
    geometry = rippled_ball()
    mesh, resolution = marching_cubes_mesh(geometry, config["faces"])
    t = time.perf_counter()
    out, info = textured_mesh(mesh, rendered_colour(geometry, RADIUS, resolution), SIZE, config["target_faces"])
    total = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the check's renders
    return {"config": name, "device": "cpu", "threads": torch.get_num_threads(), "faces_in": len(mesh.faces),
            "faces_out": info["mesh_faces"], "texture_size": SIZE, "decimate_s": info["decimate_s"],
            "unwrap_s": info["unwrap_s"], "rasterize_s": info["rasterize_s"], "bake_s": info["bake_s"],
            "pad_s": info["pad_s"], "total_s": round(total, 3), "coverage": info["texture_coverage"],
            "colour_error_255": colour_error_255(geometry, out), "peak_cpu_rss_mb": round(peak_mb, 1)}


if __name__ == "__main__":
    for arg in sys.argv[1:] or TEXTURE_CONFIGS:
        print(json.dumps(bench_texture(arg)), flush=True)
