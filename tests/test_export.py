"""Mesh extraction/export and video/image/grid writing, against real trimesh, PyMCubes, ffmpeg."""

import math
import os

import imageio.v2 as iio
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from text23d.errors import ConfigError, Text23dError
from text23d.export.mesh import extract_mesh, save_mesh
from text23d.export.video import make_grid, save_image, save_video, to_uint8

RADIUS, RES = 1.0, 48
VOXEL = 2 * RADIUS / (RES - 1)
CENTRE = torch.tensor([0.3, -0.2, 0.1])


def sphere_density(r0: float, centre=torch.zeros(3)):
    """σ = 10·(r0 − |x − c|): positive inside, crosses 0 on the sphere."""
    return lambda p: 10.0 * (r0 - (p - centre).norm(dim=-1))


def box_density(half, centre):
    """σ = 10·(1 − max_i |x_i − c_i| / h_i): an axis-aligned box with half-extents `half`."""
    half = torch.tensor(half)
    return lambda p: 10.0 * (1.0 - ((p - centre).abs() / half).amax(dim=-1))


def position_color(p):
    return (p.clamp(-1, 1) + 1) / 2  # (N, 3) in [0, 1], different at every vertex


@pytest.fixture(scope="module")
def offcentre_box():
    # Different half-extents per axis and an off-centre position: a swapped or flipped axis
    # in the index -> world mapping would move the bounds.
    half = (0.2, 0.3, 0.4)
    return half, extract_mesh(box_density(half, CENTRE), position_color, RADIUS, RES, 0.0)


def test_sphere_is_watertight_at_radius_with_outward_normals():
    r0 = 0.5
    mesh = extract_mesh(sphere_density(r0, CENTRE), position_color, RADIUS, RES, threshold=0.0)
    assert mesh.is_watertight
    dist = np.linalg.norm(mesh.vertices - CENTRE.numpy(), axis=1)
    assert np.abs(dist - r0).max() < 1.5 * VOXEL
    # Outward winding: face normals point away from the centre, and the signed volume is the
    # sphere's (negative if the winding were inward).
    dots = np.sum(mesh.face_normals * (mesh.triangles_center - CENTRE.numpy()), axis=1)
    assert (dots > 0).mean() > 0.99
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * r0**3, rel=0.03)


def test_threshold_moves_the_surface():
    # σ = 10·(0.5 − r) = 2 at r = 0.3: a higher level gives a smaller sphere.
    mesh = extract_mesh(sphere_density(0.5), position_color, RADIUS, RES, threshold=2.0)
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - 0.3).max() < 1.5 * VOXEL


def test_vertex_colours_come_from_color_fn_at_vertices():
    mesh = extract_mesh(sphere_density(0.6), position_color, RADIUS, RES, 0.0, chunk=4096)
    expected = np.round((mesh.vertices + 1) / 2 * 255)
    colors = mesh.visual.vertex_colors
    assert colors.dtype == np.uint8 and colors.shape == (len(mesh.vertices), 4)
    assert np.abs(colors[:, :3] - expected).max() <= 1
    assert (colors[:, 3] == 255).all()


def test_chunk_size_does_not_change_the_mesh():
    # Exact equality is right here: the density is elementwise per point (a norm over 3 numbers in
    # a fixed order), so every point is computed identically whatever chunk it falls in.
    small = extract_mesh(sphere_density(0.5), position_color, RADIUS, 24, 0.0, chunk=1000)
    large = extract_mesh(sphere_density(0.5), position_color, RADIUS, 24, 0.0, chunk=1 << 20)
    np.testing.assert_array_equal(small.vertices, large.vertices)
    np.testing.assert_array_equal(small.faces, large.faces)


def test_world_coordinates_of_an_offcentre_box(offcentre_box):
    half, mesh = offcentre_box
    c, h = CENTRE.numpy(), np.array(half)
    np.testing.assert_allclose(mesh.bounds, [c - h, c + h], atol=0.5 * VOXEL)


class Stop(Exception):
    pass


def test_device_is_taken_from_the_field_module():
    """Query points are built on the device of the module whose bound method is the field (its first
    parameter, else its first buffer), in float32; a plain function gets the CPU. The "meta" device
    makes this fail on a CPU-only machine too, where every default would otherwise be right."""
    from text23d.export.mesh import _field_device

    class Params(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.r0 = torch.nn.Parameter(torch.tensor(0.5))
            self.seen = []

        def density(self, p):
            self.seen.append((p.device, p.dtype))
            raise Stop

        forward = density

    class Buffers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("r0", torch.tensor(0.5))

        def density(self, p):
            return 10 * (self.r0 - p.norm(dim=-1))

    meta = torch.device("meta")
    params, buffers = Params().to(meta), Buffers().to(meta)
    assert _field_device(params.density) == meta  # parameters only
    assert _field_device(buffers.density) == meta  # buffers only
    assert _field_device(params) == meta  # the module itself as the field
    assert _field_device(lambda p: p.norm(dim=-1)) == torch.device("cpu")
    assert _field_device(Buffers().density) == torch.device("cpu")
    with pytest.raises(Stop):
        extract_mesh(params.density, position_color, RADIUS, 16, 0.0)
    assert params.seen == [(meta, torch.float32)]
    # On the CPU the same module's field runs end to end.
    mesh = extract_mesh(Buffers().density, position_color, RADIUS, 16, 0.0)
    assert len(mesh.faces) > 0


def test_rgb8_quantises_clips_and_reads_nan_as_black():
    """[0, 1] to 0..255 rounded to nearest, out-of-range values clipped, NaN read as 0, and only
    the first three channels kept (an RGBA input gives RGB)."""
    from text23d.export.mesh import to_rgb8

    rgba = np.array([[0.0, 0.2, 1.0, 0.7], [-0.5, 1.5, np.nan, 0.3], [0.5, 0.999, 0.001, 1.0]])
    out = to_rgb8(rgba)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 51, 255], [0, 255, 0], [128, 255, 0]])


def test_field_that_never_crosses_the_threshold_raises_with_the_range():
    with pytest.raises(Text23dError) as err:
        extract_mesh(lambda p: torch.full((len(p),), 0.25), position_color, RADIUS, 8, 5.0)
    msg = str(err.value)
    assert "export.isosurface_threshold=5" in msg and "0.25" in msg and "train longer" in msg


def test_obj_round_trip_keeps_vertices_and_colours(tmp_path, offcentre_box):
    _, mesh = offcentre_box
    paths = save_mesh(mesh, tmp_path / "export", "model", formats=("obj",))
    assert list(paths) == ["obj"] and paths["obj"].endswith("model.obj")
    first_v = next(line for line in open(paths["obj"]) if line.startswith("v "))
    assert len(first_v.split()) == 7  # v x y z r g b
    loaded = trimesh.load(paths["obj"], process=False)
    assert len(loaded.vertices) == len(mesh.vertices)
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-6)  # world coordinates
    assert np.abs(loaded.visual.vertex_colors.astype(int) - mesh.visual.vertex_colors).max() <= 1
    assert sorted(os.listdir(tmp_path / "export")) == ["model.obj"]  # no temp file left


def test_glb_is_rotated_to_y_up_and_keeps_colours(tmp_path, offcentre_box):
    _, mesh = offcentre_box
    paths = save_mesh(mesh, str(tmp_path), "model")
    assert set(paths) == {"obj", "glb"}
    loaded = trimesh.load(paths["glb"], force="mesh", process=False)
    (x0, y0, z0), (x1, y1, z1) = mesh.bounds
    # (x, y, z) -> (x, z, -y): world up (+z) becomes glTF up (+y).
    np.testing.assert_allclose(loaded.bounds, [[x0, z0, -y1], [x1, z1, -y0]], atol=1e-5)
    assert len(loaded.vertices) == len(mesh.vertices)
    np.testing.assert_array_equal(loaded.visual.vertex_colors, mesh.visual.vertex_colors)
    assert loaded.volume > 0  # a proper rotation keeps the winding outward


def test_a_single_format_string_writes_that_format_only(tmp_path, offcentre_box):
    paths = save_mesh(offcentre_box[1], str(tmp_path), "model", formats="glb")
    assert list(paths) == ["glb"] and sorted(os.listdir(tmp_path)) == ["model.glb"]


def test_obj_has_no_normals_even_when_the_mesh_has_computed_them(tmp_path, offcentre_box):
    """The OBJ is "v x y z r g b" and "f a b c": viewers shade it from its faces, whatever trimesh
    has cached on the mesh."""
    mesh = offcentre_box[1].copy()
    assert mesh.vertex_normals.shape == mesh.vertices.shape  # computed and cached now
    lines = open(save_mesh(mesh, str(tmp_path), "model", formats=("obj",))["obj"]).read().splitlines()
    assert not any(line.startswith("vn") for line in lines)
    faces = [line.split()[1:] for line in lines if line.startswith("f ")]
    assert len(faces) == len(mesh.faces) and all(len(f) == 3 and "/" not in "".join(f) for f in faces)


def test_unknown_mesh_format_raises_config_error(tmp_path, offcentre_box):
    with pytest.raises(ConfigError, match=r"'ply'.*\['obj', 'glb'\]"):
        save_mesh(offcentre_box[1], tmp_path, "model", formats=("obj", "ply"))
    assert not os.listdir(tmp_path)  # checked before anything is written


def test_to_uint8_scales_floats_and_passes_uint8_through():
    x = torch.tensor([[-0.5, 0.0, 0.5, 1.0, 2.0]])
    np.testing.assert_array_equal(to_uint8(x), [[0, 0, 128, 255, 255]])
    u = np.arange(5, dtype=np.uint8)
    assert to_uint8(u) is u


@pytest.mark.parametrize("dtype", ["float", "uint8"])
def test_video_round_trip_with_odd_size(tmp_path, dtype):
    frames = np.zeros((12, 33, 47, 3), np.float32)
    frames[..., 0] = 1.0  # solid red
    if dtype == "uint8":
        frames = to_uint8(frames)
    path = save_video(frames, tmp_path / "v" / "turntable.mp4", fps=10)
    assert path == str(tmp_path / "v" / "turntable.mp4")
    with iio.get_reader(path) as reader:
        # list(reader) raises MemoryError: the ffmpeg reader's len() is inf (unknown count).
        back = np.stack(list(reader.iter_data()))
        assert reader.get_meta_data()["fps"] == 10
    # odd H, W are padded by one edge row/column for yuv420p
    assert back.shape == (12, 34, 48, 3)
    np.testing.assert_allclose(back.reshape(-1, 3).mean(0), [255, 0, 0], atol=8)
    assert os.listdir(tmp_path / "v") == ["turntable.mp4"]


def test_video_accepts_a_list_of_tensors_and_rejects_bad_shapes(tmp_path):
    frames = [torch.full((16, 16, 3), 0.5) for _ in range(3)]
    with iio.get_reader(save_video(frames, tmp_path / "a.mp4")) as reader:
        assert len(list(reader.iter_data())) == 3
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        save_video(np.zeros((3, 16, 16)), tmp_path / "b.mp4")


def test_save_image_round_trip(tmp_path):
    img = np.random.default_rng(0).random((9, 13, 3)).astype(np.float32)
    path = save_image(img, tmp_path / "img.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), to_uint8(img))


def test_grid_shape_arithmetic_and_placement():
    a = np.zeros((20, 30, 3), np.uint8)
    b = np.full((10, 10, 3), 100, np.uint8)  # another size: resized to 20×30
    grid = make_grid([a, b, a, a, a], ncol=2, pad=2)
    # cols = 2, rows = 3: W = 2·30 + 3·2, H = 3·20 + 4·2
    assert grid.shape == (68, 66, 3) and grid.dtype == np.uint8
    assert (grid[2:22, 2:32] == 0).all()  # first tile
    assert (grid[2:22, 34:64] == 100).all()  # second tile, resized
    assert (grid[46:66, 34:64] == 255).all()  # the unused sixth slot stays background
    assert make_grid([a, a], ncol=5, pad=0).shape == (20, 60, 3)  # never more cols than images


def test_grid_labels_add_a_band_with_text():
    imgs = [np.zeros((40, 80, 3), np.uint8)] * 2
    plain = make_grid(imgs, ncol=2)
    labelled = make_grid(imgs, ncol=2, labels=["0: scale=7.5", "1: " + "very_long_value" * 20])
    assert labelled.shape[1] == plain.shape[1] and labelled.shape[0] > plain.shape[0]
    band = labelled[plain.shape[0] - 2 :]
    assert (band[:, :82] < 128).any() and (band[:, 82:] < 128).any()  # text under each tile
    # a long label is wrapped/cut to at most 3 lines, not drawn across the neighbour tile
    assert labelled.shape[0] - plain.shape[0] < 3 * 20
    other = make_grid(imgs, ncol=2, labels=["0: scale=100", "1: x"])
    assert (other != labelled[: other.shape[0]]).any()


class HazyBall(torch.nn.Module):
    """A black ball in a faint grey haze, like an SDS asset with floaters around it. An isosurface
    at a low level lies on the haze, where the albedo is grey; the renders show mostly black."""

    provides = frozenset({"density", "albedo"})

    def density(self, p):
        r = p.norm(dim=-1)
        return (200.0 * (0.5 - r)).clamp(0.0, 100.0) + 1.0 * (r < 0.6)

    def albedo(self, p):
        grey = (p.norm(dim=-1) > 0.5)[:, None]
        return torch.where(grey, torch.full((len(p), 3), 0.6), torch.full((len(p), 3), 0.1))


def test_vertex_colours_are_what_the_renders_show_not_the_haze_at_the_isosurface():
    from text23d.builtin.evaluate import colour_error, mesh_views
    from text23d.cameras.sampler import RandomCameraSampler
    from text23d.export.mesh import surface_colors, to_rgb8
    from text23d.renderers.background import Background
    from text23d.renderers.volume import VolumeRenderer

    field = HazyBall()
    mesh = extract_mesh(field.density, field.albedo, RADIUS, RES, threshold=0.5)  # on the haze
    cams = RandomCameraSampler().orbit(4)
    out = VolumeRenderer(num_samples=256, skip_weight=0)(field, Background("solid"), cams, 48, 48)
    renders = [{"rgb": out["comp_rgb"][i].numpy(), "opacity": out["opacity"][i].expand(-1, -1, 3).numpy()}
               for i in range(4)]
    before = colour_error(renders, mesh_views(mesh, cams, 48))  # colour at the vertices: grey
    colours = np.full((len(mesh.vertices), 4), 255, np.uint8)
    colours[:, :3] = to_rgb8(surface_colors(field.density, field.albedo, mesh, RADIUS, start=2 * VOXEL))
    mesh.visual.vertex_colors = colours
    after = colour_error(renders, mesh_views(mesh, cams, 48))
    # Not 0: a view ray meets the surface obliquely near the silhouette and crosses more haze
    # than the head-on ray each vertex is coloured with.
    assert before > 0.3 and after < 0.08 and after < before / 4, (before, after)


# --- auto_threshold: the isosurface level whose silhouettes match the renders -----------------------


class Field:
    """A geometry whose density is `fn`; it records every batch of points it is asked about and the
    largest density it returned."""

    def __init__(self, fn):
        self.fn, self.batches, self.top = fn, [], -math.inf

    def density(self, p):
        self.batches.append(p.clone())
        out = self.fn(p)
        self.top = max(self.top, float(out.max()))
        return out


def axis_cameras(*positions, fovy=0.5):
    """Cameras at `positions` looking at the origin; with resolution 1 each sees one ray, its axis."""
    from text23d.cameras.sampler import Cameras, look_at

    pos = torch.tensor(positions, dtype=torch.float32)
    n = len(pos)
    return Cameras(look_at(pos), torch.full((n,), fovy), torch.zeros(n), torch.zeros(n), pos.norm(dim=-1),
                   torch.zeros(n, 3))


def box(lo, hi, value):
    """value inside the axis-aligned box [lo, hi], 0 outside."""
    lo, hi = torch.tensor(lo), torch.tensor(hi)
    return lambda p: value * ((p > lo) & (p < hi)).all(-1).float()


X_ROD = ([0.1, -0.05, -0.05], [0.99, 0.05, 0.05])  # on the ray from (2, 0, 0): 29 of its 64 samples
Y_ROD = ([-0.05, 0.3, -0.05], [0.05, 0.6, 0.05])  # on the ray from (0, 2, 0): 9 of its 64 samples


def test_auto_threshold_samples_each_ray_at_the_midpoints_of_its_chord_through_the_ball():
    """A camera at distance 2 with one pixel looks along -x: the ball |x| < 1 spans t in [1, 3], and the
    field is asked at the 64 midpoints x = 1 - (i + 0.5) / 32. A field that is 0 (or below) everywhere
    has no level: (1.0, 0.0)."""
    from text23d.export.threshold import auto_threshold

    field = Field(lambda p: torch.zeros(len(p)))
    assert auto_threshold(field, axis_cameras([2.0, 0.0, 0.0]), 1.0, resolution=1) == (1.0, 0.0)
    pts = torch.cat(field.batches)
    expected = torch.zeros(64, 3)
    expected[:, 0] = 1 - (torch.arange(64) + 0.5) / 32
    torch.testing.assert_close(pts, expected, atol=1e-6, rtol=0)
    negative = Field(lambda p: -1.0 - p.norm(dim=-1))
    assert auto_threshold(negative, axis_cameras([2.0, 0.0, 0.0]), 1.0, resolution=1) == (1.0, 0.0)


def test_auto_threshold_defaults_render_48x48_rays_of_64_samples_in_chunks_of_65536_points():
    """The defaults are 48² pixels per view and 64 samples per ray; the field is asked at most 65536
    points at a time, so a large image never holds all its samples' densities at once."""
    from text23d.cameras.sampler import RandomCameraSampler
    from text23d.export.threshold import auto_threshold

    field = Field(lambda p: torch.zeros(len(p)))
    auto_threshold(field, RandomCameraSampler().orbit(1), 1.0)
    sizes = [len(b) for b in field.batches]
    assert sum(sizes) == 48 * 48 * 64 and max(sizes) == 65536


def test_auto_threshold_of_a_gaussian_blob_is_its_closed_form_level():
    """σ = A·exp(-r²/2s²). A ray at distance p from the centre has optical depth A·√(2π)·s·exp(-p²/2s²),
    so the renders are opaque (> 0.5) for p² < 2s²·ln(A√(2π)s / ln 2); {σ > L} covers p² < 2s²·ln(A/L).
    The silhouettes agree at L* = ln 2 / (√(2π)·s), whatever A. With A = 8·L*, L* = A·10^(-28/31) is
    candidate 17 of 32 (log-spaced over [0.01, 1]·max σ), and its neighbours lose ~7 % IoU."""
    from text23d.cameras.sampler import RandomCameraSampler
    from text23d.export.threshold import auto_threshold

    s = 0.2
    level = math.log(2) / (math.sqrt(2 * math.pi) * s)
    amplitude = level / 10 ** (-28 / 31)
    field = Field(lambda p: amplitude * torch.exp(-(p * p).sum(-1) / (2 * s * s)))
    threshold, iou = auto_threshold(field, RandomCameraSampler().orbit(2), 1.0)
    assert field.top == pytest.approx(amplitude, rel=0.02)  # the sample nearest the centre
    assert threshold == pytest.approx(field.top * 10 ** (-28 / 31), rel=1e-5)
    assert threshold == pytest.approx(level, rel=0.02)
    assert 0.97 < iou <= 1.0


def test_auto_threshold_ties_go_to_the_lowest_level_and_the_maximum_itself_is_never_solid():
    """Two one-ray views: the ray along x crosses 29 samples of density 0.9 (optical depth
    0.9·29/32, opacity 0.56: rendered), the ray along y 9 samples of 0.85 (opacity 0.21: not rendered).
    Every level up to 0.86·0.9 (candidate 30) makes both rays solid: IoU 1/2, and the first, 0.01·0.9,
    wins the tie. The last candidate is the maximum 0.9 itself, and {σ > 0.9} is empty (IoU 0), so
    the ray along x alone is never what is chosen."""
    from text23d.export.threshold import auto_threshold

    fields = [box(*X_ROD, 0.9), box(*Y_ROD, 0.85)]
    field = Field(lambda p: fields[0](p) + fields[1](p))
    threshold, iou = auto_threshold(field, axis_cameras([2.0, 0.0, 0.0], [0.0, 2.0, 0.0]), 1.0, resolution=1)
    assert threshold == pytest.approx(0.009, rel=1e-6) and iou == 0.5


def test_auto_threshold_of_one_opaque_ray_is_a_perfect_match():
    """One view, one ray through 29 samples of density 10: rendered and solid at every level below 10,
    so IoU is exactly 1 and the lowest level, 0.1, is chosen; with a single candidate that is the level."""
    from text23d.export.threshold import auto_threshold

    cams = axis_cameras([2.0, 0.0, 0.0])
    assert auto_threshold(Field(box(*X_ROD, 10.0)), cams, 1.0, resolution=1) == pytest.approx((0.1, 1.0), rel=1e-6)
    assert auto_threshold(Field(box(*X_ROD, 10.0)), cams, 1.0, resolution=1, n_candidates=1) == \
        pytest.approx((0.1, 1.0), rel=1e-6)


def test_auto_threshold_silhouette_is_opacity_strictly_above_one_half():
    """One sample (x = 0.390625) of density 32·ln 2 with step 2/64 has optical depth ln 2, opacity exactly
    0.5 in float32: not part of the rendered silhouette, so nothing matches (IoU 0)."""
    from text23d.export.threshold import auto_threshold

    ln2 = torch.tensor(math.log(2), dtype=torch.float32)
    assert (1 - torch.exp(-ln2)).item() == 0.5  # float32 makes this exact
    field = Field(box([0.38, -0.05, -0.05], [0.40, 0.05, 0.05], 32 * ln2.item()))
    threshold, iou = auto_threshold(field, axis_cameras([2.0, 0.0, 0.0]), 1.0, resolution=1)
    assert iou == 0.0 and threshold == pytest.approx(0.32 * ln2.item(), rel=1e-6)


def test_auto_threshold_builds_its_samples_on_the_cameras_device():
    """Rays, their samples and the query points live on the cameras' device (the "meta" device makes a
    CPU-built sample grid fail here too)."""
    from text23d.export.threshold import auto_threshold

    meta = torch.device("meta")
    cams = axis_cameras([2.0, 0.0, 0.0])
    cams = type(cams)(*(getattr(cams, f).to(meta) for f in cams.__dataclass_fields__))

    class Probe:
        seen = []

        def density(self, p):
            self.seen.append(p.device)
            raise Stop

    with pytest.raises(Stop):
        auto_threshold(Probe(), cams, 1.0, resolution=2)
    assert Probe.seen == [meta]


# --- extract_mesh / sample_density_grid: small cases worked by hand --------------------------------


def test_one_grid_cell_with_one_corner_inside_gives_one_outward_triangle_at_edge_midpoints():
    """resolution=2 is the smallest grid (one cell, its corners at ±radius). Density 1 at the corner
    (r, r, r) and 0 at the others, level 0.5: one triangle through the midpoints of the corner's three
    edges, (0, r, r), (r, 0, r), (r, r, 0), facing away from the corner (towards lower density); the
    colour field is asked at those float32 points."""
    r = 0.5
    seen = []

    def colour(p):
        seen.append(p.dtype)
        return position_color(p)

    mesh = extract_mesh(lambda p: (p.sum(-1) > 1.4).float(), colour, r, 2, 0.5)
    assert len(mesh.faces) == 1 and seen == [torch.float32]
    expected = [[0.0, r, r], [r, 0.0, r], [r, r, 0.0]]
    np.testing.assert_allclose(sorted(mesh.vertices.tolist()), sorted(expected), atol=1e-7)
    assert mesh.face_normals[0] @ np.ones(3) < 0
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], np.round((mesh.vertices + 1) / 2 * 255))


@pytest.mark.parametrize("level", [0.0, 1.0])
def test_a_level_equal_to_the_density_minimum_or_maximum_is_no_surface(level):
    """The level must lie strictly inside the sampled range: at the minimum or maximum nothing crosses."""
    with pytest.raises(Text23dError, match="No surface to extract"):
        extract_mesh(lambda p: (p.sum(-1) > 1.4).float(), position_color, 0.5, 4, level)


def test_a_subvoxel_blob_keeps_one_vertex_per_crossed_edge():
    """A blob just above the level at one grid point (σ = 1e-9 - |x|₁, the origin a grid point) crosses
    its 6 edges within 1e-8 of that point: marching cubes' 6 vertices and 8 faces are kept as they are
    (not merged into one), so the colours computed per vertex stay aligned."""
    mesh = extract_mesh(lambda p: 1e-9 - p.abs().sum(-1), position_color, 1.0, 9, 0.0)
    assert len(mesh.vertices) == 6 and len(mesh.faces) == 8
    assert np.abs(mesh.vertices).max() < 1e-7


def test_grid_sampling_defaults_cpu_and_chunks_of_65536_and_reads_nan_as_empty():
    """sample_density_grid and extract_mesh query at most 65536 points at a time by default (41³ = 68921
    points: two calls), on the CPU; NaN densities become 0 (empty space), not holes."""
    from text23d.export.mesh import sample_density_grid

    sizes = []

    def field(p):
        sizes.append((len(p), p.device.type))
        return torch.where(p[:, 0] > 0, torch.nan, 1.0 - p.norm(dim=-1))

    grid = sample_density_grid(field, 1.0, 41)
    assert sizes == [(65536, "cpu"), (41**3 - 65536, "cpu")]
    x = np.linspace(-1, 1, 41)
    assert (grid[x > 0] == 0).all() and not np.isnan(grid).any()
    sizes.clear()
    extract_mesh(field, None, 1.0, 41, 0.5)
    assert sizes == [(65536, "cpu"), (41**3 - 65536, "cpu")]


def test_an_explicit_device_is_where_density_and_colour_points_are_built():
    """device="meta" overrides the field's own (CPU) device for the grid points and the vertex queries.
    The density replays a CPU sphere σ = 0.5 - |x| chunk by chunk, since meta tensors hold no values."""
    from text23d.export.mesh import grid_axis

    x = torch.as_tensor(grid_axis(1.0, 12), dtype=torch.float32)
    pts = torch.stack(torch.meshgrid(x, x, x, indexing="ij"), -1).reshape(-1, 3)
    values = iter((0.5 - pts.norm(dim=-1)).split(500))
    devices = {"density": set(), "colour": set()}

    def density(p):
        devices["density"].add(p.device.type)
        return next(values)

    def colour(p):
        devices["colour"].add(p.device.type)
        return torch.zeros(len(p), 3)

    mesh = extract_mesh(density, colour, 1.0, 12, 0.0, chunk=500, device="meta")
    assert devices == {"density": {"meta"}, "colour": {"meta"}}
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - 0.5).max() < 2 * 2 / 11


# --- surface_colors / composited_colors: what a viewer looking straight at a vertex sees -----------

R0, START, BALL = 0.3, 0.1, 0.7  # density ball radius, start outside the surface, scene ball radius
SIGMA0 = 3.0


def ball_density(p):
    """σ0 inside |x| < R0, 0 outside: a hard-edged uniform ball."""
    return SIGMA0 * (p.norm(dim=-1) < R0).float()


def radial_albedo(p):
    r = p.norm(dim=-1)
    return torch.stack([r, 1 - r, torch.full_like(r, 0.25)], -1)


def sample_depths():
    """Where the composite samples a ray, by hand in float64: the midpoints and lengths of 16 intervals
    from the ray's origin START outside the surface: 10 of START/3, then 6 of START/3·q^k (k = 1..6),
    q making them end at 2·BALL (the longest way through the scene ball): the one positive root of
    START/3·(q^6 + … + q) = 2·BALL - 10·START/3."""
    step = START / 3
    [q] = [r.real for r in np.roots([step] * 6 + [-(2 * BALL - 10 * step)]) if abs(r.imag) < 1e-9 and r.real > 0]
    edges = np.concatenate([[0.0], np.cumsum(np.r_[np.full(10, step), step * q ** np.arange(1, 7)])])
    return (edges[1:] + edges[:-1]) / 2, np.diff(edges)


def expected_head_on_colour():
    """The composited albedo along a ray through the centre, by hand, in float64: at the `sample_depths`
    midpoints t_i, those past the far side of the scene ball (t_i > R0 + START + BALL) empty; inside the
    density ball α_i = 1 - exp(-σ0·δ_i), and sample i weighs α_i·Π_{j<i}(1 - α_j)."""
    t, delta = sample_depths()
    r = np.abs(R0 + START - t)  # distance of each sample from the centre
    sigma = np.where((r < R0) & (t < R0 + START + BALL), SIGMA0, 0.0)
    alpha = 1 - np.exp(-sigma * delta)
    w = alpha * np.cumprod(np.concatenate([[1.0], 1 - alpha[:-1]]))
    albedo = np.stack([r, 1 - r, np.full_like(r, 0.25)], -1)
    return (w[:, None] * albedo).sum(0) / w.sum(), t


def octahedron():
    """Vertices ±R0·e_i; by symmetry the vertex normals are exactly the axes (radial)."""
    v = np.concatenate([np.eye(3), -np.eye(3)]) * R0
    faces = [[a, b, c] for a in (0, 3) for b in (1, 4) for c in (2, 5)]
    mesh = trimesh.Trimesh(v, faces, process=False)
    mesh.fix_normals()
    return mesh


def test_composited_colours_sample_the_inward_normal_and_weight_like_the_renderer():
    """Six vertices on the density ball with radial normals: each is asked at the 16 `sample_depths` along
    -n from START outside it and gets the hand-composited colour. A seventh vertex on the scene ball's
    edge, normal pointing in, looks out: its ray still counts samples up to 2·START (past the vertex),
    meets no density and keeps the vertex's own albedo."""
    from text23d.export.mesh import composited_colors

    axes = torch.cat([torch.eye(3), -torch.eye(3)])
    verts = torch.cat([axes * R0, torch.tensor([[BALL, 0.0, 0.0]])])
    normals = torch.cat([axes, torch.tensor([[-1.0, 0.0, 0.0]])])
    asked = []

    def density(p):
        asked.append(p.clone())
        return ball_density(p)

    out = composited_colors(density, radial_albedo, verts, normals, BALL, START)
    colour, t = expected_head_on_colour()
    t = torch.tensor(t, dtype=torch.float32)
    torch.testing.assert_close(out[:6], torch.tensor(colour, dtype=torch.float32).expand(6, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[6], torch.tensor([BALL, 1 - BALL, 0.25]), atol=1e-6, rtol=0)
    pts = torch.cat(asked).view(7, 16, 3)
    for i in range(6):
        want = (R0 + START) * axes[i] - axes[i] * t[:, None]
        torch.testing.assert_close(pts[i], want, atol=1e-6, rtol=0)
    want = torch.zeros(16, 3)
    want[:, 0] = BALL - START + t
    torch.testing.assert_close(pts[6], want, atol=1e-6, rtol=0)


def test_surface_colours_of_a_mesh_composite_along_its_vertex_normals():
    """surface_colors on a mesh: the octahedron's vertices get the hand-composited head-on colour."""
    from text23d.export.mesh import surface_colors

    mesh = octahedron()
    np.testing.assert_allclose(np.abs(mesh.vertex_normals), np.abs(mesh.vertices) / R0, atol=1e-12)
    out = surface_colors(ball_density, radial_albedo, mesh, BALL, START)
    assert out.dtype == np.float32 and out.shape == (6, 3)
    np.testing.assert_allclose(out, np.broadcast_to(expected_head_on_colour()[0], (6, 3)), atol=1e-5)


def test_an_opaque_black_skin_composites_to_black_never_below_zero():
    """Density 1e4 (α = 1 in float32) with albedo 0 in a thin skin that holds only the first sample inside
    and 1 beneath it: the colour is the skin's, and the transmittance behind an opaque sample stays
    positive (1e-10), so the colour is not pushed below 0."""
    from text23d.export.mesh import composited_colors

    def albedo(p):
        return (p.norm(dim=-1) <= 0.28).float()[:, None].expand(-1, 3)

    out = composited_colors(lambda p: 1e4 * (p.norm(dim=-1) < R0).float(), albedo,
                            torch.tensor([[R0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]), BALL, START)
    assert (out >= 0).all() and (out < 1e-6).all()


def test_composited_colours_stay_on_the_points_device_also_for_no_points():
    """No points give a (0, 3) result on their device; points on "meta" are sampled on "meta"."""
    from text23d.export.mesh import composited_colors

    meta = torch.device("meta")
    empty = composited_colors(ball_density, radial_albedo, torch.zeros(0, 3, device=meta),
                              torch.zeros(0, 3, device=meta), BALL, START)
    assert empty.shape == (0, 3) and empty.device == meta
    seen = []

    def probe(p):
        seen.append(p.device)
        raise Stop

    with pytest.raises(Stop):
        composited_colors(probe, radial_albedo, torch.zeros(2, 3, device=meta), torch.ones(2, 3, device=meta),
                          BALL, START)
    assert seen == [meta]


def test_surface_colours_query_the_field_modules_device_in_float32():
    """The mesh's float64 vertices and normals go to the device of the field's module as float32."""
    from text23d.export.mesh import surface_colors

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def density(self, p):
            self.seen.append((p.device, p.dtype))
            raise Stop

    probe = Probe().to("meta")
    with pytest.raises(Stop):
        surface_colors(probe.density, radial_albedo, octahedron(), BALL, START)
    assert probe.seen == [(torch.device("meta"), torch.float32)]
