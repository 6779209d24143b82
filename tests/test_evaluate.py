"""The evaluation's diversity measure: identical particles score as identical, different ones do not."""
import pytest
import torch

from helpers import compose_cfg
from text23d.builtin.evaluate import diversity, score_asset
from text23d.run import build_system


def two_particles(tmp_path):
    cfg = compose_cfg(["prompt=a red cube", "prior=builtin", "system=vsd", "system.num_particles=2",
                       f"output_dir={tmp_path}"])
    return build_system(cfg)


def views_of(system, i):
    return system.render_views(system.camera_sampler.orbit(8), 32, particle=i)


def test_identical_particles_have_no_diversity(tmp_path):
    system = two_particles(tmp_path)
    d = diversity([views_of(system, 0), views_of(system, 1)])
    assert d["n"] == 2 and d["pairwise_iou"] == pytest.approx(1.0) and d["pairwise_rgb_l1"] < 1e-6


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
