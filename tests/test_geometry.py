import pytest
import torch

from text23d.errors import ConfigError
from text23d.geometry.base import Geometry
from text23d.geometry.grid import DenseGrid
from text23d.geometry.nerf import NeRFMLP

from tests.helpers import check_settings


def test_grid_interpolation_matches_grid_sample():
    torch.manual_seed(0)
    g = DenseGrid(resolution=9, radius=1.0)
    with torch.no_grad():
        g.density_grid.normal_()
        g.albedo_grid.normal_()
    x = torch.rand(500, 3) * 2 - 1
    dens, alb = g.raw(x)
    R = 9
    vol = torch.cat([g.density_grid.view(1, 1, R, R, R), g.albedo_grid.t().reshape(1, 3, R, R, R)], 1)
    ref = torch.nn.functional.grid_sample(vol, x.view(1, -1, 1, 1, 3), align_corners=True).view(4, -1).t()
    assert torch.allclose(dens, ref[:, 0], atol=1e-5)
    assert torch.allclose(alb, ref[:, 1:], atol=1e-5)


def _autograd_normals(g, pts, density):
    """−∇density / |∇density| by autograd through `density` (points (N, 3) -> (N,))."""
    p = pts.clone().requires_grad_(True)
    grad, = torch.autograd.grad(density(p).sum(), p)
    return -torch.nn.functional.normalize(grad, dim=-1)


def _grid_sample_density(g):
    """The raw trilinear density by torch's grid_sample (an independent implementation)."""
    R = g.resolution
    vol = g.density_grid.view(1, 1, R, R, R)
    return lambda p: torch.nn.functional.grid_sample(vol, (p / g.radius).view(1, -1, 1, 1, 3),
                                                     align_corners=True).view(-1)


def test_grid_analytic_normals_match_autograd_of_grid_sample_per_component():
    """A random field at unit scale, no blob: each component of the hand-written gradient against
    autograd of grid_sample (x and z swapped, or one axis's weights wrong, is off by O(1))."""
    torch.manual_seed(0)
    g = DenseGrid(resolution=9, radius=1.5, blob_density=0.0)
    with torch.no_grad():
        g.density_grid.normal_()
    pts = (torch.rand(400, 3) * 2 - 1) * 1.4
    want = _autograd_normals(g, pts, _grid_sample_density(g))
    assert (g.normals(pts) - want).abs().max() < 1e-4


def test_grid_normals_with_the_blob_match_autograd_of_the_density():
    """Field and blob of comparable size: the blob's term and the grid's scale to world units both count."""
    torch.manual_seed(1)
    g = DenseGrid(resolution=12, radius=1.5, blob_density=4.0, blob_radius=0.8)
    with torch.no_grad():
        g.density_grid.normal_()
    pts = torch.rand(300, 3) * 2.4 - 1.2
    want = _autograd_normals(g, pts, g.density)
    assert (g.normals(pts) - want).abs().max() < 1e-4
    # The finite differences of the base class approximate the same normals on a smooth field.
    with torch.no_grad():
        R = 12
        zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, R)] * 3, indexing="ij")
        g.density_grid.copy_((3 * xx - 2 * yy + zz).flatten())
    cosine = (Geometry.normals(g, pts) * _autograd_normals(g, pts, g.density)).sum(-1)
    assert cosine.min() > 0.999


def test_nerf_normals_of_the_initial_blob_point_outward():
    g = NeRFMLP(n_freqs=2, hidden=16, layers=2)
    with torch.no_grad():
        g.mlp[-1].weight.zero_()
        g.mlp[-1].bias.zero_()
    pts = torch.nn.functional.normalize(torch.randn(50, 3), dim=-1) * 0.3
    assert ((g.normals(pts) * pts / 0.3).sum(-1) > 0.99).all()


def test_gradients_reach_the_grid_through_density_albedo_and_normals():
    g = DenseGrid(resolution=8)
    pts = torch.rand(64, 3) - 0.5
    d, a = g(pts)
    (d.sum() + a.sum() + g.normals(pts).sum()).backward()
    assert g.density_grid.grad.abs().sum() > 0 and g.albedo_grid.grad.abs().sum() > 0


def test_grid_density_and_albedo_alone_equal_the_joint_lookup():
    torch.manual_seed(0)
    g = DenseGrid(resolution=12, radius=1.5)
    with torch.no_grad():
        g.density_grid.normal_()
        g.albedo_grid.normal_()
    pts = torch.rand(300, 3) * 3 - 1.5
    dens, alb = g(pts)
    # The joint lookup divides points by the radius and multiplies back, which can move a point by
    # one ulp: a few ulps of the density (up to ~15) are allowed, a wrong lookup is off by O(1).
    assert torch.allclose(g.density(pts), dens, rtol=1e-6, atol=1e-5)
    assert torch.allclose(g.albedo(pts), alb, rtol=1e-6, atol=1e-6)


def test_grid_defaults_and_accepted_resolutions():
    g = DenseGrid()
    assert g.resolution == 64 and g.density_grid.shape == (64**3,) and g.albedo_grid.shape == (64**3, 3)
    assert set(g.state_dict()) == {"density_grid", "albedo_grid"}  # the corner offsets are not saved
    assert DenseGrid(resolution=2).density_grid.shape == (8,)
    with pytest.raises(ConfigError, match="resolution=1"):
        check_settings(DenseGrid, resolution=1)


def test_grid_points_outside_the_box_read_the_border():
    """No blob: density and albedo are the grid's alone. The 8 corners of the box read the 8 corner
    entries (x fastest), and a point outside reads the nearest border point, normals included."""
    torch.manual_seed(0)
    R, r = 5, 1.5
    g = DenseGrid(resolution=R, radius=r, blob_density=0.0)
    with torch.no_grad():
        g.density_grid.normal_()
        g.albedo_grid.normal_()
    corners = torch.tensor([[x, y, z] for z in (-r, r) for y in (-r, r) for x in (-r, r)])
    flat = [(z * R + y) * R + x for z in (0, R - 1) for y in (0, R - 1) for x in (0, R - 1)]
    soft, sig = torch.nn.functional.softplus, torch.sigmoid
    assert torch.allclose(g.density(corners), soft(g.density_grid[flat]), atol=1e-6)
    assert torch.allclose(g.albedo(corners), sig(g.albedo_grid[flat]), atol=1e-6)
    assert torch.allclose(g(corners * 3)[0], soft(g.density_grid[flat]), atol=1e-6)
    outside = torch.rand(400, 3) * 6 * r - 3 * r
    outside = outside[(outside.abs() > r).any(-1)]
    border = outside.clamp(-r, r)
    for f in (g.density, g.albedo, g.normals):
        assert torch.allclose(f(outside), f(border), atol=1e-6), f


def test_geometry_defaults_and_refused_settings():
    g = DenseGrid(resolution=2)
    assert (g.radius, g.blob_density, g.blob_radius, g.normal_eps) == (1.0, 10.0, 0.5, 0.01)
    for bad in (dict(radius=0.0), dict(blob_radius=0.0), dict(normal_eps=0.0), dict(radius=-1.0)):
        with pytest.raises(ConfigError, match="must be a finite number > 0"):
            check_settings(DenseGrid, resolution=2, **bad)


class QuadraticField(Geometry):
    """σ = x + K·x·y (no blob): its tetrahedron finite differences have a closed form."""

    K = 100.0

    def forward(self, points):
        x, y = points[:, 0], points[:, 1]
        return x + self.K * x * y, torch.zeros_like(points)


def test_finite_difference_normals_follow_the_tetrahedron_stencil_in_the_points_precision():
    """With offsets ε·t_i (t_i the 4 corners of a tetrahedron: Σ t_i = 0, Σ t_i t_iᵀ = 4I, Σ t_x t_y t_i =
    (0, 0, 4)), Σ σ(p + ε t_i) ε t_i = 4ε²(1 + K y, K x, K ε) for σ = x + Kxy, worked by hand. In float64
    the normals match it to float64 rounding: the step ε must not pass through float32 on the way."""
    g = QuadraticField(normal_eps=0.01)
    p = torch.randn(20, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
    x, y = p[:, 0], p[:, 1]
    K, eps = QuadraticField.K, 0.01
    want = -torch.nn.functional.normalize(torch.stack([1 + K * y, K * x, torch.full_like(x, K * eps)], -1), dim=-1)
    n = g.normals(p)
    assert n.dtype == torch.float64
    assert (n - want).abs().max() < 1e-12
