"""Textured export: UV atlas, baking, seam padding, and files that reload with their texture."""
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from text23d.export.texture import PAD_TEXELS, decimate, rasterize_uv, save_textured, textured_mesh

ROOT = Path(__file__).resolve().parents[1]
VALIDATOR_MODULES = ROOT / ".tools" / "gltf" / "node_modules"


def normal_colour(points, normals):
    """A sphere coloured by its normal: (n + 1) / 2, from the point (exact on a centred sphere)."""
    return (points / points.norm(dim=-1, keepdim=True) + 1) / 2


def sphere():
    return trimesh.creation.icosphere(subdivisions=4, radius=0.5)


def reload(path):
    """The file back in the world frame (z up), as the evaluation reads it."""
    from text23d.builtin.evaluate import load_exported_mesh

    return load_exported_mesh(path)


def texture_of(mesh) -> Image.Image:
    m = mesh.visual.material
    return getattr(m, "baseColorTexture", None) or m.image


def surface_samples(mesh, n=3000, seed=0):
    """Random points inside random faces: (positions, UVs) by the same barycentrics."""
    rng = np.random.default_rng(seed)
    f = rng.integers(0, len(mesh.faces), n)
    b = rng.dirichlet([1, 1, 1], n)
    corners = np.asarray(mesh.faces)[f]
    pos = np.einsum("nk,nkc->nc", b, np.asarray(mesh.vertices)[corners])
    uv = np.einsum("nk,nkc->nc", b, np.asarray(mesh.visual.uv)[corners])
    return pos, uv


@pytest.mark.parametrize("fmt", ["obj", "glb"])
def test_a_baked_sphere_gives_its_colour_field_back_at_surface_points(tmp_path, fmt):
    mesh, info = textured_mesh(sphere(), normal_colour, 256)
    assert 0.3 < info["texture_coverage"] < 0.95 and info["unwrap_s"] >= 0 and info["bake_s"] >= 0
    path = save_textured(mesh, str(tmp_path), "model", [fmt])[fmt]
    back = reload(path)
    assert len(back.faces) == len(mesh.faces) and back.visual.uv is not None
    pos, uv = surface_samples(back)
    # trimesh's own reader of UVs (nearest texel, its v convention): independent of our baker.
    got = trimesh.visual.color.uv_to_color(uv, texture_of(back))[:, :3] / 255.0
    truth = (pos / np.linalg.norm(pos, axis=1, keepdims=True) + 1) / 2
    # Inside a face the baked colour is the field at a point of the flat triangle, whose direction
    # from the centre differs from the sampled point's by under a texel: the error is a texel's
    # worth of the field (the sphere's colour changes by ~0.01 per texel here) plus 8-bit rounding.
    err = np.abs(got - truth)
    assert err.mean() < 0.01 and np.quantile(err, 0.99) < 0.03, (err.mean(), err.max())


def test_obj_writes_mtl_and_png_that_it_names(tmp_path):
    mesh, _ = textured_mesh(sphere(), normal_colour, 64)
    obj = Path(save_textured(mesh, str(tmp_path), "model", ["obj"])["obj"])
    text = obj.read_text()
    assert "mtllib model.mtl" in text and "usemtl" in text and "\nvt " in text
    mtl = (tmp_path / "model.mtl").read_text()
    assert "map_Kd model.png" in mtl and "Kd 1 1 1" in mtl  # no darkening factor on the texture
    assert Image.open(tmp_path / "model.png").size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mtl", "model.obj", "model.png"]  # no temporaries


def test_padding_leaves_no_background_in_the_texture(tmp_path):
    """A constant colour must fill the whole texture: charts, seams, their padding and the rest, so
    no bilinear or mip-map look-up near a seam can fetch a background texel."""
    red = torch.tensor([0.8, 0.1, 0.1])
    mesh, info = textured_mesh(sphere(), lambda p, n: red.expand(len(p), 3), 128)
    image = np.asarray(texture_of(mesh)).reshape(-1, 3)
    assert info["texture_coverage"] < 0.95  # there was empty space to fill
    assert np.abs(image - red.numpy() * 255).max() <= 1  # 8-bit rounding of 0.1·255 = 25.5 either way


def test_padding_grows_charts_from_their_own_edges():
    """Texels next to a chart take the chart's edge colours, not a global average."""
    from text23d.export.texture import pad

    image = np.zeros((16, 16, 3), np.float32)
    covered = np.zeros((16, 16), bool)
    image[2:6, 2:6], covered[2:6, 2:6] = [1, 0, 0], True  # a red chart
    image[10:14, 10:14], covered[10:14, 10:14] = [0, 0, 1], True  # a blue chart
    out = pad(image, covered, PAD_TEXELS)
    assert (out[1, 1] == [1, 0, 0]).all() and (out[7, 3] == [1, 0, 0]).all()
    assert (out[14, 14] == [0, 0, 1]).all() and (out[9, 12] == [0, 0, 1]).all()


def test_uv_rasteriser_covers_a_triangle_exactly():
    """Texel centres inside an axis-aligned right triangle, and only those, get it."""
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    face_id, bary = rasterize_uv(uv, np.array([[0, 1, 2]]), 8)
    rows, cols = np.mgrid[0:8, 0:8]
    u, v = (cols + 0.5) / 8, 1 - (rows + 0.5) / 8
    assert ((face_id == 0) == (u + v <= 1)).all()
    inside = face_id == 0
    np.testing.assert_allclose(bary[inside][:, 1], u[inside], atol=1e-9)  # weight of the (1, 0) corner
    np.testing.assert_allclose(bary[inside][:, 2], v[inside], atol=1e-9)


def test_decimation_keeps_the_shape_with_fewer_faces():
    big = trimesh.creation.icosphere(subdivisions=6, radius=0.5)  # 81,920 faces
    small = decimate(big, 5000)
    assert 4000 <= len(small.faces) <= 5200
    r = np.linalg.norm(small.vertices, axis=1)
    assert np.abs(r - 0.5).max() < 0.01
    assert decimate(small, 10000) is small  # already below the target: untouched


def _glb_json(path):
    data = Path(path).read_bytes()
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF" and version == 2 and length == len(data)
    json_len, json_type = struct.unpack("<II", data[12:20])
    assert json_type == 0x4E4F534A  # "JSON"
    gltf = json.loads(data[20:20 + json_len])
    bin_len, bin_type = struct.unpack("<II", data[20 + json_len:28 + json_len])
    assert bin_type == 0x004E4942  # "BIN\0"
    return gltf, data[28 + json_len:28 + json_len + bin_len]


def test_glb_structure_accessors_image_and_material(tmp_path):
    mesh, _ = textured_mesh(sphere(), normal_colour, 64)
    gltf, blob = _glb_json(save_textured(mesh, str(tmp_path), "model", ["glb"])["glb"])
    sizes = {5126: 4, 5125: 4, 5123: 2, 5121: 1}
    widths = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}
    for acc in gltf["accessors"]:
        view = gltf["bufferViews"][acc["bufferView"]]
        need = acc.get("byteOffset", 0) + acc["count"] * sizes[acc["componentType"]] * widths[acc["type"]]
        assert need <= view["byteLength"] and view.get("byteOffset", 0) + view["byteLength"] <= len(blob)
    prim = gltf["meshes"][0]["primitives"][0]
    pos, uv = gltf["accessors"][prim["attributes"]["POSITION"]], gltf["accessors"][prim["attributes"]["TEXCOORD_0"]]
    assert pos["count"] == uv["count"] == len(mesh.vertices)  # one UV per vertex, seams split
    assert uv["min"][0] >= 0 and uv["max"][0] <= 1 and uv["min"][1] >= 0 and uv["max"][1] <= 1
    pbr = gltf["materials"][prim["material"]]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0 and pbr["roughnessFactor"] == 1
    texture = gltf["textures"][pbr["baseColorTexture"]["index"]]
    image = gltf["images"][texture["source"]]
    view = gltf["bufferViews"][image["bufferView"]]
    png = blob[view.get("byteOffset", 0):view.get("byteOffset", 0) + view["byteLength"]]
    assert image["mimeType"] == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    # glTF's v points down the image: the texel a vertex names must hold that vertex's colour.
    import io

    tex = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32) / 255
    gl_uv = np.frombuffer(blob, np.float32, uv["count"] * 2, view_offset(gltf, uv)).reshape(-1, 2)
    px = np.clip((gl_uv * 64).astype(int), 0, 63)
    got = tex[px[:, 1], px[:, 0]]
    v = np.asarray(mesh.vertices)
    truth = (v / np.linalg.norm(v, axis=1, keepdims=True) + 1) / 2
    assert np.abs(got - truth).mean() < 0.03


def view_offset(gltf, acc):
    return gltf["bufferViews"][acc["bufferView"]].get("byteOffset", 0) + acc.get("byteOffset", 0)


@pytest.mark.skipif(shutil.which("node") is None or not (VALIDATOR_MODULES / "gltf-validator").exists(),
                    reason="the Khronos glTF validator (node + npm gltf-validator) is set up by `make setup`; "
                           "this machine has no node")
def test_khronos_gltf_validator_finds_no_errors(tmp_path):
    mesh, _ = textured_mesh(sphere(), normal_colour, 64)
    glb = save_textured(mesh, str(tmp_path), "model", ["glb"])["glb"]
    p = subprocess.run(["node", str(ROOT / "scripts" / "gltf_validate.js"), glb], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "NODE_PATH": str(VALIDATOR_MODULES)})
    report = json.loads(p.stdout)
    assert p.returncode == 0 and report["errors"] == 0 and report["warnings"] == 0, report


VIEWER_MODULES = ROOT / ".tools" / "viewer" / "node_modules"


@pytest.mark.skipif(shutil.which("node") is None or not (VIEWER_MODULES / "@sparticuz" / "chromium").exists(),
                    reason="the headless-Chromium glTF viewer (node + npm @sparticuz/chromium, puppeteer-core, "
                           "three) is set up by `make setup`; this machine has no node")
def test_a_real_gltf_viewer_shows_the_baked_texture(tmp_path):
    """three.js's GLTFLoader in headless Chromium (WebGL through SwiftShader) loads the GLB, finds
    the texture, UVs and material, and renders every pixel of the sphere in its baked colour."""
    import base64

    mesh, _ = textured_mesh(sphere(), normal_colour, 256)
    glb = save_textured(mesh, str(tmp_path), "model", ["glb"])["glb"]
    size = 64
    p = subprocess.run(["node", str(ROOT / "scripts" / "view_glb.mjs"), glb, str(size)], capture_output=True,
                       text=True, timeout=180, env={**os.environ, "NODE_PATH": str(VIEWER_MODULES)})
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout)
    [found] = result["meshes"]
    assert found["map"] and found["uv"] and found["metalness"] == 0 and found["roughness"] == 1
    rgba = np.frombuffer(base64.b64decode(result["pixels"]), np.uint8).reshape(size, size, 4)[::-1]  # rows top down
    # The same picture worked out here: a camera on glTF's +z at 2.5, fovy 40°, the sphere (r 0.5)
    # at the origin; each pixel's ray hits it at p, whose world point (z up) gives the colour.
    ys, xs = np.mgrid[0:size, 0:size]
    t = np.tan(np.radians(20))
    d = np.stack([((xs + 0.5) / size * 2 - 1) * t, (1 - (ys + 0.5) / size * 2) * t, -np.ones_like(xs, float)], -1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    o = np.array([0.0, 0.0, 2.5])
    b = d @ o
    disc = b ** 2 - (o @ o - 0.25)
    hit = disc > 0.02  # inside the silhouette, away from its edge
    p_gl = o + d * (-b - np.sqrt(np.clip(disc, 0, None)))[..., None]
    world = np.stack([p_gl[..., 0], -p_gl[..., 2], p_gl[..., 1]], -1)  # glTF y-up back to z-up
    expected = (world / np.linalg.norm(world, axis=-1, keepdims=True) + 1) / 2
    got = rgba[..., :3] / 255.0
    assert hit.sum() > 300
    err = np.abs(got[hit] - expected[hit])
    assert err.mean() < 0.03 and np.quantile(err, 0.95) < 0.08, (err.mean(), np.quantile(err, 0.95))
    assert (got[~(disc > -0.02)] > 0.99).all()  # the white background around it
