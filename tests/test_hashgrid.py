"""The torch hash grid indexes exactly as tiny-cuda-nn does (checked against a per-level reference
written with plain integers), so checkpoints move between the two implementations."""
import math
from types import SimpleNamespace

import pytest
import torch

from text23d import accel
from text23d.checkpoint import AtomicCheckpointIO
from text23d.errors import ConfigError
from text23d.geometry.hashgrid import HashEncoding, HashGrid, TcnnHashEncoding, level_layout


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
        HashGrid(implementation="cuda")
    with pytest.raises(ConfigError, match="log2_table=30"):
        HashGrid(log2_table=30)
    if accel.load("tinycudann") is None:
        with pytest.raises(ConfigError, match="implementation=tinycudann but"):
            HashGrid(implementation="tinycudann")
