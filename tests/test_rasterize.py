"""The torch rasteriser against closed forms: coverage, depth order and perspective-correct
interpolation, checked with rays cast from the same cameras the volume renderer uses."""
import math

import torch

from text23d.cameras.sampler import Cameras, get_rays, look_at
from text23d.renderers.rasterize import barycentrics, interpolate, project, rasterize


def camera(position, fovy_deg=50.0):
    pos = torch.tensor([position], dtype=torch.float32)
    return Cameras(look_at(pos), torch.tensor([math.radians(fovy_deg)]), torch.zeros(1), torch.zeros(1),
                   pos.norm(dim=-1), pos.clone())


def hit_plane(cams, res, point, normal):
    """Where each pixel's ray meets the plane (point, normal): (H, W, 3), and the ray parameter."""
    o, d = (x[0] for x in get_rays(cams, res, res))
    n, p = torch.tensor(normal), torch.tensor(point)
    t = ((p - o) * n).sum(-1) / (d * n).sum(-1)
    return o + t[..., None] * d, t


def test_a_triangle_covers_the_pixels_whose_rays_hit_it_and_interpolates_exact_positions():
    # A tilted triangle: depth varies across it, so screen-space (not perspective-correct)
    # interpolation would put the interpolated positions off the plane.
    verts = torch.tensor([[0.3, -0.6, -0.5], [-0.4, 0.7, -0.4], [0.2, 0.1, 0.6]])
    faces = torch.tensor([[0, 1, 2]])
    cams, res = camera([2.0, 0.3, 0.4]), 48
    face_id = rasterize(verts, faces, cams, res, res)
    normal = torch.linalg.cross(verts[1] - verts[0], verts[2] - verts[0])
    hit, t = hit_plane(cams, res, verts[0].tolist(), normal.tolist())
    # inside test of the ray's hit point, in 3D: same side of all three edges
    def side(a, b):
        return (torch.linalg.cross((b - a).expand_as(hit), hit - a, dim=-1) * normal).sum(-1)
    inside = (side(verts[0], verts[1]) > 0) & (side(verts[1], verts[2]) > 0) & (side(verts[2], verts[0]) > 0)
    covered = face_id[0] == 0
    assert covered.sum() > 200
    assert (covered != inside).sum() <= 2  # pixel centres on an edge may go either way
    bary = barycentrics(verts, faces, face_id, cams)
    pos = interpolate(verts, faces, face_id, bary)[0]
    both = covered & inside
    assert torch.allclose(pos[both], hit[both], atol=1e-4)
    assert torch.allclose(bary[0][covered].sum(-1), torch.ones(int(covered.sum())), atol=1e-5)
    assert (face_id[0][~covered] == -1).all() and (pos[~covered] == 0).all()


def test_the_nearer_triangle_wins_whatever_the_order():
    quad = lambda x: torch.tensor([[x, -0.5, -0.5], [x, 0.5, -0.5], [x, 0.0, 0.6]])  # noqa: E731
    verts = torch.cat([quad(-0.3), quad(0.3)])  # the second is nearer the camera at +x
    cams = camera([2.5, 0.0, 0.0])
    for faces, nearer in ((torch.tensor([[0, 1, 2], [3, 4, 5]]), 1), (torch.tensor([[3, 4, 5], [0, 1, 2]]), 0)):
        face_id = rasterize(verts, faces, cams, 32, 32)
        assert (face_id[0][face_id[0] >= 0] == nearer).all()
        _, depth = project(verts, cams, 32, 32)
        pos = interpolate(verts, faces, face_id, barycentrics(verts, faces, face_id, cams))[0]
        assert torch.allclose(pos[face_id[0] >= 0][:, 0], torch.full((int((face_id[0] >= 0).sum()),), 0.3))


def test_a_closed_mesh_covers_its_silhouette_and_gradients_reach_vertices():
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    verts = torch.tensor(sphere.vertices, dtype=torch.float32, requires_grad=True)
    faces = torch.tensor(sphere.faces)
    cams, res = camera([0.0, -2.0, 0.5], fovy_deg=40.0), 64
    face_id = rasterize(verts, faces, cams, res, res)
    o, d = (x[0] for x in get_rays(cams, res, res))
    b = (o * d).sum(-1)
    hits_ball = b * b - ((o * o).sum(-1) - 0.5**2) > 0
    covered = face_id[0] >= 0
    assert (covered != hits_ball).float().mean() < 0.02  # the icosphere is slightly inside the ball
    # every covered pixel shows the front half: the visible point faces the camera
    pos = interpolate(verts, faces, face_id, barycentrics(verts, faces, face_id, cams))
    assert ((pos[0][covered] * (o[covered] - pos[0][covered])).sum(-1) > 0).all()
    pos.sum().backward()
    assert verts.grad.abs().sum() > 0


def _icosphere(radius=0.5, subdivisions=2):
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces)


def test_soft_silhouette_is_the_mask_away_from_edges_and_blends_across_them():
    from text23d.renderers.rasterize import silhouette_alpha

    verts, faces = _icosphere()
    cams, res = camera([0.0, -2.0, 0.3], fovy_deg=40.0), 48
    face_id = rasterize(verts, faces, cams, res, res)
    alpha = silhouette_alpha(verts, faces, cams, face_id, band=1.0)
    hard = (face_id >= 0).float()
    assert alpha[0, res // 2, res // 2] == 1.0 and alpha[0, 0, 0] == 0.0  # centre and corner untouched
    edge = (alpha - hard).abs() > 1e-3
    assert 0 < edge.sum() < 0.2 * res * res  # only a band along the outline
    assert ((alpha > 0.5) == (hard > 0.5)).float().mean() > 0.99


def test_silhouette_gradient_matches_finite_differences():
    from text23d.renderers.rasterize import silhouette_alpha

    verts, faces = _icosphere(subdivisions=1)
    cams, res = camera([0.0, -2.0, 0.3], fovy_deg=40.0), 32
    weight = torch.rand(1, res, res, generator=torch.Generator().manual_seed(0))
    face_id = rasterize(verts, faces, cams, res, res)  # fixed topology: the soft part is smooth in verts

    def loss(v):
        return (silhouette_alpha(v, faces, cams, face_id, band=1.5) * weight).sum()

    v = verts.clone().requires_grad_(True)
    loss(v).backward()
    # Rasterisation has rare true discontinuities (an edge turning into a contour, an edge hidden
    # by the surface); a coordinate whose forward and backward differences disagree straddles one
    # within h and is not a test of the gradient, so it is skipped. All others must agree.
    h, base, checked = 2e-4, loss(verts).item(), 0
    for k in range(len(verts)):
        for axis in range(3):
            d = torch.zeros_like(verts)
            d[k, axis] = h
            forward, backward = (loss(verts + d).item() - base) / h, (base - loss(verts - d).item()) / h
            if abs(forward - backward) > 0.05 * max(abs(forward), abs(backward), 1.0):
                continue
            checked += 1
            fd, ad = 0.5 * (forward + backward), v.grad[k, axis].item()
            assert abs(fd - ad) <= 0.1 + 0.03 * abs(fd), (k, axis, fd, ad)
    assert checked >= 0.9 * 3 * len(verts), checked
    assert v.grad.abs().max() > 1e-2  # silhouette vertices really get a gradient


def test_gradient_descent_moves_a_mesh_onto_a_target_silhouette():
    from text23d.renderers.rasterize import silhouette_alpha

    verts, faces = _icosphere(radius=0.35)
    cams, res = camera([0.0, -2.0, 0.0], fovy_deg=40.0), 32
    target_verts = verts * torch.tensor([1.3, 1.0, 0.8]) + torch.tensor([0.15, 0.0, -0.1])
    target = (rasterize(target_verts, faces, cams, res, res) >= 0).float()
    offset = torch.zeros(3, requires_grad=True)
    scale = torch.ones(3, requires_grad=True)
    opt = torch.optim.Adam([offset, scale], lr=0.02)

    def iou():
        m = rasterize(verts * scale + offset, faces, cams, res, res) >= 0
        return ((m & (target > 0)).sum() / (m | (target > 0)).sum()).item()

    start = iou()
    for _ in range(150):
        v = verts * scale + offset
        alpha = silhouette_alpha(v, faces, cams, rasterize(v, faces, cams, res, res), band=1.5)
        loss = ((alpha - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start < 0.7 and iou() > 0.92, (start, iou())


# ---------------------------------------------------------------------------------------------
# Screen-space rasterisation against a plain per-pixel, per-triangle reference (float64). Vertex
# coordinates are multiples of 1/4, so the float32 edge functions are exact and pixel centres that
# lie exactly on an edge are decided the same way by both.

def _reference_raster(xy, depth, faces, height, width, near=1e-3):
    """Face ids (B, H, W): per pixel, the triangle nearest to the camera (1/z interpolated
    linearly in screen space) among those whose closed interior holds the pixel centre; ties go
    to the highest face id. Also the smallest depth gap between the two nearest candidates of
    any pixel (to check that a scene has no near-ties)."""
    xy, depth = xy.double(), depth.double()
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    out = torch.full((xy.shape[0], height, width), -1, dtype=torch.long)
    gap = math.inf
    for bi in range(xy.shape[0]):
        zs = []
        for fi, (i, j, k) in enumerate(faces.tolist()):
            (ax, ay), (bx, by), (cx, cy) = xy[bi, i].tolist(), xy[bi, j].tolist(), xy[bi, k].tolist()
            za, zb, zc = depth[bi, i].item(), depth[bi, j].item(), depth[bi, k].item()
            area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
            if min(za, zb, zc) <= near or abs(area) <= 1e-12:
                zs.append(torch.full((height, width), math.inf, dtype=torch.float64))
                continue
            la = ((cx - bx) * (ys - by) - (cy - by) * (xs - bx)) / area
            lb = ((ax - cx) * (ys - cy) - (ay - cy) * (xs - cx)) / area
            lc = ((bx - ax) * (ys - ay) - (by - ay) * (xs - ax)) / area
            z = 1.0 / (la / za + lb / zb + lc / zc)
            zs.append(torch.where((la >= 0) & (lb >= 0) & (lc >= 0) & (z > near), z, math.inf))
        zs = torch.stack(zs)  # (F, H, W)
        for py in range(height):
            for px in range(width):
                col = zs[:, py, px]
                hits = torch.isfinite(col).nonzero().flatten().tolist()
                if not hits:
                    continue
                best = min(col[f].item() for f in hits)
                out[bi, py, px] = max(f for f in hits if col[f].item() == best)
                rest = sorted(col[f].item() for f in hits)
                if len(rest) > 1:
                    gap = min(gap, rest[1] - rest[0])
    return out, gap


def _scene_screen():
    """Two views (B = 2) of 7 separate triangles on a 10 x 12 image: off-screen past the left and
    top borders, past the right border (nearest of all), past the bottom border, one with pixel
    centres exactly on each of its three edges, two that pass through each other (depths 1..5
    against 2.5), one with a vertex behind the near plane. The second view is the mirror image
    of the first (so every triangle is also drawn with the other winding)."""
    tris = [
        ([(-2.25, -1.5), (4.25, -0.75), (-1.5, 5.25)], (3.0, 3.0, 3.0)),
        ([(9.25, 1.25), (14.5, 2.0), (9.75, 4.75)], (1.0, 1.0, 1.0)),
        ([(3.25, 7.25), (7.75, 7.5), (5.25, 12.5)], (1.5, 1.5, 1.5)),
        ([(0.5, 6.5), (3.5, 6.5), (0.5, 9.5)], (2.0, 2.0, 2.0)),
        ([(5.25, 1.25), (9.75, 2.5), (5.5, 6.75)], (1.25, 3.0, 5.0)),
        ([(4.75, 2.25), (9.25, 1.75), (8.25, 6.25)], (2.5, 2.5, 2.5)),
        ([(7.75, 8.25), (11.75, 8.25), (9.75, 10.75)], (2.0, 2.0, 5e-4)),
    ]
    xy0 = torch.tensor([p for t, _ in tris for p in t])
    depth0 = torch.tensor([z for _, d in tris for z in d])
    xy1 = torch.stack([12.0 - xy0[:, 0], xy0[:, 1]], -1)
    faces = torch.arange(3 * len(tris)).view(-1, 3)
    return torch.stack([xy0, xy1]), torch.stack([depth0, depth0]), faces


def test_rasterize_screen_matches_a_per_pixel_reference_at_borders_edges_and_crossings():
    from text23d.renderers.rasterize import rasterize_screen

    xy, depth, faces = _scene_screen()
    face_id = rasterize_screen(xy, depth, faces, 10, 12)
    ref, gap = _reference_raster(xy, depth, faces, 10, 12)
    assert gap > 1e-3  # no pixel where two triangles are within float32 noise of a depth tie
    assert face_id.shape == (2, 10, 12) and face_id.dtype == torch.long
    assert torch.equal(face_id, ref), (face_id != ref).nonzero().tolist()
    # the scene exercises what it should: every border drawn, on-edge centres drawn, both
    # triangles of the crossing pair visible, and the triangle behind the near plane never
    for bi in range(2):
        f = face_id[bi]
        assert (f[:, 0] >= 0).any() and (f[:, -1] >= 0).any() and (f[0] >= 0).any() and (f[-1] >= 0).any()
        assert (f == 4).any() and (f == 5).any() and not (f == 6).any()
    assert face_id[0, 6, 0] == 3 and face_id[0, 6, 3] == 3 and face_id[0, 7, 2] == 3 and face_id[0, 9, 0] == 3


def test_rasterize_screen_returns_an_empty_batch_of_images_when_nothing_is_in_view():
    from text23d.renderers.rasterize import rasterize_screen

    xy = torch.tensor([[[-5.0, 1.0], [-1.0, 2.0], [-3.0, 6.0], [2.0, 2.0], [6.0, 2.0], [4.0, 6.0]]]).repeat(2, 1, 1)
    xy[1, :3, 0] += 30.0  # the second view: past the right border
    depth = torch.tensor([[2.0, 2.0, 2.0, 2.0, -1.0, 2.0]]).repeat(2, 1)  # the on-screen one is behind
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    face_id = rasterize_screen(xy, depth, faces, 7, 9)
    assert face_id.shape == (2, 7, 9) and face_id.dtype == torch.long
    assert (face_id == -1).all()


def test_a_small_triangle_over_a_single_pixel_centre_is_drawn_in_both_windings():
    from text23d.renderers.rasterize import rasterize_screen

    tri = torch.tensor([[5.25, 3.25], [5.75, 3.25], [5.5, 3.75]])  # twice-area 0.25, holds (5.5, 3.5) only
    for xy in (tri, tri.flip(0)):
        face_id = rasterize_screen(xy[None], torch.full((1, 3), 2.0), torch.tensor([[0, 1, 2]]), 6, 8)
        expected = torch.full((1, 6, 8), -1)
        expected[0, 3, 5] = 0
        assert torch.equal(face_id, expected)


def test_the_degenerate_area_cut_off_is_exclusive():
    """A triangle with a vertex on the pixel centre (0.5, 0.5): drawn when its doubled area is
    above the degenerate cut-off 1e-12 (in float32), skipped at the cut-off itself."""
    from text23d.renderers.rasterize import rasterize_screen

    cut = torch.tensor(1e-12, dtype=torch.float32).item()
    for area, drawn in ((cut, False), (2 * cut, True)):
        # (1.5, 1.5) lies on the line through the first and third vertex, beyond the third: float32
        # edge functions round it onto the triangle, only the bounding box keeps it out. A second
        # triangle, behind the camera, reaches far past the image.
        xy = torch.tensor([[[0.0, 0.0], [2 * area, 0.0], [0.5, 0.5], [7.0, 7.0], [8.0, 7.0], [7.0, 8.0]]])
        depth = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
        face_id = rasterize_screen(xy, depth, torch.tensor([[0, 1, 2], [3, 4, 5]]), 2, 2)
        assert face_id[0, 0, 0].item() == (0 if drawn else -1)
        assert (face_id.flatten()[1:] == -1).all()


def test_a_sliver_does_not_leak_past_its_bounding_box():
    """A sliver whose long axis points at the pixel centre (0.5, 0.5), which lies outside it (and
    outside its bounding box, which starts at pixel 1): float32 edge functions put that centre on
    the triangle's edges, so only the bounding box keeps it out."""
    from fractions import Fraction

    from text23d.renderers.rasterize import rasterize_screen

    xy = torch.tensor([[[1.3738491535186768, 1.2936885356903076], [3.8635787963867188, 3.5550286769866943],
                        [3.863579273223877, 3.5550291538238525]]], dtype=torch.float32)
    # exactly (rational arithmetic on the float32 values), the centre (0.5, 0.5) is outside
    a, b, c = ([Fraction(v) for v in p] for p in xy[0].tolist())
    p = [Fraction(1, 2), Fraction(1, 2)]
    def edge(u, v, q):
        return (v[0] - u[0]) * (q[1] - u[1]) - (v[1] - u[1]) * (q[0] - u[0])
    area = edge(a, b, c)
    assert not all(w * area >= 0 for w in (edge(b, c, p), edge(c, a, p), edge(a, b, p)))
    face_id = rasterize_screen(xy, torch.full((1, 3), 2.0), torch.tensor([[0, 1, 2]]), 5, 5)
    assert face_id[0, 0, 0] == -1
    assert (face_id[0, 0] == -1).all() and (face_id[0, :, 0] == -1).all()


def test_the_near_plane_of_rasterize_screen():
    from text23d.renderers.rasterize import rasterize_screen

    xy = torch.tensor([[[0.25, 0.25], [5.75, 0.25], [0.25, 5.75]]])
    faces = torch.tensor([[0, 1, 2]])
    # close triangles are drawn with the default near plane (1e-3)
    for z in (0.5, 0.01):
        assert (rasterize_screen(xy, torch.full((1, 3), z), faces, 6, 6) == 0).sum() == 21
    # a vertex on the near plane is not in front of it: the triangle is skipped
    depth = torch.tensor([[0.5, 3.0, 3.0]])
    assert (rasterize_screen(xy, depth, faces, 6, 6, near=0.5) == -1).all()
    assert (rasterize_screen(xy, depth, faces, 6, 6, near=0.49) == 0).sum() == 21


def _axis_camera(distance, height=20, fovy=2 * math.atan(0.5)):
    """A camera on the -y axis looking at the origin: camera x = world x, camera y = world z,
    depth = world y + distance, focal length 0.5·H/tan(fovy/2) (20 px for H = 20)."""
    pos = torch.tensor([[0.0, -distance, 0.0]])
    return Cameras(look_at(pos), torch.tensor([fovy]), torch.zeros(1), torch.zeros(1), pos.norm(dim=-1), pos.clone())


def test_project_closed_form_including_vertices_nearer_than_one_unit():
    cams = _axis_camera(1.0)
    verts = torch.tensor([[0.1, -0.5, 0.2], [-0.3, 0.5, 0.15], [0.02, -0.99, -0.01], [0.0, -2.0, 0.0]])
    xy, depth = project(verts, cams, 20, 26)
    assert xy.shape == (1, 4, 2) and depth.shape == (1, 4)
    assert torch.allclose(depth[0], torch.tensor([0.5, 1.5, 0.01, -1.0]), atol=1e-6)
    # x = X/depth·f + W/2, y = -Z/depth·f + H/2 with f = 20
    expected = torch.tensor([[0.1 / 0.5 * 20 + 13, -0.2 / 0.5 * 20 + 10],
                             [-0.3 / 1.5 * 20 + 13, -0.15 / 1.5 * 20 + 10],
                             [0.02 / 0.01 * 20 + 13, 0.01 / 0.01 * 20 + 10]])
    assert torch.allclose(xy[0, :3], expected, atol=1e-3)


def test_rasterize_default_and_explicit_near_plane():
    cams = _axis_camera(1.0)
    verts = torch.tensor([[-0.1, -0.5, -0.1], [0.1, -0.5, -0.1], [0.0, -0.5, 0.1]])  # depth 0.5
    faces = torch.tensor([[0, 1, 2]])
    assert (rasterize(verts, faces, cams, 20, 20) == 0).sum() > 10
    assert (rasterize(verts, faces, cams, 20, 20, near=0.4) == 0).sum() > 10
    assert (rasterize(verts, faces, cams, 20, 20, near=0.6) == -1).all()


def test_barycentrics_on_a_non_square_image_match_ray_plane_intersections():
    verts = torch.tensor([[0.3, -0.6, -0.5], [-0.4, 0.7, -0.4], [0.2, 0.1, 0.6]])
    faces = torch.tensor([[0, 1, 2]])
    cams, height, width = camera([2.0, 0.3, 0.4]), 18, 30
    face_id = rasterize(verts, faces, cams, height, width)
    covered = face_id[0] == 0
    assert covered.sum() > 50
    bary = barycentrics(verts, faces, face_id, cams)
    assert bary.shape == (1, height, width, 3)
    o, d = (x[0].double() for x in get_rays(cams, height, width))
    v = verts.double()
    n = torch.linalg.cross(v[1] - v[0], v[2] - v[0])
    t = ((v[0] - o) * n).sum(-1) / (d * n).sum(-1)
    hit = o + t[..., None] * d
    # barycentrics of the hit point by sub-triangle areas (signed, along the normal)
    def area(p, q, r):
        return (torch.linalg.cross(*torch.broadcast_tensors(q - p, r - p), dim=-1) * n).sum(-1)
    total = area(v[0], v[1], v[2])
    ref = torch.stack([area(hit, v[1], v[2]), area(v[0], hit, v[2]), area(v[0], v[1], hit)], -1) / total
    assert torch.allclose(bary[0][covered].double(), ref[covered], atol=1e-4)
    assert (bary[0][~covered] == 0).all()


def test_barycentrics_screen_in_half_precision():
    from text23d.renderers.rasterize import barycentrics_screen, rasterize_screen

    xy = torch.tensor([[[2.25, 1.75], [33.5, 6.25], [9.75, 30.5]]])
    depth = torch.tensor([[1.0, 2.0, 4.0]])
    faces = torch.tensor([[0, 1, 2]])
    face_id = rasterize_screen(xy, depth, faces, 32, 36)
    full = barycentrics_screen(xy, depth, faces, face_id)
    half = barycentrics_screen(xy.half(), depth.half(), faces, face_id)
    assert half.dtype == torch.float16 and (face_id >= 0).sum() > 300
    assert torch.isfinite(half).all()
    assert torch.allclose(half.float(), full, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# The soft silhouette against a plain per-pixel reference (float64, Python loops) of the rule in
# `silhouette_alpha`'s docstring, for a camera on the -y axis (closed-form projection).

def _reference_silhouette(verts, faces, distance, face_id, height, width, band, focal=20.0):
    """alpha (H, W) and the smallest margin, over the (pixel, edge) pairs the rule looks at, by
    which an edge point's depth misses the visibility bound (so a scene can check that it has no
    pixel where float32 noise could flip the decision)."""
    P = verts.double().tolist()
    depth = [p[1] + distance for p in P]
    sx = [p[0] / max(z, 1e-8) * focal + 0.5 * width for p, z in zip(P, depth)]
    sy = [-p[2] / max(z, 1e-8) * focal + 0.5 * height for p, z in zip(P, depth)]
    thirds = {}
    for tri in faces.tolist():
        for k in range(3):
            i, j, o = tri[k], tri[(k + 1) % 3], tri[(k + 2) % 3]
            thirds.setdefault((min(i, j), max(i, j)), []).append(o)

    def side(i, j, o):
        return (sx[j] - sx[i]) * (sy[o] - sy[i]) - (sy[j] - sy[i]) * (sx[o] - sx[i])
    contour = [(i, j) for (i, j), th in thirds.items()
               if depth[i] > 1e-3 and depth[j] > 1e-3 and (len(th) == 1 or side(i, j, th[0]) * side(i, j, th[1]) > 0)]

    def seen(f, u, v):  # depth along the pixel's ray of face f's plane (camera space, looking down -z)
        q = [(P[i][0], P[i][2], -depth[i]) for i in faces[f].tolist()]
        e1, e2 = [q[1][k] - q[0][k] for k in range(3)], [q[2][k] - q[0][k] for k in range(3)]
        n = [e1[1] * e2[2] - e1[2] * e2[1], e1[2] * e2[0] - e1[0] * e2[2], e1[0] * e2[1] - e1[1] * e2[0]]
        d = [(u - 0.5 * width) / focal, -(v - 0.5 * height) / focal, -1.0]
        return sum(n[k] * q[0][k] for k in range(3)) / sum(n[k] * d[k] for k in range(3))
    alpha = torch.zeros(height, width, dtype=torch.float64)
    margin = math.inf
    for py in range(height):
        for px in range(width):
            u, v, fid = px + 0.5, py + 0.5, int(face_id[py, px])
            hard = 1.0 if fid >= 0 else 0.0
            nearest = math.inf
            for i, j in contour:
                ex, ey = sx[j] - sx[i], sy[j] - sy[i]
                t = min(max(((u - sx[i]) * ex + (v - sy[i]) * ey) / max(ex * ex + ey * ey, 1e-12), 0.0), 1.0)
                dist = math.hypot(u - sx[i] - t * ex, v - sy[i] - t * ey)
                if dist >= band:
                    continue
                if fid >= 0:
                    bound = seen(fid, u, v) * 1.01 + 1e-4
                    edge_depth = depth[i] + t * (depth[j] - depth[i])
                    margin = min(margin, abs(edge_depth - bound))
                    if edge_depth > bound:
                        continue
                nearest = min(nearest, dist)
            if nearest < band:
                w = nearest / band
                alpha[py, px] = 0.5 + 0.5 * (2 * hard - 1) * (1.5 * w - 0.5 * w**3)
            else:
                alpha[py, px] = hard
    return alpha, margin


def _rectangle(x0, x1, z0, z1, y=0.0, first=0):
    """A flat rectangle in the plane y (facing the -y camera) as two triangles whose shared
    diagonal (1, 3) has vertex 0 as the third vertex of its second face."""
    v = torch.tensor([[x0, y, z0], [x1, y, z0], [x1, y, z1], [x0, y, z1]])
    return v, torch.tensor([[1, 2, 3], [0, 1, 3]]) + first


def _check_silhouette(verts, faces, distance, height, width, band=None, min_changed=1):
    from text23d.renderers.rasterize import silhouette_alpha

    cams = _axis_camera(distance, height)
    face_id = rasterize(verts, faces, cams, height, width)
    if band is None:
        alpha, band = silhouette_alpha(verts, faces, cams, face_id), 1.0  # the default band
    else:
        alpha = silhouette_alpha(verts, faces, cams, face_id, band=band)
    ref, margin = _reference_silhouette(verts, faces, distance, face_id[0], height, width, band)
    assert margin > 1e-4  # no visibility decision within float32 noise
    assert alpha.shape == (1, height, width)
    assert torch.allclose(alpha[0].double(), ref, atol=2e-4), (alpha[0].double() - ref).abs().max()
    assert ((ref - (face_id[0] >= 0).double()).abs() > 1e-3).sum() >= min_changed  # a band is there
    return face_id[0], alpha[0], ref


def test_soft_silhouette_of_a_close_rectangle_and_a_sub_pixel_triangle_matches_the_reference():
    # 6 mm in front of the camera: depths far below 1, where the visibility bound's absolute
    # 1e-4 is larger than its relative 1 %.
    s = 0.003
    rect, rect_faces = _rectangle(-0.37 * s, 0.29 * s, -0.31 * s, 0.23 * s)
    tiny = torch.tensor([[-7.7, 0.0, 5.6], [-7.1, 0.0, 5.5], [-7.5, 0.0, 4.9]]) * (s / 10)  # edges < 1 px
    verts = torch.cat([rect, tiny])
    faces = torch.cat([rect_faces, torch.tensor([[4, 5, 6]])])
    face_id, alpha, ref = _check_silhouette(verts, faces, 2 * s, 20, 24, band=1.5, min_changed=40)
    assert (face_id == 0).any() and (face_id == 1).any()
    assert alpha[10, 11] == 1.0 and alpha[0, 0] == 0.0
    assert (ref[3:7, 2:7] > 1e-3).any()  # the sub-pixel triangle has its own soft outline


def test_soft_silhouette_at_the_image_borders_with_the_default_band():
    # a rectangle just larger than the 20 x 24 image: x in [-0.25, 24.7], y in [-0.4, 20.3] px
    f, w, h = 20.0, 24, 20
    x0, x1, z1, z0 = ((-0.25 - w / 2) * 2 / f, (24.7 - w / 2) * 2 / f, -(-0.4 - h / 2) * 2 / f, -(20.3 - h / 2) * 2 / f)
    verts, faces = _rectangle(x0, x1, z0, z1)
    face_id, alpha, ref = _check_silhouette(verts, faces, 2.0, h, w, min_changed=40)
    assert (face_id >= 0).all()
    assert (alpha[:, 0] < 1).all() and (alpha[0] < 1).all() and (alpha[-1] < 1).all() and (alpha[1:-1, -1] == 1).all()


def test_soft_silhouette_ignores_edges_hidden_behind_the_surface():
    # face 0 and 1: a rectangle at depth 1.6; faces 2 and 3: a larger one at depth 2.4 behind it
    # whose right side and parts of its top and bottom pass behind the first
    front, front_faces = _rectangle(-0.25, 0.2, -0.2, 0.22, y=-0.4)
    back, back_faces = _rectangle(-0.6, 0.03, -0.35, 0.1, y=0.4, first=4)
    verts, faces = torch.cat([front, back]), torch.cat([front_faces, back_faces])
    face_id, alpha, ref = _check_silhouette(verts, faces, 2.0, 20, 24, band=1.5, min_changed=40)
    assert (face_id == 0).any() and (face_id == 2).any()
    # where the back rectangle's right side runs behind the front one, no blending: the hard mask
    # (at x = 12.25 px from y = 9.2 px down, behind the front one, which spans y in [7.25, 12.5])
    patch = face_id[9:11, 11:13]
    assert ((patch == 0) | (patch == 1)).all() and (patch == 0).sum() >= 3 and (alpha[9:11, 11:13] == 1).all()


def test_soft_silhouette_of_a_tilted_rectangle():
    # depth from 1.9 to 2.2 across the rectangle: the outline is visible all round
    verts = torch.tensor([[-0.3, -0.1, -0.25], [0.25, 0.05, -0.3], [0.3, 0.2, 0.2], [-0.25, 0.0, 0.3]])
    faces = torch.tensor([[1, 2, 3], [0, 1, 3]])
    _check_silhouette(verts, faces, 2.0, 20, 24, band=1.5, min_changed=40)


def test_soft_silhouette_of_a_fold_whatever_the_face_order():
    # two flaps hinged on (1, 2), both on the right of the hinge in the image: the hinge is a
    # silhouette edge (a fold), found whichever face comes first
    verts = torch.tensor([[0.35, 0.0, 0.05], [0.0, 0.0, 0.3], [0.0, 0.0, -0.3], [0.3, 0.6, -0.08]])
    for faces in (torch.tensor([[0, 1, 2], [1, 2, 3]]), torch.tensor([[1, 2, 3], [0, 1, 2]])):
        face_id, alpha, ref = _check_silhouette(verts, faces, 2.0, 20, 24, band=1.5, min_changed=20)
        assert alpha[10, 11] < 0.5 and alpha[10, 12] > 0.5  # either side of the hinge at x = 12


def test_soft_silhouette_edge_on_faces_make_no_silhouette():
    # a fan around a degenerate face (1, 3, 2) whose three vertices are collinear in 3D (on the
    # image row y = 10): its edges are inner edges of the fan with the degenerate face's third
    # vertex on them, on neither side: no fold
    verts = torch.tensor([[0.0, 0.0, 0.3], [-0.3, 0.0, 0.0], [0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, -0.3]])
    faces = torch.tensor([[1, 2, 0], [2, 3, 0], [3, 1, 4], [1, 3, 2]])
    face_id, alpha, ref = _check_silhouette(verts, faces, 2.0, 20, 24, band=1.0, min_changed=20)
    assert (alpha[9:11, 11:13] == 1).all()  # across the line of the degenerate face: the hard mask


def test_soft_silhouette_skips_edges_with_an_end_behind_the_camera():
    # the triangle crosses the camera plane, so it is not drawn; its one edge in front still
    # gets the outer half of a band
    verts = torch.tensor([[-0.3, 0.0, -0.1], [0.3, 0.0, 0.2], [0.0, -2.5, 0.0]])
    faces = torch.tensor([[0, 1, 2]])
    face_id, alpha, ref = _check_silhouette(verts, faces, 2.0, 20, 24, band=1.5, min_changed=20)
    assert (face_id == -1).all() and alpha.max() > 0.2


def test_soft_silhouette_in_double_precision_matches_single():
    """For gradient checks in float64: the soft silhouette follows the vertices' dtype."""
    from text23d.renderers.rasterize import silhouette_alpha

    verts, faces = _rectangle(-0.37, 0.29, -0.31, 0.23)
    cams = _axis_camera(2.0)
    face_id = rasterize(verts, faces, cams, 20, 24)
    single = silhouette_alpha(verts, faces, cams, face_id, band=1.5)
    cams64 = Cameras(*(getattr(cams, f).double() for f in cams.__dataclass_fields__))
    double = silhouette_alpha(verts.double(), faces, cams64, face_id, band=1.5)
    assert double.dtype == torch.float64 and ((single > 0) & (single < 1)).sum() > 20
    assert torch.allclose(double.float(), single, atol=1e-5)


def test_soft_silhouette_edges_with_an_end_on_the_near_plane_are_skipped():
    # the camera 1e-3 (float32) from the plane y = 0: a triangle with two vertices there has no
    # edge wholly in front of the near plane, so no band; 1e-4 further away, it has one all round
    from text23d.renderers.rasterize import silhouette_alpha

    near = torch.tensor(1e-3, dtype=torch.float32).item()
    for distance, banded in ((near, False), (near + 1e-4, True)):
        cams = _axis_camera(distance)
        verts = torch.tensor([[-2e-4, 0.0, 0.0], [2e-4, 0.0, 0.0], [0.0, 1e-3, 3e-4]])
        faces = torch.tensor([[0, 1, 2]])
        _, depth = project(verts, cams, 20, 24)
        assert (depth[0, :2] == near).all() == (not banded)
        face_id = rasterize(verts, faces, cams, 20, 24)
        alpha = silhouette_alpha(verts, faces, cams, face_id, band=1.5)
        assert torch.equal(alpha, (face_id >= 0).float()) == (not banded)
