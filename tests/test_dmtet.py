"""DMTet: the tet grid made in code, marching tetrahedra, initialisation from a density field, and
the mesh regularisers, against closed forms."""
import math

import pytest
import torch
import trimesh

from text23d.errors import Text23dError
from text23d.geometry.dmtet import DMTet, marching_tets, tet_grid
from text23d.geometry.mesh_ops import face_normals, laplacian, normal_consistency


def test_the_grid_fills_the_box_with_positive_tets():
    verts, tets = tet_grid(8)
    assert verts.shape == (9**3, 3) and tets.shape == (6 * 8**3, 4)
    p = verts[tets]
    vol = torch.linalg.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], 1)) / 6
    assert (vol > 0).all()
    assert math.isclose(vol.sum().item(), 8.0, rel_tol=1e-5)  # they tile [-1, 1]³ exactly
    assert tet_grid(32)[0].shape[0] == 35_937 and tet_grid(32)[1].shape[0] == 196_608


def test_marching_tets_of_a_sphere_is_closed_outward_and_the_right_size():
    verts, tets = tet_grid(24)
    sdf = verts.norm(dim=-1) - 0.6
    v, f = marching_tets(verts, tets, sdf)
    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.6**3, rel=0.03)  # > 0: faces point outward
    assert (v.norm(dim=-1) - 0.6).abs().max() < 0.02  # linear interpolation of an exact SDF


def test_surface_vertices_are_differentiable_in_sdf_and_positions():
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], requires_grad=True)
    tets = torch.tensor([[0, 1, 2, 3]])
    sdf = torch.tensor([-0.25, 0.75, 0.75, 0.75], requires_grad=True)  # vertex 0 inside
    v, f = marching_tets(verts, tets, sdf)
    assert f.shape == (1, 3)
    # the crossing on edge (0, 1) is a quarter of the way: (p0·0.75 + p1·0.25) / 1
    assert torch.allclose(v, torch.tensor([[0.25, 0, 0], [0, 0.25, 0], [0, 0, 0.25]]))
    n = face_normals(v, f)[0]
    assert (n * v.mean(0)).sum() > 0  # outward: away from the inside vertex at the origin
    v[0, 0].backward()
    # d/ds0 of s0/(s0 − s1) at s0 = -0.25, s1 = 0.75 is −s1/(s0 − s1)² = −0.75
    assert sdf.grad[0].item() == pytest.approx(-0.75) and verts.grad.abs().sum() > 0


class BlobWithFloater:
    """A ball of radius 0.4 at the centre and a small floater far away."""

    def __call__(self, p):
        main = 50 * (0.4 - p.norm(dim=-1))
        floater = 50 * (0.08 - (p - torch.tensor([0.7, 0.0, 0.6])).norm(dim=-1))
        return torch.nn.functional.softplus(torch.maximum(main, floater)) * 10


def test_initialised_from_density_without_floaters_in_a_tight_box():
    g = DMTet(resolution=24)
    info = g.init_from_density(BlobWithFloater(), threshold=5.0)
    v, f = g.mesh()
    mesh = trimesh.Trimesh(v.detach().numpy(), f.numpy(), process=False)
    assert len(mesh.split(only_watertight=False)) == 1  # the floater is gone
    assert (v.norm(dim=-1) - 0.4).abs().max() < 0.05  # the level set of the field
    assert max(info["box_half"]) < 0.6  # the grid now spans the object, not the scene
    with pytest.raises(Text23dError, match="fine: the earlier stage's density never exceeds"):
        DMTet(resolution=8).init_from_density(lambda p: torch.zeros(len(p)), threshold=1.0, stage="fine")


def test_regularisers_are_zero_for_smooth_surfaces_and_grow_with_noise():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    v, f = torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces)
    noisy = v + 0.03 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
    assert normal_consistency(noisy, f) > 5 * normal_consistency(v, f)
    assert laplacian(noisy, f) > 5 * laplacian(v, f)
    plane_v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    plane_f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    assert normal_consistency(plane_v, plane_f).item() == pytest.approx(0.0, abs=1e-6)
