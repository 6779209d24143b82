"""The torch hash grid indexes exactly as tiny-cuda-nn does (checked against a per-level reference
written with plain integers), so checkpoints move between the two implementations."""
import math
from types import SimpleNamespace

import pytest
import torch

from text23d import accel
from text23d.checkpoint import AtomicCheckpointIO
from text23d.errors import ConfigError
from text23d.geometry.base import Geometry
from text23d.geometry.hashgrid import HashEncoding, HashGrid, TcnnHashEncoding, level_layout

from tests.helpers import check_settings


def reference(params, u, n_levels, n_features, log2_table, base_resolution, per_level_scale):
    """One point at a time, one level at a time, uint32 arithmetic written out."""
    T, out, offset = 2**log2_table, [], 0
    primes = (1, 2654435761, 805459861)
    for l in range(n_levels):
        scale = 2.0 ** (l * math.log2(per_level_scale)) * base_resolution - 1.0
        res = math.ceil(scale) + 1
        size = -(-min(T, res**3) // 8) * 8
        pos = [float(c) * scale + 0.5 for c in u]
        p0 = [math.floor(p) for p in pos]
        f = [p - q for p, q in zip(pos, p0)]
        acc = [0.0] * n_features
        for c in range(8):
            g = [p0[k] + ((c >> k) & 1) for k in range(3)]
            w = 1.0
            for k in range(3):
                w *= f[k] if (c >> k) & 1 else 1 - f[k]
            if res**3 <= size:
                idx = (g[0] + g[1] * res + g[2] * res * res) % size
            else:
                h = 0
                for k in range(3):
                    h ^= (g[k] * primes[k]) & 0xFFFFFFFF
                idx = h % size
            for j in range(n_features):
                acc[j] += w * float(params[(offset + idx) * n_features + j])
        out += acc
        offset += size
    return torch.tensor(out)


def test_torch_encoding_matches_a_per_level_reference():
    args = dict(n_levels=6, n_features=2, log2_table=10, base_resolution=4, per_level_scale=2.0)
    enc = HashEncoding(**args)
    layout = level_layout(6, 10, 4, 2.0)
    assert [lv[4] for lv in layout] == [False, False, True, True, True, True]  # dense coarse, hashed fine
    with torch.no_grad():
        enc.params.normal_()
    u = torch.rand(40, 3, generator=torch.Generator().manual_seed(0))
    u[0] = 1.0  # the far corner: grid points at the resolution's edge wrap as in tcnn
    got = enc(u)
    want = torch.stack([reference(enc.params.detach(), p.tolist(), **args) for p in u])
    assert got.shape == (40, 12)
    assert torch.allclose(got, want.float(), atol=1e-5)


def test_tcnn_defaults_give_the_documented_grid():
    layout = level_layout(16, 19, 16, 1.447269)
    assert layout[-1][1] == 4096  # the finest level: 16 · 1.447^15 ≈ 4096
    assert [lv[4] for lv in layout[:5]] == [False] * 5 and all(lv[4] for lv in layout[5:])  # levels 0–4 dense
    params = (layout[-1][3] + layout[-1][2]) * 2
    assert 12.0e6 < params < 13.0e6  # ≈ 12.6 M


def test_hash_grid_geometry_trains_and_has_outward_blob_normals():
    g = HashGrid(n_levels=4, log2_table=12, base_resolution=8, implementation="torch")
    pts = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1) * 0.3
    assert ((g.normals(pts) * pts / 0.3).sum(-1) > 0.9).all()  # the Magic3D blob dominates at init
    d, a = g.density(pts), g.albedo(pts)
    (d.sum() + a.sum()).backward()
    assert g.encoding.params.grad.abs().sum() > 0 and a.min() >= 0 and a.max() <= 1


def test_finite_difference_normals_match_analytic_ones_on_a_field_without_the_blob():
    """Parameters at unit scale and no blob, so the hash grid's own field decides the normals. The
    field is piecewise smooth (trilinear cells, ReLU kinks): most points agree to a cosine of 0.99,
    a few straddle a kink; a wrong tetrahedron offset or sign turns the mean cosine far lower."""
    torch.manual_seed(0)
    args = dict(n_levels=4, log2_table=12, base_resolution=4, per_level_scale=1.5, implementation="torch",
                blob_density=0.0, normal_eps=1e-3)
    fd = randomised(HashGrid(**args))
    analytic = HashGrid(**args, normals="analytic")
    analytic.load_state_dict(fd.state_dict())
    pts = torch.rand(500, 3) * 1.6 - 0.8
    cosine = (fd.normals(pts) * analytic.normals(pts)).sum(-1)
    assert cosine.median() > 0.999 and (cosine > 0.99).float().mean() > 0.9, cosine.quantile(torch.tensor([0.1, 0.5]))
    # The analytic normals are autograd's gradient of the density itself.
    p = pts.clone().requires_grad_(True)
    grad, = torch.autograd.grad(analytic.density(p).sum(), p)
    assert torch.allclose(analytic.normals(pts), -torch.nn.functional.normalize(grad, dim=-1), atol=1e-6)


def test_tcnn_and_torch_agree_where_tcnn_exists():
    if accel.load("tinycudann") is None:
        pytest.skip("tinycudann is not installed here (it does not build from the package registries and "
                    "needs CUDA); on a machine with it this compares the two implementations")
    args = dict(n_levels=8, log2_table=14, base_resolution=8, per_level_scale=1.5)
    fast = HashGrid(implementation="tinycudann", **args).cuda()
    slow = HashGrid(implementation="torch", **args).cuda()
    with torch.no_grad():  # unit-scale features: at tcnn's ±1e-4 init any two encodings agree to 1e-3
        fast.encoding.params.normal_()
    slow.load_state_dict(fast.state_dict())
    u = torch.rand(1000, 3, device="cuda")
    want = slow.encoding(u)
    assert want.abs().max() > 0.5
    # tcnn blends in half precision: 8 corner products, each rounded to ~5e-4 of unit values.
    assert torch.allclose(fast.encoding(u), want, atol=1e-2), (fast.encoding(u) - want).abs().max()
    pts = torch.rand(256, 3, device="cuda") * 2 - 1
    assert torch.allclose(fast.density(pts), slow.density(pts), rtol=2e-2, atol=2e-2)


class StandInTcnnEncoding(torch.nn.Module):
    """tinycudann.Encoding's parameter layout (one flat `params`, nothing else in its state dict),
    computing the torch path's math on that table: tcnn itself needs CUDA and does not install here."""

    def __init__(self, n_input_dims, config):
        super().__init__()
        assert n_input_dims == 3 and config["otype"] == "HashGrid"
        args = [config[k] for k in ("n_levels", "n_features_per_level", "log2_hashmap_size", "base_resolution",
                                    "per_level_scale")]
        object.__setattr__(self, "math", HashEncoding(*args))  # not a child: its table is not ours
        self.params = torch.nn.Parameter(torch.empty_like(self.math.params).uniform_(-1e-4, 1e-4))

    def forward(self, u):
        return torch.func.functional_call(self.math, {"params": self.params}, (u,))


STAND_IN_TCNN = SimpleNamespace(Encoding=StandInTcnnEncoding)
GRID = dict(n_levels=4, n_features=2, log2_table=10, base_resolution=4, per_level_scale=2.0)


def tcnn_grid(**kwargs) -> HashGrid:
    """A HashGrid on the tcnn path, with the stand-in in place of tinycudann."""
    g = HashGrid(implementation="torch", **GRID, **kwargs)
    g.encoding = TcnnHashEncoding(STAND_IN_TCNN, *GRID.values())
    return g


def randomised(g: HashGrid) -> HashGrid:
    with torch.no_grad():
        for p in g.parameters():
            p.normal_()
    return g


@pytest.mark.parametrize("direction", ["torch->tcnn", "tcnn->torch"])
def test_a_checkpoint_moves_between_tcnn_and_torch(direction, tmp_path):
    torch.manual_seed(0)
    slow, fast = randomised(HashGrid(implementation="torch", **GRID)), randomised(tcnn_grid())
    src, dst = (slow, fast) if direction == "torch->tcnn" else (fast, slow)
    a = src.state_dict()
    AtomicCheckpointIO().save_checkpoint({"state_dict": a}, tmp_path / "last.ckpt")  # as run() writes them
    dst.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"], strict=True)
    b = dst.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), (list(a), list(b))
    assert torch.equal(fast.encoding.params, slow.encoding.params)
    u = torch.rand(64, 3)
    assert torch.equal(fast.encoding(u), slow.encoding(u))  # the same table gives the same features


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="implementation='cuda'"):
        check_settings(HashGrid, implementation="cuda")
    with pytest.raises(ConfigError, match="log2_table=30"):
        check_settings(HashGrid, log2_table=30)
    if accel.load("tinycudann") is None:
        with pytest.raises(ConfigError, match="^geometry.implementation=tinycudann but"):
            HashGrid(implementation="tinycudann")


def test_defaults_are_tcnns_and_the_settings_reach_the_layers():
    """Constructed with no arguments: tcnn's default grid (16 levels × 2 features, 2^19 entries, base
    resolution 16, scale 1.447269), 64 hidden units; tcnn's ±1e-4 uniform init of the table."""
    enc = HashEncoding()
    assert enc.levels == level_layout(16, 19, 16, 1.447269) and enc.n_features == 2
    assert enc.params.numel() == (enc.levels[-1][3] + enc.levels[-1][2]) * 2
    assert enc.params.abs().max() <= 1e-4 and enc.params.min() < -9e-5 and enc.params.max() > 9e-5
    assert list(enc.state_dict()) == ["params"]  # the corner and prime buffers are not saved
    g = HashGrid()  # implementation "auto": the torch path where tcnn is missing
    assert g.implementation == ("tinycudann" if accel.load("tinycudann") is not None else "torch")
    if g.implementation == "torch":
        assert g.encoding.levels == enc.levels
    assert g.normal_type == "finite_difference"
    for net in (g.density_net, g.feature_net):
        assert net[0].in_features == 32 and net[0].out_features == 64
    g = HashGrid(n_levels=3, n_features=4, log2_table=8, base_resolution=4, per_level_scale=1.5, hidden=7,
                 implementation="torch")
    assert g.encoding.levels == level_layout(3, 8, 4, 1.5) and g.encoding.n_features == 4
    shapes = {k: tuple(v.shape) for k, v in g.state_dict().items() if not k.startswith("encoding")}
    assert shapes == {"density_net.0.weight": (7, 12), "density_net.2.weight": (1, 7),  # no biases
                      "feature_net.0.weight": (7, 12), "feature_net.2.weight": (3, 7)}


def test_the_accepted_ranges_of_the_settings():
    for ok in (dict(n_levels=1), dict(log2_table=4), dict(log2_table=24, n_levels=1, base_resolution=4)):
        HashGrid(implementation="torch", **{**dict(n_levels=2, log2_table=8, base_resolution=4), **ok})
    for bad in (dict(n_levels=0), dict(n_levels=2.0), dict(log2_table=3), dict(log2_table=25), dict(log2_table=8.0)):
        with pytest.raises(ConfigError, match="n_levels|log2_table"):
            check_settings(HashGrid, implementation="torch", **{**dict(n_levels=2, log2_table=8, base_resolution=4), **bad})
    with pytest.raises(ConfigError, match="geometry.normals='exact'"):
        check_settings(HashGrid, implementation="torch", normals="exact", **GRID)
    with pytest.raises(ConfigError, match="geometry.implementation='cuda'"):
        check_settings(HashGrid, implementation="cuda", **GRID)


def test_the_tcnn_path_is_chosen_when_tcnn_loads(monkeypatch):
    """With tinycudann importable (the stand-in here), `tinycudann` and `auto` both build the tcnn
    encoding with the grid's settings; `torch` still builds the torch one."""
    monkeypatch.setitem(accel._found, "tinycudann", STAND_IN_TCNN)
    for implementation in ("tinycudann", "auto"):
        g = HashGrid(implementation=implementation, **GRID)
        assert g.implementation == "tinycudann" and isinstance(g.encoding, TcnnHashEncoding)
        math_ = g.encoding.encoding.math
        assert math_.levels == level_layout(4, 10, 4, 2.0) and math_.n_features == GRID["n_features"]
        assert g.encoding.params.shape == HashEncoding(*GRID.values()).params.shape
    assert isinstance(HashGrid(implementation="torch", **GRID).encoding, HashEncoding)


def test_the_box_maps_onto_the_encoding_and_outside_points_take_the_border_value():
    """World points in [-radius, radius]³ map to u = (p / radius + 1) / 2 in [0, 1]³; points outside
    the box read the field at the nearest border point (no blob, so density is the field alone); and
    the joint lookup (forward) equals density() and albedo()."""
    torch.manual_seed(0)
    g = randomised(HashGrid(implementation="torch", radius=2.0, blob_density=0.0, **GRID))
    inside = torch.rand(200, 3) * 4 - 2
    h = g.encoding((inside / 2 + 1) / 2)
    with torch.no_grad():
        field = h @ g.density_net[0].weight.t()
        want_d = torch.nn.functional.softplus(field.relu() @ g.density_net[2].weight.t())[:, 0]
        want_a = torch.sigmoid((h @ g.feature_net[0].weight.t()).relu() @ g.feature_net[2].weight.t())
    assert torch.allclose(g.density(inside), want_d, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g.albedo(inside), want_a, rtol=1e-5, atol=1e-6)
    outside = torch.rand(300, 3) * 12 - 6
    outside = outside[(outside.abs() > 2).any(-1)]
    border = outside.clamp(-2, 2)
    assert torch.allclose(g.density(outside), g.density(border), rtol=1e-6, atol=1e-7)
    assert torch.allclose(g.albedo(outside), g.albedo(border), rtol=1e-6, atol=1e-7)
    assert g.density(border).std() > 0.1 and g.albedo(border).std() > 0.1  # the border is not flat
    pts = torch.cat([inside, outside])
    d, a = g(pts)
    assert torch.allclose(d, g.density(pts), rtol=1e-5, atol=1e-6)
    assert torch.allclose(a, g.albedo(pts), rtol=1e-5, atol=1e-6)


def test_finite_difference_normals_are_the_base_class_ones():
    torch.manual_seed(0)
    g = randomised(HashGrid(implementation="torch", blob_density=0.0, normal_eps=0.2, **GRID))
    pts = torch.rand(100, 3) * 1.6 - 0.8
    fd = g.normals(pts)
    assert torch.equal(fd, Geometry.normals(g, pts))
    g.normal_type = "analytic"
    assert (fd - g.normals(pts)).abs().max() > 0.1  # eps = 0.2 is coarse: the two differ


def test_analytic_normals_are_differentiable_in_the_points_and_the_parameters():
    """While grad is enabled (training: the orientation loss), the normals carry a graph: their
    derivative in the points matches finite differences of the normals themselves (float64)."""
    torch.manual_seed(0)
    g = randomised(HashGrid(implementation="torch", blob_density=0.0, normals="analytic", **GRID)).double()
    pts = (torch.rand(20, 3, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    w = torch.randn(20, 3, dtype=torch.float64)
    n = g.normals(pts)
    grad_p, grad_w = torch.autograd.grad((n * w).sum(), [pts, g.density_net[0].weight])
    assert grad_w.abs().sum() > 0
    step = torch.randn(20, 3, dtype=torch.float64) * 1e-6
    with torch.no_grad():
        fd = ((g.normals(pts + step) - g.normals(pts - step)) * w).sum() / 2
        assert not g.normals(pts).requires_grad  # no graph without grad
    assert (grad_p * step).sum().item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-9)
