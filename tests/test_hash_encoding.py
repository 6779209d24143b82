"""The batched torch hash encoding (geometry/hashenc.py) against the per-level implementation it
replaced (kept in text23d/testing.py as the reference, which scripts/bench.py times too), in values and gradients, on every path: the complex-packed
table (two features, CPU), the real rows (any other feature count, and what CUDA uses), float64,
several chunks and index_add_ groups, and the Jacobian that analytic normals are built from."""
import pytest
import torch

from text23d.geometry import hashenc
from text23d.geometry.hashenc import PRIMES, level_layout
from text23d.geometry.hashgrid import HashEncoding, HashGrid
from text23d.testing import loop_hash_encoding as loop_encoding


def grid_points(n, seed=0, dtype=torch.float32):
    u = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    u[:4] = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.5], [0.5, 0.5, 0.5]], dtype=dtype)
    return u  # the corners of the box too: a corner one past the last grid point wraps as in tcnn


SMALL = dict(n_levels=5, log2_table=9, base_resolution=3, per_level_scale=1.9)  # 2 dense levels, 3 hashed


def randomised(n_features, dtype=torch.float32, **layout):
    enc = HashEncoding(n_features=n_features, **{**SMALL, **layout}).to(dtype)
    with torch.no_grad():
        enc.params.normal_(generator=torch.Generator().manual_seed(1))
    return enc


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 points and index_add_ groups of 3 chunks: 200 points cross every boundary."""
    monkeypatch.setattr(hashenc, "CHUNK", 7)
    monkeypatch.setattr(hashenc, "GROUP", 21)


def real_rows(monkeypatch):
    """The table as real (rows, F) even for two float features on the CPU, as on CUDA."""
    monkeypatch.setattr(hashenc, "table_view", lambda params, n_features: params.view(-1, n_features))


@pytest.mark.parametrize("n_features,dtype,rows", [(2, torch.float32, False), (2, torch.float64, False),
                                                   (2, torch.float32, True), (1, torch.float32, False),
                                                   (4, torch.float64, False)])
def test_values_and_table_gradients_equal_the_per_level_implementation(n_features, dtype, rows, small_chunks,
                                                                       monkeypatch):
    if rows:
        real_rows(monkeypatch)
    enc = randomised(n_features, dtype)
    assert [lv[4] for lv in enc.levels] == [False, False, True, True, True]
    u = grid_points(200, dtype=dtype)
    weights = torch.randn(200, 5 * n_features, generator=torch.Generator().manual_seed(2), dtype=dtype)
    got = enc(u)
    (got * weights).sum().backward()
    params = enc.params.detach().clone().requires_grad_(True)
    want = loop_encoding(params, u, enc.levels, n_features)
    (want * weights).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert got.shape == (200, 5 * n_features) and want.abs().max() > 1
    assert torch.allclose(got, want, **tol), (got - want).abs().max()
    assert params.grad.abs().max() > 1 and torch.allclose(enc.params.grad, params.grad, **tol)


def test_the_default_grid_equals_the_per_level_implementation():
    """tcnn's defaults: 16 levels, 5 dense, 11 hashed into 2^19 rows, a 4096³ finest level. In
    float64: in float32 a position on the finest level (u·4095 + 0.5) carries only 2^-11 of a cell,
    so whether it is rounded once (a fused multiply-add, as tcnn and addcmul may) or twice already
    moves the blend by ~1e-3 of the table's values."""
    enc = HashEncoding().double()
    with torch.no_grad():
        enc.params.normal_(generator=torch.Generator().manual_seed(1))
    u = grid_points(3000, dtype=torch.float64)
    got = enc(u)
    got.sum().backward()
    params = enc.params.detach().clone().requires_grad_(True)
    want = loop_encoding(params, u, enc.levels, 2)
    want.sum().backward()
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    assert torch.allclose(enc.params.grad, params.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rows", [False, True])
def test_the_jacobian_and_its_table_gradient_are_autograds(rows, small_chunks, monkeypatch):
    """J = ∂features/∂u from the batched path equals autograd's derivative of the per-level
    implementation; and the table's gradient of a loss on (features, J) equals the one autograd
    gets by differentiating the per-level implementation twice (float64)."""
    if rows:
        real_rows(monkeypatch)
    enc = randomised(2, torch.float64)
    u = grid_points(60, dtype=torch.float64) * 0.98 + 0.01  # inside: the clamp's kink has no derivative
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(60, 10, generator=g, dtype=torch.float64), torch.randn(60, 10, 3, generator=g, dtype=torch.float64)
    h, J = enc(u, jacobian=True)
    assert J.shape == (3, 60, 10)
    J = J.permute(1, 2, 0)  # (points, features, axes)
    ((h * a).sum() + (J * b).sum()).backward()
    params = enc.params.detach().clone().requires_grad_(True)
    x = u.clone().requires_grad_(True)
    want = loop_encoding(params, x, enc.levels, 2)
    rows_of_J = [torch.autograd.grad(want[:, k].sum(), x, create_graph=True)[0] for k in range(10)]
    want_J = torch.stack(rows_of_J, 1)  # (60, 10, 3): points do not interact
    assert torch.allclose(J, want_J, rtol=1e-10, atol=1e-10) and want_J.abs().max() > 1
    ((want * a).sum() + (want_J * b).sum()).backward()
    assert torch.allclose(enc.params.grad, params.grad, rtol=1e-10, atol=1e-10)


def test_analytic_normals_from_the_jacobian_train_like_autograds():
    """The renderer's path (points without a gradient: the Jacobian, one encoding for albedo and
    normals) gives the normals, albedo and parameter gradients of the autograd path (points with a
    gradient: double backward through the plain-op encoding)."""
    torch.manual_seed(0)
    g = HashGrid(implementation="torch", normals="analytic", n_levels=4, log2_table=10, base_resolution=4,
                 per_level_scale=2.0).double()
    with torch.no_grad():
        for p in g.parameters():
            p.normal_()
    pts = torch.rand(300, 3, dtype=torch.float64) * 1.6 - 0.8
    w = torch.randn(300, 6, dtype=torch.float64)

    def loss_and_grads(fn):
        g.zero_grad()
        albedo, normals = fn()
        (torch.cat([albedo, normals], -1) * w).sum().backward()
        return albedo.detach(), normals.detach(), [p.grad.clone() for p in g.parameters()]

    fast = loss_and_grads(lambda: g.albedo_and_normals(pts))
    slow = loss_and_grads(lambda: (g.albedo(pts), g._autograd_normals(pts)))
    assert torch.allclose(fast[0], slow[0], atol=1e-12) and torch.allclose(fast[1], slow[1], atol=1e-9)
    for got, want in zip(fast[2], slow[2]):
        assert want.abs().max() > 0 and torch.allclose(got, want, rtol=1e-7, atol=1e-9)


def test_the_layout_is_tcnns():
    """Level scales, resolutions, table sizes (multiples of 8) and offsets as tiny-cuda-nn lays
    them out; the per-axis lookup tables hold tcnn's row terms."""
    levels = level_layout(16, 19, 16, 1.447269)
    layout = hashenc.HashLayout(levels)
    assert layout.n_dense == 5 and [lv[1] for lv in levels][:3] == [16, 24, 34] and levels[-1][1] == 4096
    assert all(size % 8 == 0 for _, _, size, _, _ in levels)
    assert all(size == 2**19 for _, _, size, _, hashed in levels if hashed)
    assert [lv[3] for lv in levels[1:]] == [sum(lv[2] for lv in levels[:i]) for i in range(1, 16)]
    key = int(layout.starts[15, 1, 0]) + 1234  # level 15, axis y, grid coordinate 1234
    assert int(layout.lut[key]) == (1234 * PRIMES[1]) % 2**19
    key = int(layout.starts[2, 2, 0]) + 20  # level 2 (dense, 34 per axis), axis z
    assert int(layout.lut[key]) == 20 * 34 * 34
