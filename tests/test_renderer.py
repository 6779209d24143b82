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

from tests.helpers import check_settings


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
        check_settings(VolumeRenderer, skip_weight=1.5)


def test_ray_sphere_matches_the_quadratic_roots():
    """near/far/hit against the roots of |o + t·d|² = r², solved per ray in plain Python: rays from
    outside through the sphere, from inside, missing it, and with the sphere behind the origin."""
    from text23d.renderers.volume import ray_sphere

    g = torch.Generator().manual_seed(0)
    o = torch.randn(200, 3, generator=g) * 1.2
    d = torch.nn.functional.normalize(torch.randn(200, 3, generator=g), dim=-1)
    d[:50] = torch.nn.functional.normalize(-o[:50] + 0.3 * torch.randn(50, 3, generator=g), dim=-1)  # towards
    d[50:80] = -d[:30]  # away from it: the sphere is behind (or around) the origin
    radius = 0.9
    near, far, hit = ray_sphere(o, d, radius)
    kinds = set()
    for k in range(len(o)):
        ok, dk = o[k].tolist(), d[k].tolist()
        b = sum(x * y for x, y in zip(ok, dk))
        c = sum(x * x for x in ok) - radius * radius
        disc = b * b - c
        if disc <= 0:
            exp_hit, exp_near, exp_far = False, max(-b, 0.0), max(-b, 0.0)
        else:
            t0, t1 = -b - math.sqrt(disc), -b + math.sqrt(disc)
            exp_near, exp_far = max(t0, 0.0), max(t1, 0.0)
            exp_hit = t1 > 0
        kinds.add((exp_hit, c < 0, disc > 0))
        assert bool(hit[k]) == exp_hit, k
        if exp_hit:
            assert abs(near[k].item() - exp_near) < 1e-5 and abs(far[k].item() - exp_far) < 1e-5, k
    assert {(True, True, True), (True, False, True), (False, False, True), (False, False, False)} <= kinds


def test_shading_matches_the_per_sample_formula():
    """`shade` against DreamFusion's formula evaluated sample by sample, for every mode, with an
    ambient/diffuse pair that drives the light both below 0 and above 1 (the clamp must act)."""
    from text23d.renderers.volume import shade

    g = torch.Generator().manual_seed(1)
    n_pts = 64
    albedo = torch.rand(n_pts, 3, generator=g)
    normals = torch.nn.functional.normalize(torch.randn(n_pts, 3, generator=g), dim=-1)
    points = torch.randn(n_pts, 3, generator=g) * 0.5
    light = torch.randn(n_pts, 3, generator=g) * 2
    for ambient, diffuse in ((0.1, 0.9), (-0.3, 1.8)):
        for mode in ("albedo", "lambertian", "textureless", "normal"):
            out = shade(albedo, normals, points, light, mode, ambient, diffuse)
            assert out.shape == (n_pts, 3)
            for k in range(n_pts):
                nk, pk, lk = normals[k].tolist(), points[k].tolist(), light[k].tolist()
                if mode == "albedo":
                    expected = albedo[k].tolist()
                elif mode == "normal":
                    expected = [(x + 1) / 2 for x in nk]
                else:
                    v = [a - b for a, b in zip(lk, pk)]
                    norm = math.sqrt(sum(x * x for x in v))
                    cos = sum(x * y / norm for x, y in zip(nk, v))
                    lam = ambient + diffuse * max(cos, 0.0)
                    base = albedo[k].tolist() if mode == "lambertian" else [1.0, 1.0, 1.0]
                    expected = [min(max(x * lam, 0.0), 1.0) for x in base]
                assert torch.allclose(out[k], torch.tensor(expected), atol=1e-5), (mode, ambient, k)


def test_occupancy_grids_follow_the_renderer_settings():
    """make_occupancy: None when off; else a fresh grid over the renderer's box with the given settings."""
    from text23d.renderers.occupancy import OccupancyGrid

    assert VolumeRenderer(occupancy=None).make_occupancy() is None
    assert VolumeRenderer(occupancy={}).make_occupancy() is None
    renderer = VolumeRenderer(radius=1.5, occupancy={"resolution": 8, "threshold": 0.2})
    a, b = renderer.make_occupancy(), renderer.make_occupancy()
    assert isinstance(a, OccupancyGrid) and a is not b
    assert (a.radius, a.resolution, a.threshold) == (1.5, 8, 0.2)
    assert a.occupied.shape == (8**3,)


def test_defaults_are_the_documented_ones():
    """The constructor's defaults match conf/renderer/volume.yaml's shading and skip settings."""
    import yaml
    from pathlib import Path

    cfg = yaml.safe_load((Path(__file__).parents[1] / "conf/renderer/volume.yaml").read_text())
    r = VolumeRenderer()
    assert (r.ambient, r.diffuse, r.skip_weight) == (cfg["ambient"], cfg["diffuse"], cfg["skip_weight"])
    assert r.radius == 1.0 and r.occupancy is None
    assert r.sample_spacing == 2 * 1.0 / r.num_samples


def test_sample_count_and_skip_weight_bounds():
    """One sample per ray is the smallest allowed count (and renders the midpoint); skip_weight must lie
    in [0, 1); a refused count suggests the default (threestudio's 512)."""
    with pytest.raises(ConfigError, match="num_samples=0: must be an integer ≥ 1. Fix: e.g. renderer.num_samples=512"):
        check_settings(VolumeRenderer, num_samples=0)
    with pytest.raises(ConfigError, match="skip_weight=1"):
        check_settings(VolumeRenderer, skip_weight=1.0)
    VolumeRenderer(skip_weight=0.0)
    out = VolumeRenderer(num_samples=1)(ConstantBall(2.0, 0.5), Background("solid", (0, 0, 1)), front_camera(), 1, 1)
    assert abs(out["opacity"].item() - (1 - math.exp(-2.0 * 2.0))) < 1e-5  # σ over the whole 2-unit chord


def test_normals_are_computed_only_when_needed():
    """Albedo shading alone skips the normals (a finite-difference pass per sample); asking for them,
    or any shading that uses them, adds per-sample and composited normals."""
    geom, bg, cams = ConstantBall(2.0, 0.5), Background("solid"), front_camera()
    renderer = VolumeRenderer(num_samples=8)
    assert not {"normals", "comp_normal"} & set(renderer(geom, bg, cams, 1, 1))
    for kwargs in ({"need_normals": True}, {"shading": "lambertian"}, {"shading": "normal"}):
        out = renderer(geom, bg, cams, 1, 1, **kwargs)
        assert out["normals"].shape == (1, 8, 3) and out["comp_normal"].shape == (1, 1, 1, 3), kwargs


class OpaqueWall(Geometry):
    """Density `sigma` in the half-space x < x0, 0 elsewhere; grey albedo; outward normal +x everywhere."""

    def __init__(self, sigma: float = 1e4, x0: float = 0.2):
        super().__init__(radius=1.0)
        self.sigma, self.x0 = sigma, x0

    def forward(self, points):
        return self.sigma * (points[:, 0] < self.x0).float(), torch.full((points.shape[0], 3), 0.5)

    def normals(self, points):
        return torch.tensor([1.0, 0.0, 0.0]).expand(points.shape[0], 3)


def _sphere_span(o, d, radius=1.0):
    """near, far of rays o + t·d (unit d, o outside) through the sphere |x| = radius: the quadratic's roots."""
    b = (o * d).sum(-1)
    root = (b * b - (o * o).sum(-1) + radius**2).sqrt()
    return -b - root, -b + root


def test_weights_behind_an_opaque_sample_are_not_negative():
    """Once a sample is opaque (alpha = 1 in float32) the transmittance behind it is ~0, never below:
    the weights stay a distribution (≥ 0, summing to the opacity)."""
    out = VolumeRenderer(num_samples=16)(ConstantBall(1e4, 0.5), Background("solid"), front_camera(), 1, 1)
    w = out["weights"][0]
    first = 4  # samples at t = 2 + (i + 0.5)/8: the first inside |x| < 0.5 is i = 4 (t = 2.5625, x = 0.4375)
    assert w[first].item() == pytest.approx(1.0, abs=1e-6) and w[:first].abs().max() == 0
    assert w.min() >= 0 and w[first + 1:].max() < 1e-9
    assert out["opacity"].item() == pytest.approx(w.sum().item(), abs=1e-7)


def test_depth_and_normal_of_each_pixel_are_its_own():
    """Nine rays onto the wall x = 0.2 from the camera at x = 3: each pixel's depth is its own ray's
    entry distance (3 − 0.2)/(−d_x), to within one sample spacing, and its composited normal is the
    wall's +x times its opacity (≈ 1)."""
    n = 256
    out = VolumeRenderer(num_samples=n)(OpaqueWall(), Background("solid"), front_camera(fovy=0.4), 3, 3,
                                        need_normals=True)
    d = out["dirs"]
    entry = (3.0 - 0.2) / -d[:, 0]
    near, far = _sphere_span(torch.tensor([3.0, 0.0, 0.0]), d)
    depth = out["depth"]
    assert depth.shape == (1, 3, 3, 1) and out["opacity"].min() > 0.999
    assert entry.max() - entry.min() > 0.05  # the corners see the wall farther away than the centre
    gap = depth.reshape(-1) - entry
    assert (gap >= -1e-4).all() and (gap <= (far - near) / n + 1e-4).all(), gap
    want = torch.tensor([1.0, 0.0, 0.0]) * out["opacity"]
    assert out["comp_normal"].shape == (1, 3, 3, 3) and torch.allclose(out["comp_normal"], want, atol=1e-4)


def test_jitter_draws_an_independent_uniform_offset_for_every_sample_of_every_ray():
    """Stratified sampling: with jitter, sample i of a ray lies at near + (i + u)/n·(far − near) with u in
    [0, 1) drawn anew for each ray, sample and call; without, u = 1/2. u is recovered from the points."""
    torch.manual_seed(0)
    n, cam = 8, torch.tensor([3.0, 0.0, 0.0])
    renderer = VolumeRenderer(num_samples=n)

    def offsets(**kwargs):
        out = renderer(ConstantBall(1.0, 0.5), Background("solid"), front_camera(fovy=0.3), 2, 2, **kwargs)
        d = out["dirs"]
        near, far = _sphere_span(cam, d)
        t = ((out["points"] - cam) * d[:, None]).sum(-1)  # (4 rays, n)
        return (t - near[:, None]) / (far - near)[:, None] * n - torch.arange(n)

    assert torch.allclose(offsets(), torch.full((4, n), 0.5), atol=1e-3)
    u, v = offsets(jitter=True), offsets(jitter=True)
    assert u.shape == (4, n) and u.min() > -1e-3 and u.max() < 1 + 1e-3
    assert 0.2 < u.std() < 0.4  # uniform on [0, 1): std 0.29
    assert (u[1:] - u[0]).abs().amax(1).min() > 0.05  # each ray its own offsets
    assert (u - v).abs().max() > 0.05  # and each call


def test_a_sample_whose_weight_equals_skip_weight_is_still_shaded():
    """Colour is looked up where a sample's weight reaches skip_weight: with the threshold set to the
    smallest weight inside the ball, all 8 samples inside count and the red channel is the discrete opacity
    1 − exp(−8·σ·δ) = 1 − e^{−2} (σ = 2, δ = 2/16), exactly as without skipping."""
    geom, bg, cams = ConstantBall(2.0, 0.5), Background("solid", (0.0, 0.0, 1.0)), front_camera()
    w = VolumeRenderer(num_samples=16, skip_weight=0.0)(geom, bg, cams, 1, 1)["weights"][0]
    smallest = w[w > 0].min().item()
    assert (w > 0).sum() == 8 and smallest > 0.01
    out = VolumeRenderer(num_samples=16, skip_weight=smallest)(geom, bg, cams, 1, 1)
    assert out["comp_rgb"][0, 0, 0, 0].item() == pytest.approx(1 - math.exp(-2.0), abs=1e-6)
