"""The volume renderer against closed-form answers for an analytic density."""
import math

import pytest
import torch

from text23d.cameras.sampler import Cameras, RandomCameraSampler, look_at
from text23d.errors import ConfigError
from text23d.geometry.base import Geometry
from text23d.geometry.grid import DenseGrid
from text23d.renderers.background import Background
from text23d.renderers.volume import VolumeRenderer
from text23d.systems import losses


class ConstantBall(Geometry):
    """Density `sigma` inside a ball of radius r, 0 outside; red albedo."""

    def __init__(self, sigma: float, r: float):
        super().__init__(radius=1.0)
        self.sigma, self.r = sigma, r

    def forward(self, points):
        inside = (points.norm(dim=-1) < self.r).float()
        albedo = torch.tensor([1.0, 0.0, 0.0]).expand(points.shape[0], 3)
        return self.sigma * inside, albedo


def front_camera(distance=3.0, fovy=0.01):
    pos = torch.tensor([[distance, 0.0, 0.0]])
    return Cameras(look_at(pos), torch.tensor([fovy]), torch.zeros(1), torch.zeros(1),
                   torch.tensor([distance]), pos.clone())


def render_centre(sigma, r, n=4096, bg=(0.0, 0.0, 1.0)):
    renderer = VolumeRenderer(radius=1.0, num_samples=n)
    out = renderer(ConstantBall(sigma, r), Background("solid", bg), front_camera(), 1, 1)
    return out


def test_opacity_matches_beer_lambert():
    for sigma, r in [(0.5, 0.5), (2.0, 0.3), (10.0, 0.5)]:
        out = render_centre(sigma, r)
        expected = 1 - math.exp(-sigma * 2 * r)
        assert abs(out["opacity"].item() - expected) < 2e-3, (sigma, r)


def test_depth_is_the_expected_termination_distance():
    sigma, r, d = 2.0, 0.5, 3.0
    out = render_centre(sigma, r)
    L = 2 * r
    # mean of an exponential(sigma) truncated to [0, L], measured from where the ray enters
    mean_in = 1 / sigma - L * math.exp(-sigma * L) / (1 - math.exp(-sigma * L))
    assert abs(out["depth"].item() - (d - r + mean_in)) < 5e-3


@pytest.mark.parametrize("distance", [1.0, 0.8])
def test_a_camera_on_or_inside_the_scene_sphere_integrates_from_the_camera(distance):
    """ProlificDreamer's cameras come as close as 1.0 at radius 1: on the bounding sphere. The ray
    must start at the camera (not at the sphere's far side or nowhere): through a ball that fills the
    scene, opacity is 1 − exp(−σ·(d + 1)); looking away from the centre, 1 − exp(−σ·(1 − d))."""
    sigma = 0.5
    renderer = VolumeRenderer(radius=1.0, num_samples=4096)
    out = renderer(ConstantBall(sigma, 1.0), Background("solid", (0.0, 0.0, 1.0)), front_camera(distance), 1, 1)
    assert abs(out["opacity"].item() - (1 - math.exp(-sigma * (distance + 1)))) < 2e-3
    pos = torch.tensor([[distance, 0.0, 0.0]])
    away = Cameras(look_at(pos, torch.tensor([[2.0, 0.0, 0.0]])), torch.tensor([0.01]), torch.zeros(1),
                   torch.zeros(1), torch.tensor([distance]), pos.clone())
    out = renderer(ConstantBall(sigma, 1.0), Background("solid", (0.0, 0.0, 1.0)), away, 1, 1)
    assert abs(out["opacity"].item() - (1 - math.exp(-sigma * (1 - distance)))) < 2e-3


def test_colour_is_composited_over_the_background():
    out = render_centre(2.0, 0.5)
    o = out["opacity"].item()
    assert torch.allclose(out["comp_rgb"][0, 0, 0], torch.tensor([o, 0.0, 1 - o]), atol=1e-5)


def test_rays_that_miss_the_scene_see_only_background():
    renderer = VolumeRenderer(radius=1.0, num_samples=32)
    cams = front_camera(distance=3.0, fovy=2.5)  # wide: corners miss the unit sphere
    out = renderer(ConstantBall(5.0, 0.5), Background("solid", (0, 1, 0)), cams, 9, 9)
    assert out["opacity"][0, 0, 0].item() == 0.0
    assert torch.allclose(out["comp_rgb"][0, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert out["opacity"][0, 4, 4].item() > 0.9


def test_blob_normals_point_outward_and_orientation_loss_is_zero_for_them():
    from text23d.geometry.grid import DenseGrid
    g = DenseGrid(resolution=32, blob_density=200.0)  # opaque: back faces carry ~no weight
    pts = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1) * 0.3
    n = g.normals(pts)
    assert (n * pts / 0.3).sum(-1).min() > 0.95
    renderer = VolumeRenderer(radius=1.0, num_samples=32)
    out = renderer(g, Background("solid"), front_camera(fovy=0.5), 8, 8, shading="lambertian")
    good = losses.orientation(out["weights"], out["normals"], out["dirs"]).item()
    flipped = losses.orientation(out["weights"], -out["normals"], out["dirs"]).item()
    assert good < 5e-3 and flipped > 50 * good, (good, flipped)


def test_loss_weight_schedules():
    assert losses.scheduled(3, 100) == 3.0
    ramp = [0, 10.0, 1000.0, 5000]
    assert losses.scheduled(ramp, 0) == 10.0
    assert losses.scheduled(ramp, 2500) == 505.0
    assert losses.scheduled(ramp, 9999) == 1000.0


class CountingGrid(DenseGrid):
    """A real dense grid that records how many points colour was looked up for."""

    def albedo(self, points):
        self.albedo_points = points.shape[0]
        return super().albedo(points)


def test_skipping_invisible_samples_changes_neither_image_nor_gradient():
    torch.manual_seed(0)
    grid = CountingGrid(resolution=16)
    with torch.no_grad():
        grid.density_grid.normal_(0, 2)
        grid.albedo_grid.normal_()
    cams = RandomCameraSampler().sample(2)
    outs, grads = [], []
    for skip in (0.0, 1e-4):
        grid.zero_grad()
        out = VolumeRenderer(num_samples=48, skip_weight=skip)(
            grid, Background("solid", (1.0, 1.0, 1.0)), cams, 12, 12, shading="lambertian")
        (out["comp_rgb"] * torch.linspace(0, 1, 3)).sum().backward()
        outs.append((out, grid.albedo_points))
        grads.append(torch.cat([grid.density_grid.grad, grid.albedo_grid.grad.flatten()]))
    (full, n_full), (skipped, n_skipped) = outs
    assert n_skipped < 0.6 * n_full  # most samples are empty space or hidden
    assert (full["comp_rgb"] - skipped["comp_rgb"]).abs().max() < 5e-3
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999


def test_bad_skip_weight_is_refused():
    with pytest.raises(ConfigError, match="skip_weight=1.5"):
        VolumeRenderer(skip_weight=1.5)
