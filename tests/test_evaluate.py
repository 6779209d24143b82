"""The evaluation's diversity measure: identical particles score as identical, different ones do not."""
import numpy as np
import pytest
import torch

from helpers import compose_cfg
from text23d.builtin.evaluate import diversity, score_asset
from text23d.run import build_system


def two_particles(tmp_path):
    cfg = compose_cfg(["prompt=a red cube", "prior=builtin", "system=vsd", "system.stages=[nerf]", "system.num_particles=2",
                       f"output_dir={tmp_path}"])
    return build_system(cfg)


def views_of(system, i):
    return system.render_views(system.camera_sampler.orbit(8), 32, particle=i)


def test_identical_particles_have_no_diversity(tmp_path):
    system = two_particles(tmp_path)
    d = diversity([views_of(system, 0), views_of(system, 1)])
    assert d["n"] == 2 and d["pairwise_iou"] == pytest.approx(1.0) and d["pairwise_rgb_l1"] < 1e-6


@pytest.mark.slow  # 90 s; two particles are also exported and compared in test_vsd_run
def test_a_different_particle_is_measured_and_scored_on_its_own(tmp_path):
    system = two_particles(tmp_path)
    grid = system.particles[1].geometry
    with torch.no_grad():  # particle 1: the blob cut in half along x, and coloured red
        R = grid.resolution
        x = torch.linspace(-1, 1, R).view(1, 1, R).expand(R, R, R).flatten()
        grid.density_grid[x > 0] = -50.0
        grid.albedo_grid[:] = torch.tensor([5.0, -5.0, -5.0])
    d = diversity([views_of(system, 0), views_of(system, 1), views_of(system, 0)])
    assert d["n"] == 3 and d["min_pairwise_iou"] < 0.8 and d["pairwise_rgb_l1"] > 0.02
    assert score_asset(system, "sphere", "red", particle=1)["predicted_colour"] == "red"
    assert score_asset(system, "sphere", "red", particle=0)["predicted_colour"] != "red"


def test_diversity_needs_two_assets(tmp_path):
    with pytest.raises(ValueError, match="at least 2 assets, got 1"):
        diversity([views_of(two_particles(tmp_path), 0)])


# --- judging the exported mesh file ------------------------------------------------------------

def _saved(mesh, tmp_path, rgb, name):
    import numpy as np

    from text23d.export.mesh import save_mesh

    colours = np.tile(np.array([*(np.array(rgb) * 255).round(), 255], np.uint8), (len(mesh.vertices), 1))
    mesh.visual.vertex_colors = colours
    return save_mesh(mesh, str(tmp_path), name, ["glb"])["glb"]


def test_the_mesh_judge_reads_the_glb_and_tells_a_cube_from_a_barrel(tmp_path):
    import trimesh

    from text23d.builtin.data import COLOURS
    from text23d.builtin.evaluate import score_mesh
    from text23d.cameras.sampler import RandomCameraSampler

    sampler, scale = RandomCameraSampler(), 0.52
    cube = trimesh.creation.box(extents=[2 * 0.62 * scale] * 3)
    cube.apply_transform(trimesh.transformations.rotation_matrix(0.4, [0, 0, 1]))  # turned ~23°
    r = score_mesh(_saved(cube, tmp_path, COLOURS["blue"], "cube"), "cube", "blue", sampler)
    assert (r["predicted_shape"], r["predicted_colour"]) == ("cube", "blue") and r["iou"] > 0.85, r
    assert r["symmetry"] > r["symmetry_threshold"]
    # A barrel with the cube's height and the width of its diagonal and its face on average: its
    # silhouettes fit a cube rather well, but they do not change as it turns.
    barrel = trimesh.creation.cylinder(radius=0.62 * scale * 1.2, height=2 * 0.62 * scale, sections=64)
    r = score_mesh(_saved(barrel, tmp_path, COLOURS["blue"], "barrel"), "cube", "blue", sampler)
    assert r["predicted_shape"] != "cube" and r["symmetry"] < r["symmetry_threshold"], r
    cone = trimesh.creation.cone(radius=0.75 * scale, height=1.5 * scale, sections=64)
    cone.apply_translation([0, 0, -0.75 * scale])
    r = score_mesh(_saved(cone, tmp_path, COLOURS["black"], "cone"), "cone", "black", sampler)
    assert (r["predicted_shape"], r["predicted_colour"]) == ("cone", "black"), r


def test_section_symmetry_separates_the_true_primitives_at_any_turn_and_size():
    from text23d.builtin.evaluate import primitive_mesh, section_symmetry, section_symmetry_threshold

    threshold = section_symmetry_threshold()
    # Turns and scales the threshold was not computed from (it uses 0-75° in steps of 15 and the
    # data's two extreme scales).
    for shape in ("cube", "pyramid"):
        for turn in (7.0, 37.0, 83.0):
            value = section_symmetry(primitive_mesh(shape, 0.52, turn, resolution=64))
            assert 1.5 * threshold < value < 3 * threshold, (shape, turn, value, threshold)
    for shape in ("sphere", "cylinder", "cone", "torus"):
        value = section_symmetry(primitive_mesh(shape, 0.52, 0.0, resolution=64))
        assert value < 0.2 * threshold, (shape, value, threshold)


def test_section_symmetry_reads_a_rounded_box_as_cornered_and_one_odd_section_does_not_decide():
    import trimesh

    from text23d.builtin.evaluate import section_symmetry, section_symmetry_threshold

    threshold = section_symmetry_threshold()
    # A box whose vertical edges are rounded with a radius of a fifth of its half-width.
    rounded = trimesh.Trimesh(np.concatenate([
        trimesh.creation.cylinder(radius=0.06, height=0.6, sections=24).vertices + [sx * 0.18, sy * 0.18, 0]
        for sx in (-1, 1) for sy in (-1, 1)])).convex_hull
    assert section_symmetry(rounded) > threshold
    # A cylinder standing on a square plinth a fifth of its height: only the lowest section is
    # square, so the cylinder stays round (and the plinth alone would not make it a cube).
    cylinder = trimesh.creation.cylinder(radius=0.3, height=1.0, sections=96)
    plinth = trimesh.creation.box(extents=[0.62, 0.62, 0.25])
    plinth.apply_translation([0, 0, -0.5 + 0.125])
    assert section_symmetry(trimesh.util.concatenate([cylinder, plinth])) < 0.2 * threshold
    assert section_symmetry(cylinder) < 0.2 * threshold


def test_a_body_square_only_in_its_lower_half_is_not_cornered():
    """Sections must be read over the whole height: a box whose upper part is a cylinder (a generated
    cube that rounds off above half its height) is not a cube. Reading only the lower half (20, 35
    and 50 % of the height) would call it cornered."""
    import trimesh

    from text23d.builtin.evaluate import section_symmetry, section_symmetry_threshold

    box = trimesh.creation.box(extents=[0.6, 0.6, 0.45])
    box.apply_translation([0, 0, 0.225])
    top = trimesh.creation.cylinder(radius=0.3 * 1.13, height=0.55, sections=96)  # the box's area
    top.apply_translation([0, 0, 0.45 + 0.275])
    assert section_symmetry(trimesh.util.concatenate([box, top])) < section_symmetry_threshold()
    full = trimesh.creation.box(extents=[0.6, 0.6, 1.0])
    assert section_symmetry(full) > 1.5 * section_symmetry_threshold()
