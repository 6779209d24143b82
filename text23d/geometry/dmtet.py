"""DMTet (Shen et al. 2021): a tetrahedral grid with a signed distance and a bounded deformation
per vertex; marching tetrahedra turns it into a triangle mesh whose vertices are differentiable in
both, so a rasteriser and score distillation can sculpt it (Magic3D's fine stage).

The grid is made in code, no download: the cube lattice of the scene box (or, once initialised
from an earlier stage, a box tight around its object) split into 6 tetrahedra per cube (Kuhn /
Freudenthal: one per order of the three axes), every tet oriented positively. Convention: SDF < 0
inside. Colour comes from an albedo field (`color`), usually the earlier stage's field carried over.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from text23d.errors import ConfigError, Text23dError

EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))  # a tet's edges, as nvdiffrec orders them


_TET_GRIDS: dict[int, tuple[Tensor, Tensor]] = {}


def tet_grid(n: int) -> tuple[Tensor, Tensor]:
    """Vertices (n+1)³ × 3 on [-1, 1]³ and tets (6n³, 4), every one with positive volume.
    Cached: every DMTet of a resolution shares them (as buffers they are not saved). A plain
    dict, not functools.lru_cache: mutmut does not mutate decorated functions."""
    if n not in _TET_GRIDS:
        if len(_TET_GRIDS) >= 4:
            _TET_GRIDS.pop(next(iter(_TET_GRIDS)))
        _TET_GRIDS[n] = _build_tet_grid(n)
    return _TET_GRIDS[n]


def _build_tet_grid(n: int) -> tuple[Tensor, Tensor]:
    axis = torch.linspace(-1, 1, n + 1)
    verts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    idx = torch.arange((n + 1) ** 3).view(n + 1, n + 1, n + 1)
    corner = idx[:-1, :-1, :-1].reshape(-1)  # (n³,) the lowest corner of every cube
    step = [(n + 1) ** 2, n + 1, 1]  # index offset of a unit step along x, y, z
    tets = []
    for order in itertools.permutations(range(3)):  # a path corner → +e_a → +e_a+e_b → +1
        path, offset = [corner], 0
        for a in order:
            offset = offset + step[a]
            path.append(corner + offset)
        tets.append(torch.stack(path, -1))
    tets = torch.cat(tets)  # (6n³, 4)
    return verts, orient(verts, tets)


def orient(verts: Tensor, tets: Tensor) -> Tensor:
    """Swap two vertices of every tet with negative volume (else half the faces come out flipped)."""
    p = verts[tets]
    volume = torch.linalg.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], 1))
    flip = volume < 0
    tets = tets.clone()
    tets[flip, 2], tets[flip, 3] = tets[flip, 3].clone(), tets[flip, 2].clone()
    return tets


def _triangle_table() -> tuple[Tensor, Tensor]:
    """For each of the 16 inside/outside cases of a positively oriented tet: up to 2 triangles as
    triples of its edge indices, each wound so that its normal points from inside to outside.
    Built from a reference tet (affine maps of positive determinant keep the winding)."""
    ref = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    count = torch.zeros(16, dtype=torch.long)
    for case in range(16):
        inside = [(case >> k) & 1 == 1 for k in range(4)]
        crossing = [e for e, (a, b) in enumerate(EDGES) if inside[a] != inside[b]]
        if not crossing:
            continue
        if len(crossing) == 3:
            tris = [crossing]
        else:  # a quad: walk its edges in a cycle (consecutive edges share a vertex)
            cycle = [crossing[0]]
            while len(cycle) < 4:
                last = set(EDGES[cycle[-1]])
                cycle.append(next(e for e in crossing if e not in cycle and set(EDGES[e]) & last))
            tris = [cycle[:3], [cycle[0], cycle[2], cycle[3]]]
        centre_in = ref[[k for k in range(4) if inside[k]]].mean(0)
        for t, tri in enumerate(tris):
            q = torch.stack([ref[list(EDGES[e])].mean(0) for e in tri])
            normal = torch.linalg.cross(q[1] - q[0], q[2] - q[0], dim=-1)
            if (normal * (q.mean(0) - centre_in)).sum() < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[case, t] = torch.tensor(tri)
        count[case] = len(tris)
    return table, count


TRIANGLES, NUM_TRIANGLES = _triangle_table()


def marching_tets(verts: Tensor, tets: Tensor, sdf: Tensor) -> tuple[Tensor, Tensor]:
    """The surface sdf = 0 (SDF < 0 inside): vertices (M, 3) differentiable in `verts` and `sdf`,
    faces (K, 3) wound outward. The topology (which tets and edges cross) is chosen without grad."""
    with torch.no_grad():
        inside = sdf < 0
        occ = inside[tets]  # (T, 4)
        n_in = occ.sum(1)
        valid = (n_in > 0) & (n_in < 4)
        tv = tets[valid]  # tets the surface passes through
        edges = tv[:, torch.tensor(EDGES, device=tets.device)]  # (T', 6, 2) global vertex ids
        key = torch.sort(edges.reshape(-1, 2), dim=1).values
        crosses = inside[key[:, 0]] != inside[key[:, 1]]
        unique, inverse = torch.unique(key[crosses], dim=0, return_inverse=True)
        edge_vert = torch.full((len(key),), -1, dtype=torch.long, device=tets.device)
        edge_vert[crosses] = inverse  # global edge slot -> surface vertex id
        edge_vert = edge_vert.view(-1, 6)
        case = (occ[valid] * (2 ** torch.arange(4, device=tets.device))).sum(1)
        table, count = TRIANGLES.to(tets.device), NUM_TRIANGLES.to(tets.device)
        faces = []
        for t in range(2):
            sel = count[case] > t
            tri = table[case[sel], t]  # (n, 3) local edge indices
            faces.append(torch.gather(edge_vert[sel], 1, tri))
        faces = torch.cat(faces)
    a, b = unique[:, 0], unique[:, 1]
    sa, sb = sdf[a][:, None], sdf[b][:, None]
    points = (verts[a] * (-sb) + verts[b] * sa) / (sa - sb)  # the zero crossing on each edge
    return points, faces


class DMTet(nn.Module):
    """A mesh geometry: `mesh()` gives the differentiable surface, `albedo` its colour field."""

    provides = frozenset({"mesh", "albedo"})  # see systems/parts.py
    needs_previous = frozenset({"density"})  # what init: previous starts it from

    @property
    def needs_colour_field(self) -> bool:
        """No colour field of its own: a stage that starts from an earlier one gives it a copy of that one's."""
        return self.color is None

    def colour_field(self) -> nn.Module:
        return self if self.color is None else self.color

    def __init__(self, resolution: int = 32, radius: float = 1.0, color: nn.Module | None = None,
                 sphere_radius: float = 0.5, max_deform: float = 0.5):
        super().__init__()
        self.resolution, self.radius, self.max_deform = resolution, radius, max_deform
        grid, tets = tet_grid(resolution)
        self.register_buffer("unit_grid", grid.clone(), persistent=False)  # (V, 3) in [-1, 1]³
        self.register_buffer("tets", tets, persistent=False)  # never written to: shared
        # The box the grid spans: the scene box at first, a tight one once initialised from a field.
        self.register_buffer("box", torch.tensor([[0.0] * 3, [radius] * 3]))  # centre, half extent
        self.sdf = nn.Parameter(grid.norm(dim=-1) * radius - sphere_radius)  # a sphere to start from
        self.deform = nn.Parameter(torch.zeros_like(grid))
        # The colour field: given here (geometry.color) or, for a stage that starts from an earlier
        # one, a module of that stage's geometry type, whose weights are copied over at the start.
        self.color = color

    @property
    def grid(self) -> Tensor:
        return self.box[0] + self.unit_grid * self.box[1]

    def vertices(self) -> Tensor:
        """Deformed grid vertices: each may move up to `max_deform` of a cell (tanh-bounded)."""
        cell = 2 * self.box[1] / self.resolution  # (3,)
        return self.grid + torch.tanh(self.deform) * cell * self.max_deform

    def mesh(self) -> tuple[Tensor, Tensor]:
        """(vertices (M, 3), faces (K, 3)) of the surface sdf = 0."""
        return marching_tets(self.vertices(), self.tets, self.sdf)

    def albedo(self, points: Tensor) -> Tensor:
        if self.color is None:
            raise ConfigError("geometry=dmtet has no colour field: set geometry.color (e.g. a dense grid: "
                              "geometry.color._target_=text23d.geometry.grid.DenseGrid), or start the stage "
                              "from an earlier one, whose field it then carries over")
        return self.color.albedo(points)

    # ---- starting from an earlier stage's density field ---------------------------------------
    def init_from_density(self, density_fn, threshold: float, stage: str = "this stage") -> dict:
        """Take the surface {density = threshold} (the level export chooses), keep only its largest
        connected part (floaters would otherwise survive as islands of the mesh), fit the grid's
        box tightly around it (10 % margin) and set the SDF from the density there."""
        with torch.no_grad():
            self.box.copy_(torch.tensor([[0.0] * 3, [self.radius] * 3], device=self.box.device))
            inside = self._largest_part(self._sample(density_fn) > threshold)
            if not inside.any():
                raise Text23dError(f"{stage}: the earlier stage's density never exceeds the isosurface level "
                                   f"{threshold:.4g}, so there is no shape to start the mesh from. Fix: train the "
                                   "earlier stage longer, or start this stage from a sphere (init: sphere)")
            pts = self.grid[inside.reshape(-1)]
            lo, hi = pts.min(0).values, pts.max(0).values
            half = ((hi - lo) / 2 * 1.1 + 2 * (2 * self.radius / self.resolution)).clamp(max=self.radius)
            self.box.copy_(torch.stack([(lo + hi) / 2, half]))
            sigma = self._sample(density_fn)
            inside = self._largest_part(sigma > threshold)
            # SDF from the log density ratio (negative inside), clamped: smooth across the orders of
            # magnitude a density spans, exact in its zero set; outside the kept part, positive.
            ratio = torch.log(sigma.clamp_min(1e-8) / threshold).clamp(-1, 1)
            sdf = torch.where(inside, -ratio.abs().clamp_min(1e-4), ratio.abs().clamp_min(1e-4))
            self.sdf.copy_(sdf.reshape(-1))
            self.deform.zero_()
            verts, faces = self.mesh()
            if len(faces) == 0:
                raise Text23dError(f"{stage}: marching tetrahedra found no surface in the earlier stage's density at "
                                   f"level {threshold:.4g}. Fix: raise geometry.resolution, or start from a sphere")
            return {"box_centre": self.box[0].tolist(), "box_half": self.box[1].tolist(),
                    "mesh_vertices": len(verts), "mesh_faces": len(faces)}

    def _sample(self, density_fn) -> Tensor:
        n = self.resolution + 1
        return torch.cat([density_fn(p) for p in self.grid.split(65536)]).view(n, n, n)

    @staticmethod
    def _largest_part(mask: Tensor) -> Tensor:
        """The largest connected component (26-neighbourhood) of a boolean volume: labels spread by
        min-pooling until nothing changes (at most the component's diameter in steps)."""
        if not mask.any():
            return mask
        big = mask.numel() + 1
        labels = torch.where(mask, torch.arange(mask.numel(), device=mask.device).view(mask.shape).float(),
                             torch.full(mask.shape, float(big), device=mask.device))
        while True:
            spread = -torch.nn.functional.max_pool3d(-labels[None, None], 3, 1, 1)[0, 0]
            new = torch.where(mask, torch.minimum(labels, spread), labels)
            if torch.equal(new, labels):
                break
            labels = new
        ids, counts = torch.unique(labels[mask], return_counts=True)
        return mask & (labels == ids[counts.argmax()])
