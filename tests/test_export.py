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
