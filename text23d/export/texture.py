"""Textured meshes: a UV atlas (xatlas), the albedo baked into it, seams padded, OBJ+MTL+PNG and GLB.

Baking rasterises the mesh in UV space: every texel centre inside a triangle of the atlas gets that
triangle's barycentrics, hence a point and a normal on the surface, and the colour there is asked of
the asset in one pass over the covered texels (`colour_fn(points, normals)`: what the renders show at
that point). Texels no triangle covers are then filled outwards from the charts (`pad`), so the seams'
bilinear and mip-map look-ups never mix in the background.
"""
from __future__ import annotations

import logging
import os
import re
import time
from typing import Callable

import numpy as np
import torch
import trimesh

from text23d.errors import Text23dError
from text23d.fileio import atomic_output

log = logging.getLogger("text23d")

PAD_TEXELS = 4  # xatlas's gap between charts; padding fills at least as far
# xatlas grows a chart face by face and, for every face, re-parameterises the whole chart and checks
# its boundary for self-intersections (on a grid of up to 512² cells): a chart of k faces costs ~k².
# Marching-cubes surfaces grow charts of thousands of faces: 50,000 faces took 17-30 s, 200,000 ~400 s.
# Capped at about this many faces' area: 3.4-4.5 s and 15 s, covering 5 % fewer texels on average
# (-13 % to +7 % over six meshes; 2,000 faces kept as many but took 7-10 s; docs/benchmarks.md).
FACES_PER_CHART = 1000


def decimate(mesh: trimesh.Trimesh, target_faces: int | None) -> trimesh.Trimesh:
    """The mesh with about `target_faces` faces (quadric decimation), or itself if it has fewer."""
    if not target_faces or len(mesh.faces) <= target_faces:
        return mesh
    import fast_simplification

    # float64, the simplifier's own precision: a float32 copy would round every vertex it keeps.
    verts, faces = fast_simplification.simplify(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int32),
                                                target_reduction=1.0 - target_faces / len(mesh.faces))
    return trimesh.Trimesh(verts, faces, process=False)


def unwrap(verts: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas charts of at most about FACES_PER_CHART faces' area, packed for a size² texture with
    PAD_TEXELS between charts.
    Returns (vmapping (V',) index of each new vertex in `verts`, faces (F, 3) into the new
    vertices, uv (V', 2) in [0, 1], v up as in OBJ). Vertices on seams are split: one UV each."""
    import xatlas

    if len(faces) == 0:
        raise Text23dError("The mesh has no faces to unwrap. Fix: check the exported mesh (export.texture=false "
                           "writes it with vertex colours).")
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(verts, np.float32), np.ascontiguousarray(faces, np.uint32))
    chart = xatlas.ChartOptions()
    chart.max_chart_area = float(surface_area(verts, faces) * min(1.0, FACES_PER_CHART / len(faces)))
    pack = xatlas.PackOptions()
    pack.padding, pack.resolution, pack.bilinear = PAD_TEXELS, int(size), True
    atlas.generate(chart, pack)
    vmapping, new_faces, uv = atlas[0]
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uv.astype(np.float32)


def surface_area(verts: np.ndarray, faces: np.ndarray) -> float:
    """The triangles' total area, in the vertices' units squared."""
    a, b, c = np.asarray(verts, np.float64)[faces].transpose(1, 0, 2)  # (F, 3) each
    return float(0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum())


def rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre of a size² image, and where.
    Image row 0 is v = 1 (the top of the PNG). Returns face id (S, S) (-1: none) and
    barycentrics (S, S, 3). Every texel centre in a triangle's bounding box is a candidate; its
    barycentrics are three affine functions of the centre, set up once per triangle."""
    px = torch.as_tensor(uv, dtype=torch.float64)[torch.as_tensor(faces)] * size  # (F, 3, 2) texel units
    px[..., 1] = size - px[..., 1]  # v up -> image rows down
    planes, valid = barycentric_planes(px)  # (F, 3, 3): bary_k = planes[f, k] · (x, y, 1)
    lo = torch.ceil(px.min(1).values - 0.5 - 1e-6).clamp(min=0).long()  # texels whose centres may be inside
    hi = torch.floor(px.max(1).values - 0.5 + 1e-6).clamp(max=size - 1).long()  # (1e-6: those on an edge too)
    w, h = (hi - lo + 1).clamp(min=0).unbind(-1)
    counts = w * h * valid
    starts = torch.cumsum(counts, 0) - counts
    face_id = torch.full((size * size,), -1, dtype=torch.long)
    bary = torch.zeros(size * size, 3, dtype=torch.float64)
    total = int(counts.sum())
    for begin in range(0, total, chunk):  # every (triangle, texel in its bbox) pair, in chunks
        k = torch.arange(begin, min(begin + chunk, total))
        f = torch.searchsorted(starts, k, right=True) - 1
        local = k - starts[f]
        x, y = lo[f, 0] + local % w[f], lo[f, 1] + local // w[f]
        centre = torch.stack([x + 0.5, y + 0.5, torch.ones(len(k), dtype=torch.float64)], -1)  # (K, 3)
        weights = torch.einsum("kij,kj->ki", planes[f], centre)
        inside = (weights >= -1e-9).all(-1)
        idx = (y * size + x)[inside]
        face_id[idx] = f[inside]
        bary[idx] = weights[inside]
    return face_id.view(size, size).numpy(), bary.view(size, size, 3).numpy()


def barycentric_planes(px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For triangles (F, 3, 2): coefficients (F, 3, 3) with barycentric k of a point (x, y) equal to
    c[k, 0]·x + c[k, 1]·y + c[k, 2], and which triangles have an area (F,) (the others cover nothing)."""
    a, b, c = px.unbind(1)
    e1, e2 = b - a, c - a
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    valid = area.abs() > 1e-12
    area = torch.where(valid, area, torch.ones_like(area))
    g1 = torch.stack([e2[:, 1], -e2[:, 0]], -1) / area[:, None]  # l1 = (p - a) × e2 / area
    g2 = torch.stack([-e1[:, 1], e1[:, 0]], -1) / area[:, None]  # l2 = e1 × (p - a) / area
    l1 = torch.cat([g1, -(g1 * a).sum(-1, keepdim=True)], -1)
    l2 = torch.cat([g2, -(g2 * a).sum(-1, keepdim=True)], -1)
    l0 = torch.tensor([0.0, 0.0, 1.0], dtype=px.dtype) - l1 - l2
    return torch.stack([l0, l1, l2], 1), valid


def pad(image: np.ndarray, covered: np.ndarray, texels: int) -> np.ndarray:
    """Grow every chart outwards by `texels` (each empty texel takes the mean of its covered
    8-neighbours, ring by ring); what is still empty takes the mean colour, so no look-up near a
    seam or at a coarse mip level reaches a background colour. A ring's colours are gathered for
    its own texels only (summing 8 shifted whole images a ring took 0.3-0.6 s at 1024²)."""
    h, w = covered.shape
    img = np.pad(image * covered[..., None], ((1, 1), (1, 1), (0, 0)))  # an empty border: no bounds checks
    cov = np.pad(covered, 1)
    inner, flat_img, flat_cov = cov[1:-1, 1:-1], img.reshape(-1, 3), cov.reshape(-1)  # views
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    shifts = [dy * (w + 2) + dx for dy, dx in offsets]  # the same in flat indices y·(w + 2) + x
    for _ in range(texels):
        near = np.zeros((h, w), bool)
        for dy, dx in offsets:
            near |= cov[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx]
        y, x = np.nonzero(near & ~inner)  # the next ring
        if not len(y):
            break
        ring = (y + 1) * (w + 2) + x + 1
        total = sum(np.take(flat_img, ring + s, axis=0) for s in shifts)
        count = sum(np.take(flat_cov, ring + s).astype(np.float32) for s in shifts)
        flat_img[ring], flat_cov[ring] = total / count[:, None], True
    out = img[1:-1, 1:-1]
    if inner.any():
        out[~inner] = out[inner].mean(0)
    return np.ascontiguousarray(out)


def bake(colour_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], verts: np.ndarray, normals: np.ndarray,
         faces: np.ndarray, uv: np.ndarray, size: int, device: torch.device | str = "cpu",
         chunk: int = 65536, times: dict | None = None) -> tuple[np.ndarray, float]:
    """The albedo texture (S, S, 3) float in [0, 1], padded, and the fraction of texels covered.
    `times`, if given, gets the seconds of each stage: rasterize_s (texel -> surface point), bake_s
    (the colour field at every covered texel) and pad_s."""
    t0 = time.perf_counter()
    face_id, bary = rasterize_uv(uv, faces, size)
    covered = face_id >= 0
    points, n = texel_points(verts, normals, faces, face_id[covered], bary[covered])
    t1 = time.perf_counter()
    image = np.ones((size, size, 3), np.float32)
    if len(points):
        image[covered] = np.clip(np.nan_to_num(ask_colours(colour_fn, points, n, device, chunk)), 0.0, 1.0)
    t2 = time.perf_counter()
    image = pad(image, covered, 2 * PAD_TEXELS)
    if times is not None:
        times.update(rasterize_s=round(t1 - t0, 3), bake_s=round(t2 - t1, 3),
                     pad_s=round(time.perf_counter() - t2, 3))
    return image, float(covered.mean())


def texel_points(verts: np.ndarray, normals: np.ndarray, faces: np.ndarray, face: np.ndarray,
                 bary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface points (T, 3) and unit normals (T, 3) (a zero normal stays zero), float32, of texels
    in triangles `face` (T,) at barycentrics `bary` (T, 3)."""
    corners = faces[face]  # (T, 3)
    points = np.einsum("tk,tkc->tc", bary, verts[corners]).astype(np.float32)
    n = np.einsum("tk,tkc->tc", bary, normals[corners])
    return points, (n / np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def ask_colours(colour_fn, points: np.ndarray, normals: np.ndarray, device, chunk: int) -> np.ndarray:
    """colour_fn over the points, `chunk` at a time on `device`: (T, 3) float32 on the CPU."""
    with torch.no_grad():
        return np.concatenate([colour_fn(torch.from_numpy(points[i:i + chunk]).to(device),
                                         torch.from_numpy(normals[i:i + chunk]).to(device)).float().cpu().numpy()
                               for i in range(0, len(points), chunk)])


def textured_mesh(mesh: trimesh.Trimesh, colour_fn, size: int, target_faces: int | None = None,
                  device: torch.device | str = "cpu") -> tuple[trimesh.Trimesh, dict]:
    """Decimate (optionally), unwrap and bake: a mesh whose TextureVisuals carry the UVs and a
    PBR material (base colour texture, metallic 0, roughness 1). Also returns timings and sizes."""
    from PIL import Image

    t0 = time.perf_counter()
    mesh = decimate(mesh, target_faces)
    t1 = time.perf_counter()
    vmapping, faces, uv = unwrap(np.asarray(mesh.vertices), np.asarray(mesh.faces), size)
    t2 = time.perf_counter()
    verts = np.asarray(mesh.vertices, np.float64)[vmapping]
    normals = np.asarray(mesh.vertex_normals, np.float64)[vmapping]  # the welded mesh's: smooth across seams
    times = {}
    image, coverage = bake(colour_fn, verts, normals, faces, uv, size, device, times=times)
    texture = Image.fromarray(np.round(image * 255).astype(np.uint8))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=texture, metallicFactor=0.0, roughnessFactor=1.0,
                                                   name="albedo")
    out = trimesh.Trimesh(verts, faces, visual=trimesh.visual.TextureVisuals(uv=uv, material=material), process=False)
    info = {"texture_size": size, "texture_coverage": round(coverage, 4), "mesh_faces": len(faces),
            "mesh_vertices": len(verts), "decimate_s": round(t1 - t0, 3), "unwrap_s": round(t2 - t1, 3), **times}
    log.info("textured mesh: %d faces, %d² texture (%.0f %% covered); unwrap %.1f s, rasterise %.1f s, bake %.1f s, "
             "pad %.1f s", len(faces), size, 100 * coverage, t2 - t1, times["rasterize_s"], times["bake_s"],
             times["pad_s"])
    return out, info


def save_textured(mesh: trimesh.Trimesh, out_dir: str, stem: str, formats) -> dict[str, str]:
    """`<stem>.obj` + `<stem>.mtl` + `<stem>.png` (map_Kd) and/or `<stem>.glb` (texture embedded,
    y-up), each file written atomically. Returns {format: path of the OBJ or GLB}."""
    from text23d.export.mesh import Z_UP_TO_Y_UP

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for fmt in dict.fromkeys(formats):
        path = os.path.abspath(os.path.join(out_dir, f"{stem}.{fmt}"))
        if fmt == "obj":
            text, files = trimesh.exchange.obj.export_obj(mesh, include_normals=True, include_color=False,
                                                         include_texture=True, return_texture=True,
                                                         mtl_name=f"{stem}.mtl")
            # trimesh names the image after the material; rename it after the mesh.
            png = next((name for name in files if name.lower().endswith(".png")), None)
            if png is None:
                raise Text23dError(f"trimesh wrote no texture image for {path}: files {sorted(files)}")
            # Our own MTL: trimesh's sets Kd 0.4, which viewers multiply into map_Kd (a darker asset).
            # The material the OBJ uses, as trimesh named it (a nameless one becomes e.g. "material_0").
            name = re.search(r"^usemtl (.+)$", text, re.M).group(1)
            files = {f"{stem}.png": files[png], f"{stem}.mtl": (
                f"newmtl {name}\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nNs 1\nillum 1\nmap_Kd {stem}.png\n").encode()}
            for name, data in files.items():
                with atomic_output(os.path.join(out_dir, name)) as tmp, open(tmp, "wb") as fh:
                    fh.write(data)
            with atomic_output(path) as tmp, open(tmp, "w") as fh:
                fh.write(text)
        else:
            yup = mesh.copy()
            yup.apply_transform(Z_UP_TO_Y_UP)
            with atomic_output(path) as tmp, open(tmp, "wb") as fh:
                fh.write(yup.export(file_type="glb"))
        paths[fmt] = path
    return paths
