"""DMTet: the tet grid made in code, marching tetrahedra, initialisation from a density field, and
the mesh regularisers, against closed forms."""
import math

import pytest
import torch
import trimesh

from text23d.errors import ConfigError, Text23dError
from text23d.geometry.dmtet import DMTet, EDGES, _triangle_table, marching_tets, orient, tet_grid
from text23d.geometry.grid import DenseGrid
from text23d.ops import face_normals, laplacian, normal_consistency

from tests.helpers import check_settings


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
    assert min(info["box_half"]) > 0.4 and max(map(abs, info["box_centre"])) < 1e-6  # ... all of it
    assert mesh.is_watertight and mesh.volume == pytest.approx(4 / 3 * math.pi * 0.4**3, rel=0.1)  # the whole ball
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


def _volumes(verts, tets):
    """Signed volumes ·6 of tets, by the scalar triple product (not a determinant routine)."""
    p = verts[tets].double()
    a, b, c = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]
    return (a * torch.linalg.cross(b, c, dim=-1)).sum(-1)


def test_orient_swaps_the_last_two_vertices_of_negative_tets_only():
    gen = torch.Generator().manual_seed(0)
    verts = torch.randn(30, 3, generator=gen)
    tets = torch.stack([torch.randperm(30, generator=gen)[:4] for _ in range(200)])
    degenerate = torch.tensor([[0, 1, 2, 0]])  # a repeated vertex: zero volume, not negative
    tets = torch.cat([tets, degenerate])
    before = tets.clone()
    out = orient(verts, tets)
    assert torch.equal(tets, before)  # the input is not written to
    vol = _volumes(verts, before)
    neg = vol < 0
    assert 50 < neg.sum() < 150
    assert torch.equal(out[~neg], before[~neg])
    assert torch.equal(out[neg], before[neg][:, [0, 1, 3, 2]])
    assert (_volumes(verts, out[:-1]) > 0).all()


def _cut_polygon_area(points, normal):
    """Area of the convex polygon `points` (k, 3) lying in a plane of `normal`: the points ordered by
    angle around their centre, then the shoelace formula in the plane."""
    n = normal / normal.norm()
    u = torch.linalg.cross(n, torch.tensor([1.0, 0.3, 0.1], dtype=n.dtype), dim=-1)
    u = u / u.norm()
    v = torch.linalg.cross(n, u, dim=-1)
    d = points - points.mean(0)
    xy = torch.stack([d @ u, d @ v], -1)
    xy = xy[torch.atan2(xy[:, 1], xy[:, 0]).argsort()]
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs((x * y.roll(-1) - x.roll(-1) * y).sum().item())


def test_the_triangle_table_cuts_every_sign_pattern_once_and_faces_outward():
    """For each of the 16 inside/outside patterns (bit k: vertex k inside) on positively oriented tets
    other than the table's own reference one, with random SDF values of that pattern: the triangles use
    exactly the edges whose ends differ, cover the planar cut once (their areas add up to the cut
    polygon's, found independently), and face along the SDF's gradient, i.e. from inside to outside."""
    table, count = _triangle_table()
    assert table.shape == (16, 2, 3) and count.shape == (16,)
    assert table.dtype == torch.long and count.dtype == torch.long
    gen = torch.Generator().manual_seed(0)
    cube, kuhn = tet_grid(1)
    shapes = [cube[t].double() for t in kuhn]  # the 6 tets of a cube
    for _ in range(4):  # and random ones, oriented by the test itself
        p = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        if _volumes(p, torch.arange(4)[None])[0] < 0:
            p = p[[0, 1, 3, 2]]
        shapes.append(p)
    for p in shapes:
        for case in range(16):
            inside = [(case >> k) & 1 for k in range(4)]
            s = torch.rand(4, generator=gen, dtype=torch.float64) * 0.9 + 0.1
            s = torch.where(torch.tensor(inside).bool(), -s, s)
            crossing = {e for e, (a, b) in enumerate(EDGES) if inside[a] != inside[b]}
            assert count[case] == {0: 0, 3: 1, 4: 2}[len(crossing)], case
            tris = table[case, :count[case]].tolist()
            assert all(len(set(t)) == 3 and set(t) <= crossing for t in tris), (case, tris)
            assert {e for t in tris for e in t} == crossing, (case, tris)
            if not crossing:
                continue
            # the linear interpolant of s over the tet: s(x) = g·x + c, its zero set the cut plane
            g = torch.linalg.solve(torch.cat([p, torch.ones(4, 1, dtype=p.dtype)], 1), s)[:3]
            q = {e: p[a] + s[a] / (s[a] - s[b]) * (p[b] - p[a]) for e, (a, b) in enumerate(EDGES) if e in crossing}
            area = 0.0
            for t in tris:
                n = torch.linalg.cross(q[t[1]] - q[t[0]], q[t[2]] - q[t[0]], dim=-1)
                assert (n @ g) > 0.999 * n.norm() * g.norm(), (case, t)  # outward, in the cut plane
                area += 0.5 * n.norm().item()
            assert area == pytest.approx(_cut_polygon_area(torch.stack(list(q.values())), g), rel=1e-9), case


def test_a_vertex_exactly_on_the_surface_counts_as_outside():
    """SDF < 0 is inside: a tet that only touches the zero set at one vertex has no surface, and a
    tet with one vertex inside and one at zero gets one triangle through that vertex."""
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    tets = torch.tensor([[0, 1, 2, 3]])
    v, f = marching_tets(verts, tets, torch.tensor([0.0, 1, 1, 1]))
    assert len(f) == 0
    v, f = marching_tets(verts, tets, torch.tensor([-1.0, 0, 1, 1]))
    assert f.shape == (1, 3)
    corners = sorted(v[f[0]].tolist())
    assert corners == [[0.0, 0.0, 0.5], [0.0, 0.5, 0.0], [1.0, 0.0, 0.0]]  # edge midpoints and vertex 1


def test_defaults_and_construction():
    """The documented defaults (32 cubes per axis, a sphere of radius 0.5, deformation up to half a cell),
    the accepted resolutions, and a state dict of the trainable parts only (the grid is made in code)."""
    g = DMTet()
    assert g.resolution == 32 and g.max_deform == 0.5
    assert torch.allclose(g.sdf, g.grid.norm(dim=-1) - 0.5)
    assert DMTet(resolution=2).tets.shape == (48, 4)
    for bad in (1, 2.0, "8"):
        with pytest.raises(ConfigError):
            check_settings(DMTet, resolution=bad)
    g = DMTet(resolution=4, radius=2.0, sphere_radius=0.7)
    assert set(g.state_dict()) == {"box", "sdf", "deform"}
    verts, _ = tet_grid(4)
    assert torch.allclose(g.grid, verts * 2.0)  # the scene box [-2, 2]³, centred
    assert torch.allclose(g.sdf, verts.norm(dim=-1) * 2.0 - 0.7)  # world distance to the sphere


def test_vertices_move_at_most_the_given_fraction_of_a_cell():
    g = DMTet(resolution=4, radius=1.5, max_deform=0.3)
    with torch.no_grad():
        g.deform.fill_(math.atanh(0.5))
        g.deform[0] = -100.0
    moved = g.vertices() - g.grid
    cell = 2 * 1.5 / 4
    assert torch.allclose(moved[1:], torch.full_like(moved[1:], 0.5 * 0.3 * cell))
    assert torch.allclose(moved[0], torch.full((3,), -0.3 * cell))


def test_albedo_comes_from_the_colour_field():
    torch.manual_seed(0)
    color = DenseGrid(resolution=6)
    with torch.no_grad():
        color.albedo_grid.normal_()
    pts = torch.rand(50, 3) * 2 - 1
    assert torch.equal(DMTet(resolution=2, color=color).albedo(pts), color.albedo(pts))
    with pytest.raises(ConfigError, match="no colour field"):
        DMTet(resolution=2).albedo(pts)


def test_the_grid_cache_keeps_the_four_latest_resolutions():
    """Grids are shared while cached, and at most 4 resolutions stay cached (the oldest goes first)."""
    from text23d.geometry import dmtet

    dmtet._TET_GRIDS.clear()
    first = tet_grid(1)
    assert tet_grid(1) is first  # shared, not rebuilt
    latest = [tet_grid(n) for n in (2, 3, 4, 5)]
    assert all(tet_grid(n) is g for n, g in zip((2, 3, 4, 5), latest))  # the four latest are kept
    again = tet_grid(1)  # the fifth resolution pushed the oldest out: rebuilt, equal
    assert again is not first and torch.equal(again[1], first[1])


class StepBall:
    """Density `inside` within |p − centre| < r, `outside` elsewhere (a step: no level in between)."""

    def __init__(self, centre, r, inside=10.0, outside=0.0):
        self.centre, self.r, self.inside, self.outside = torch.tensor(centre), r, inside, outside

    def __call__(self, p):
        return torch.where((p - self.centre).norm(dim=-1) < self.r, self.inside, self.outside)


def test_the_box_spans_the_object_with_a_ten_percent_margin_and_two_cells():
    """An off-centre ball in a scene of radius 2 at 16 cubes per axis (cell 0.25): the scene-grid vertices
    inside it reach ±2 cells = ±0.5 from its centre, so the box is centred on it with half extent
    0.5·1.1 + 2·0.25 = 1.05 (worked by hand)."""
    centre = [0.5, -0.25, 0.25]
    info = DMTet(resolution=16, radius=2.0).init_from_density(StepBall(centre, 0.6), threshold=5.0)
    assert info["box_centre"] == pytest.approx(centre, abs=1e-6)
    assert info["box_half"] == pytest.approx([1.05] * 3, abs=1e-5)
    assert info["mesh_faces"] > 0


def test_a_density_exactly_at_the_level_counts_as_outside():
    """A ball of density 10 in a field that is exactly the level (5) elsewhere: only the ball is the object,
    so the box stays tight (scene-grid vertices inside reach ±0.25: half 0.25·1.1 + 2·0.25) and the mesh
    is the ball's surface, not nothing."""
    g = DMTet(resolution=8)
    info = g.init_from_density(StepBall([0.0, 0.0, 0.0], 0.4, outside=5.0), threshold=5.0)
    assert info["box_half"] == pytest.approx([0.775] * 3, abs=1e-5)
    v, f = g.mesh()
    cell = 2 * 0.775 / 8
    assert trimesh.Trimesh(v.detach().numpy(), f.numpy(), process=False).is_watertight
    assert v.abs().max() < 0.4 + cell  # crossings on edges from the ball's vertices to their neighbours


def test_the_initial_sdf_is_the_log_density_ratio_clamped_to_one():
    """σ = level·exp(k(r0 − |p|)), so log(σ / level) = k(r0 − |p|): the SDF at each vertex of the fitted grid
    is k(|p| − r0) clamped to [−1, 1] (|SDF| ≥ 1e-4). The level is below 1 and the field spans beyond both
    clamps, so the densities < 1 and both bounds count."""
    level, k, r0 = 0.1, 6.0, 0.5
    g = DMTet(resolution=8)
    g.init_from_density(lambda p: level * torch.exp(k * (r0 - p.norm(dim=-1))), threshold=level)
    r = g.grid.double().norm(dim=-1)
    want = (k * (r - r0)).clamp(-1, 1)
    want = torch.where(want < 0, -want.abs().clamp_min(1e-4), want.abs().clamp_min(1e-4))
    assert want.min() == -1 and want.max() == 1 and ((want.abs() > 0.05) & (want.abs() < 0.95)).sum() > 20
    assert (g.sdf.detach().double() - want).abs().max() < 1e-5
    assert (g.deform == 0).all()


def test_a_density_above_the_level_everywhere_leaves_no_surface():
    """Nothing but inside: the grid's box is the scene and marching tetrahedra finds no surface. Without a
    stage name the messages say "this stage"."""
    with pytest.raises(Text23dError, match="^this stage: marching tetrahedra found no surface"):
        DMTet(resolution=4).init_from_density(lambda p: torch.full((len(p),), 10.0), threshold=1.0)
    with pytest.raises(Text23dError, match="^this stage: the earlier stage's density never exceeds"):
        DMTet(resolution=4).init_from_density(lambda p: torch.zeros(len(p)), threshold=1.0)


def test_a_mesh_without_a_colour_field_asks_for_one_and_grids_never_do():
    """What a stage reads to give a mesh geometry the previous stage's colours: DMTet without a
    colour field needs one and colours itself with nothing of its own; with one, that field colours
    it. An implicit field has its own colours and starts from a copy of its own kind."""
    bare, field = DMTet(resolution=2), DenseGrid(resolution=2)
    coloured = DMTet(resolution=2, color=field)
    assert bare.needs_colour_field and not coloured.needs_colour_field
    assert bare.colour_field() is bare and coloured.colour_field() is field
    assert not field.needs_colour_field and field.colour_field() is field
    assert DMTet.needs_previous == {"density"} and DenseGrid.needs_previous == frozenset()


def test_a_quad_is_split_along_the_diagonal_from_its_lowest_crossing_edge():
    """Where two vertices are inside, four edges cross and their points form a quad, split into two
    triangles along a diagonal. Either diagonal is a valid surface, but not the same one (the four
    points are rarely coplanar), and the table is fixed: a trained DMTet's checkpoint must give the
    same mesh in every version. The diagonal joins the lowest-numbered crossing edge to the one
    opposite it (sharing no tet vertex)."""
    table, count = _triangle_table()
    quads = [case for case in range(16) if count[case] == 2]
    assert quads == [3, 5, 6, 9, 10, 12]
    for case in quads:
        inside = [(case >> k) & 1 for k in range(4)]
        crossing = [e for e, (a, b) in enumerate(EDGES) if inside[a] != inside[b]]
        first = crossing[0]
        [opposite] = [e for e in crossing if not set(EDGES[e]) & set(EDGES[first])]
        tris = [set(t.tolist()) for t in table[case]]
        assert tris[0] & tris[1] == {first, opposite}, (case, tris)
