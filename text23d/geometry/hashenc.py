"""The torch hash encoding, every level in one batched computation (tiny-cuda-nn's definition, see
hashgrid.py): for points u (N, 3) in [0, 1]³ the corner rows of all levels come from per-axis
lookup tables (a corner's row is x ⊕ y ⊕ z of per-axis hash terms on hashed levels, x + y·res +
z·res² on dense ones), one gather from the flat table reads every corner of every level, and the
trilinear weights blend them.

Tensors are laid out corner-major, level, point — (8, L, n) — so every elementwise step runs over
contiguous rows of points (vectorised) and the gather walks one level's table at a time (it stays
in cache). Points go through in chunks of CHUNK, which keeps each step's working set in the CPU's
cache. On the CPU, two float features are read as one complex number: one 8-byte gather per
corner instead of a row of two.

Two paths, the same numbers:
- `HashFunction` (the renderer's samples, whose positions need no gradient): forward keeps only
  each point's per-axis lookup keys and cell fractions (3·L per point); backward recomputes the
  corner rows and weights from them and accumulates the table's gradient with one `index_add_`.
- `encode` in plain autograd ops, also returning ∂features/∂u when asked: for analytic normals,
  where the gradient must flow into the points and through a second backward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

PRIMES = (1, 2654435761, 805459861)
CHUNK = 16384  # points per pass: (8, 16, 16384) corner rows are 8 MB of int32
GROUP = 262144  # points per index_add_ in backward: at most 400 MB of rows and values at 16 levels


def level_layout(n_levels: int, log2_table: int, base_resolution: int, per_level_scale: float):
    """Per level: (scale, resolution, table size, offset into the flat table, hashed?)."""
    levels, offset, T = [], 0, 2**log2_table
    for l in range(n_levels):
        scale = 2.0 ** (l * math.log2(per_level_scale)) * base_resolution - 1.0
        res = int(math.ceil(scale)) + 1
        size = min(T, res**3)
        size = (size + 7) // 8 * 8
        levels.append((scale, res, size, offset, res**3 > size))
        offset += size
    return levels


class HashLayout:
    """The levels as tensors: scales, per-axis row terms and offsets. Levels are dense up to the
    first one whose grid outgrows its table and hashed from there on (resolution grows per level)."""

    def __init__(self, levels: list, device=None):
        hashed = [lv[4] for lv in levels]
        self.n_levels, self.n_dense = len(levels), hashed.index(True) if any(hashed) else len(levels)
        self.scales = torch.tensor([lv[0] for lv in levels], dtype=torch.float64, device=device).view(-1, 1, 1)
        terms, starts, start = [], [], 0
        for axis in range(3):  # lut[start(axis, level) + k] = the row term of grid coordinate k
            for _scale, res, size, _offset, is_hashed in levels:
                k = torch.arange(res + 1, dtype=torch.int64)  # a corner can sit one past the last point
                terms.append((k * PRIMES[axis]) & (size - 1) if is_hashed else k * res**axis)
                starts.append(start)
                start += res + 1
        self.lut = torch.cat(terms).to(torch.int32).to(device)
        self.starts = torch.tensor(starts, dtype=torch.float32, device=device).view(3, -1).t()[:, :, None].contiguous()
        self.dense_size = torch.tensor([lv[2] for lv in levels[:self.n_dense]], dtype=torch.int32,
                                       device=device).view(-1, 1, 1, 1, 1)
        self.offsets = torch.tensor([lv[3] for lv in levels], dtype=torch.int32, device=device).view(-1, 1, 1, 1, 1)

    def to(self, device) -> "HashLayout":
        for name in ("scales", "lut", "starts", "dense_size", "offsets"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def locate(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """u (n, 3) → lookup keys (L, 3, n) int32 of each cell's low corner, fractions (L, 3, n)."""
        pos = torch.addcmul(torch.full((), 0.5, dtype=u.dtype, device=u.device), self.scales.to(u.dtype),
                            u.t().contiguous())
        low = pos.floor()
        return low.add(self.starts.to(u.dtype)).int(), pos - low

    def rows(self, keys: Tensor, out: Tensor | None = None) -> Tensor:
        """Lookup keys (L, 3, n) → the flat table's rows of the 8 corners, (L, 8, n) int32 (into
        `out` if given), corner c = 4·dx + 2·dy + dz."""
        L, _, n = keys.shape
        both = torch.stack([keys, keys + 1], 2)  # (L, 3, 2, n): the low and the high corner
        terms = self.lut.index_select(0, both.view(-1)).view(L, 3, 2, n)
        x, y, z = terms[:, 0, :, None, None], terms[:, 1, None, :, None], terms[:, 2, None, None, :]
        rows = (torch.empty(L, 8, n, dtype=torch.int32, device=keys.device) if out is None else out).view(L, 2, 2, 2, n)
        d = self.n_dense
        if d:
            torch.add(x[:d] + y[:d], z[:d], out=rows[:d])
            rows[:d].remainder_(self.dense_size)
        if d < L:
            torch.bitwise_xor(x[d:] ^ y[d:], z[d:], out=rows[d:])
        return rows.add_(self.offsets).view(L, 8, n)


def table_view(params: Tensor, n_features: int) -> Tensor:
    """The flat table, one entry per row: a complex number where two float features allow it (on
    the CPU, (rows,)), else (rows, F) real."""
    if n_features == 2 and params.device.type == "cpu" and params.dtype in (torch.float32, torch.float64):
        return torch.view_as_complex(params.view(-1, 2))
    return params.view(-1, n_features)


def _real(x: Tensor) -> Tensor:
    return torch.view_as_real(x) if x.is_complex() else x


def blend(corners: Tensor, frac: Tensor, jacobian: bool) -> tuple[Tensor, Tensor | None]:
    """Trilinear interpolation of corner values (F, L, 2, 2, 2, n), one axis at a time (x, then y,
    then z): features (F, L, n) and, with `jacobian`, their derivatives in the fractions
    (F, L, 3, n), each the difference along its axis of the other two axes' blend."""
    fx, fy, fz = frac.unbind(1)  # (L, n) each
    x = torch.lerp(corners[:, :, 0], corners[:, :, 1], fx[:, None, None])  # (F, L, y, z, n)
    xy = torch.lerp(x[:, :, 0], x[:, :, 1], fy[:, None])  # (F, L, z, n)
    h = torch.lerp(xy[:, :, 0], xy[:, :, 1], fz)
    if not jacobian:
        return h, None
    xz = torch.lerp(x[:, :, :, 0], x[:, :, :, 1], fz[:, None])  # (F, L, y, n)
    z = torch.lerp(corners[..., 0, :], corners[..., 1, :], fz[:, None, None])  # (F, L, x, y, n)
    zy = torch.lerp(z[..., 0, :], z[..., 1, :], fy[:, None])  # (F, L, x, n)
    return h, torch.stack([zy[:, :, 1] - zy[:, :, 0], xz[:, :, 1] - xz[:, :, 0], xy[:, :, 1] - xy[:, :, 0]], 2)


def scatter(grad: Tensor, grad_jacobian: Tensor | None, frac: Tensor, out: Tensor) -> None:
    """The transpose of `blend`: into `out` (F, L, 2, 2, 2, n) each corner's share of the features'
    gradient (F, L, n) and of the derivatives' (F, L, 3, n), axis by axis: with φ = (1 − f, f) and
    σ = (−1, 1), corner (i, j, k) gets φx φy φz g + σx φy φz g_x + φx σy φz g_y + φx φy σz g_z.
    Along each axis the low corner's share is the total minus the high one's."""
    fx, fy, fz = frac.unbind(1)  # (L, n)
    gx, gy, gz = grad_jacobian.unbind(2) if grad_jacobian is not None else (None, None, None)

    def split(total: Tensor, f: Tensor, extra: Tensor | None, into: Tensor | None = None) -> Tensor:
        """(F, L, …) → (F, L, 2, …) on a new axis 2: high = f·total + extra, low = total − high."""
        pair = total.new_empty(*total.shape[:2], 2, *total.shape[2:]) if into is None else into
        if extra is None:
            torch.mul(total, f, out=pair[:, :, 1])
        else:
            torch.addcmul(extra, total, f, out=pair[:, :, 1])
        torch.sub(total, pair[:, :, 1], out=pair[:, :, 0])
        return pair

    zyx = out.permute(0, 1, 4, 3, 2, 5)  # (F, L, z, y, x, n)
    a = split(grad, fx, gx)  # (F, L, x, n): φx·g + σx·g_x
    if grad_jacobian is None:
        split(split(a, fy[:, None], None), fz[:, None, None], None, zyx)
        return
    p = split(a, fy[:, None], split(gy, fx, None))  # (F, L, y, x, n): φy·a + σy·φx·g_y
    q = split(split(gz, fx, None), fy[:, None], None)  # φx φy g_z
    split(p, fz[:, None, None], q, zyx)


def _to_points(x: Tensor) -> Tensor:
    """Features (F, L, n) → (n, L·F); a Jacobian (F, L, 3, n) → (3, n, L·F)."""
    if x.dim() == 4:
        return x.permute(2, 3, 1, 0).reshape(3, x.shape[3], -1)
    return x.permute(2, 1, 0).reshape(x.shape[2], -1)


def _from_points(g: Tensor, n_levels: int) -> Tensor:
    """(n, L·F) → (F, L, n); (3, n, L·F) → (F, L, 3, n)."""
    if g.dim() == 3:
        return g.view(3, g.shape[1], n_levels, -1).permute(3, 2, 0, 1)
    return g.view(g.shape[0], n_levels, -1).permute(2, 1, 0)


def _planes(x: Tensor, n: int) -> Tensor:
    """Corner values (L·8·n, F) or (L·8·n,) complex → a (F, L, 2, 2, 2, n) view."""
    x = _real(x)
    return x.view(-1, 2, 2, 2, n, x.shape[-1]).permute(5, 0, 1, 2, 3, 4)


class HashFunction(torch.autograd.Function):
    """Features (n, L·F) of points that need no gradient and, with `jacobian`, their derivatives
    in the points, (3, n, L·F), for analytic normals; backward returns the table's gradient from
    both, accumulated by one index_add_ per group of points."""

    @staticmethod
    def forward(ctx, u: Tensor, params: Tensor, layout: HashLayout, n_features: int, jacobian: bool):
        table = table_view(params, n_features)
        features, jacobians, saved = [], [], []
        for chunk in u.split(CHUNK):
            keys, frac = layout.locate(chunk)
            rows = layout.rows(keys)
            corners = _planes(table.index_select(0, rows.view(-1)), rows.shape[-1]).contiguous()
            h, d = blend(corners, frac.to(params.dtype), jacobian)
            features.append(_to_points(h))
            if jacobian:  # ∂h/∂u = scale · ∂h/∂frac
                jacobians.append(_to_points(d * layout.scales.to(params.dtype)))
            saved += [keys, frac]
        ctx.save_for_backward(*saved)
        ctx.layout, ctx.n_features, ctx.params_shape = layout, n_features, params.shape
        return (torch.cat(features), torch.cat(jacobians, 1)) if jacobian else torch.cat(features)

    @staticmethod
    def backward(ctx, grad: Tensor, grad_jacobian: Tensor | None = None):
        saved, layout = ctx.saved_tensors, ctx.layout
        table = table_view(torch.zeros(ctx.params_shape, dtype=grad.dtype, device=grad.device), ctx.n_features)
        grad = _from_points(grad, layout.n_levels).contiguous()  # (F, L, N)
        if grad_jacobian is not None:  # (F, L, 3, N), the level's scale applied
            grad_jacobian = _from_points(grad_jacobian, layout.n_levels) * layout.scales.to(grad.dtype)
        # The rows and values of a group of points go into one index_add_, level after level: each
        # level's table then stays in cache while it is written (3-7× faster on the CPU than one
        # call per chunk). A group holds at most GROUP points, which bounds this memory.
        chunks, start = list(zip(saved[::2], saved[1::2])), 0
        for first in range(0, len(chunks), GROUP // CHUNK):
            group = chunks[first:first + GROUP // CHUNK]
            n = sum(keys.shape[-1] for keys, _ in group)
            rows = grad.new_empty((layout.n_levels, 8, n), dtype=torch.int32)
            values = table.new_empty((layout.n_levels, 8, n, *table.shape[1:]))
            shares = _planes(values.view(-1, *table.shape[1:]), n)
            at = 0
            for keys, frac in group:
                m = keys.shape[-1]
                here, there = slice(at, at + m), slice(start + at, start + at + m)
                layout.rows(keys, out=rows[:, :, here])
                scatter(grad[..., there], None if grad_jacobian is None else grad_jacobian[..., there],
                        frac.to(grad.dtype), shares[..., here])
                at += m
            table.index_add_(0, rows.view(-1), values.view(-1, *table.shape[1:]))
            start += n
        return None, _real(table).reshape(-1), None, None, None


def encode(u: Tensor, params: Tensor, layout: HashLayout, n_features: int) -> Tensor:
    """Features (n, L·F) in plain autograd ops: differentiable in u and in the table, twice (the
    gradient of analytic normals in the points)."""
    table = params.view(-1, n_features)
    keys, frac = layout.locate(u.detach())
    pos = layout.scales.to(u.dtype) * u.t()
    frac = frac + (pos - pos.detach())  # the same value, and u's gradient
    corners = _planes(table.index_select(0, layout.rows(keys).view(-1)), keys.shape[-1])
    return _to_points(blend(corners, frac, False)[0])
