"""Textured meshes: a UV atlas (xatlas), the albedo baked into it, seams padded, OBJ+MTL+PNG and GLB.

Baking rasterises the mesh in UV space: every texel centre inside a triangle of the atlas gets that
triangle's barycentrics, hence a point and a normal on the surface, and the colour there is asked of
the asset (`colour_fn(points, normals)`: what the renders show at that point). Texels no triangle
covers are then filled outwards from the charts (`pad`), so the seams' bilinear and mip-map look-ups
never mix in the background.
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
    """xatlas charts packed for a size² texture with PAD_TEXELS between charts.
    Returns (vmapping (V',) index of each new vertex in `verts`, faces (F, 3) into the new
    vertices, uv (V', 2) in [0, 1], v up as in OBJ). Vertices on seams are split: one UV each."""
    import xatlas

    if len(faces) == 0:
        raise Text23dError("The mesh has no faces to unwrap. Fix: check the exported mesh (export.texture=false "
                           "writes it with vertex colours).")
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(verts, np.float32), np.ascontiguousarray(faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.padding, pack.resolution, pack.bilinear = PAD_TEXELS, int(size), True
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, new_faces, uv = atlas[0]
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uv.astype(np.float32)


def rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre of a size² image, and where.
    Image row 0 is v = 1 (the top of the PNG). Returns face id (S, S) (-1: none) and
    barycentrics (S, S, 3)."""
    px = torch.as_tensor(uv, dtype=torch.float64)[torch.as_tensor(faces)] * size  # (F, 3, 2) texel units
    px[..., 1] = size - px[..., 1]  # v up -> image rows down
    lo = torch.floor(px.min(1).values - 0.5).clamp(0, size - 1).long()  # texel bbox per triangle
    hi = torch.ceil(px.max(1).values - 0.5).clamp(0, size - 1).long()
    w, h = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    face_id = torch.full((size * size,), -1, dtype=torch.long)
    bary = torch.zeros(size * size, 3, dtype=torch.float64)
    counts = w * h
    starts = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    for begin in range(0, total, chunk):  # every (triangle, texel in its bbox) pair, in chunks
        k = torch.arange(begin, min(begin + chunk, total))
        f = torch.searchsorted(starts, k, right=True) - 1
        local = k - starts[f]
        x, y = lo[f, 0] + local % w[f], lo[f, 1] + local // w[f]
        p = torch.stack([x, y], -1).double() + 0.5
        a, b, c = px[f, 0], px[f, 1], px[f, 2]
        area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
        l1 = ((p[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (p[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])) / area
        l2 = ((b[:, 0] - a[:, 0]) * (p[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (p[:, 0] - a[:, 0])) / area
        l0 = 1 - l1 - l2
        inside = (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9) & (area.abs() > 1e-12)
        idx = (y * size + x)[inside]
        face_id[idx] = f[inside]
        bary[idx] = torch.stack([l0, l1, l2], -1)[inside]
    return face_id.view(size, size).numpy(), bary.view(size, size, 3).numpy()


def pad(image: np.ndarray, covered: np.ndarray, texels: int) -> np.ndarray:
    """Grow every chart outwards by `texels` (each empty texel takes the mean of its covered
    8-neighbours, ring by ring); what is still empty takes the mean colour, so no look-up near a
    seam or at a coarse mip level reaches a background colour."""
    image, covered = image.copy(), covered.copy()
    for _ in range(texels):
        total = np.zeros_like(image)
        count = np.zeros(covered.shape, np.float32)
        padded_img, padded_cov = np.pad(image * covered[..., None], ((1, 1), (1, 1), (0, 0))), np.pad(covered, 1)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    sl = (slice(1 + dy, 1 + dy + covered.shape[0]), slice(1 + dx, 1 + dx + covered.shape[1]))
                    total += padded_img[sl]
                    count += padded_cov[sl]
        grow = ~covered & (count > 0)
        if not grow.any():
            break
        image[grow] = total[grow] / count[grow][:, None]
        covered = covered | grow
    if covered.any():
        image[~covered] = image[covered].mean(0)
    return image


def bake(colour_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], verts: np.ndarray, normals: np.ndarray,
         faces: np.ndarray, uv: np.ndarray, size: int, device: torch.device | str = "cpu",
         chunk: int = 65536) -> tuple[np.ndarray, float]:
    """The albedo texture (S, S, 3) float in [0, 1], padded, and the fraction of texels covered."""
    face_id, bary = rasterize_uv(uv, faces, size)
    covered = face_id >= 0
    f, b = face_id[covered], bary[covered]  # (T,), (T, 3)
    corners = faces[f]  # (T, 3)
    points = np.einsum("tk,tkc->tc", b, verts[corners]).astype(np.float32)
    n = np.einsum("tk,tkc->tc", b, normals[corners])
    n = (n / np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)
    colours = []
    with torch.no_grad():
        for i in range(0, len(points), chunk):
            p = torch.from_numpy(points[i:i + chunk]).to(device)
            colours.append(colour_fn(p, torch.from_numpy(n[i:i + chunk]).to(device)).float().cpu().numpy())
    image = np.ones((size, size, 3), np.float32)
    if colours:
        image[covered] = np.clip(np.nan_to_num(np.concatenate(colours)), 0.0, 1.0)
    return pad(image, covered, 2 * PAD_TEXELS), float(covered.mean())


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
    image, coverage = bake(colour_fn, verts, normals, faces, uv, size, device)
    t3 = time.perf_counter()
    texture = Image.fromarray(np.round(image * 255).astype(np.uint8))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=texture, metallicFactor=0.0, roughnessFactor=1.0,
                                                   name="albedo")
    out = trimesh.Trimesh(verts, faces, visual=trimesh.visual.TextureVisuals(uv=uv, material=material), process=False)
    info = {"texture_size": size, "texture_coverage": round(coverage, 4), "mesh_faces": len(faces),
            "mesh_vertices": len(verts), "decimate_s": round(t1 - t0, 3), "unwrap_s": round(t2 - t1, 3),
            "bake_s": round(t3 - t2, 3)}
    log.info("textured mesh: %d faces, %d² texture (%.0f %% covered); unwrap %.1f s, bake %.1f s",
             len(faces), size, 100 * coverage, t2 - t1, t3 - t2)
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
