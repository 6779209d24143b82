"""Small tensor helpers that geometries and renderers share (so neither imports the other): the
positional encoding (the NeRF MLP, the learned background), and triangle-mesh helpers (DMTet, the
rasteriser, the mesh regularisers)."""
from __future__ import annotations

import torch
from torch import Tensor


def positional_encoding(x: Tensor, n_freqs: int) -> Tensor:
    """x (N, 3) in [-1, 1] → (N, 3 + 6·n_freqs): x, sin(2^k πx), cos(2^k πx)."""
    freqs = (2.0 ** torch.arange(n_freqs, device=x.device, dtype=x.dtype)) * torch.pi
    angles = x[..., None] * freqs  # (N, 3, F)
    return torch.cat([x, angles.sin().flatten(1), angles.cos().flatten(1)], dim=-1)


def mesh_edges(faces: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unique edges (E, 2), their faces (E, 2) and those faces' third vertices (E, 2); -1 where
    an edge has a single face (a boundary). Edges shared by more than two faces keep two of them."""
    faces = faces.long()
    corners = faces[:, [0, 1, 1, 2, 2, 0]].view(-1, 2)  # (3F, 2): each face's edges
    opposite = faces[:, [2, 0, 1]].reshape(-1)  # the vertex not on that edge
    face_of = torch.arange(len(faces), device=faces.device).repeat_interleave(3)
    edges, inverse = torch.unique(torch.sort(corners, dim=1).values, dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    first = torch.ones(len(order), dtype=torch.bool, device=faces.device)
    first[1:] = inverse[order[1:]] != inverse[order[:-1]]
    slot = (~first).long()  # 0 for an edge's first face, 1 for its second (a third is dropped)
    keep = slot < 2
    adjacent = torch.full((len(edges), 2), -1, dtype=torch.long, device=faces.device)
    third = torch.full((len(edges), 2), -1, dtype=torch.long, device=faces.device)
    adjacent[inverse[order][keep], slot[keep]] = face_of[order][keep]
    third[inverse[order][keep], slot[keep]] = opposite[order][keep]
    return edges, adjacent, third


def face_normals(verts: Tensor, faces: Tensor, unit: bool = True) -> Tensor:
    """(F, 3) normals by the right-hand rule; length = twice the area unless `unit`."""
    a, b, c = (verts[faces[:, k].long()] for k in range(3))
    n = torch.linalg.cross(b - a, c - a, dim=-1)
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-20) if unit else n


def vertex_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """(V, 3) area-weighted unit vertex normals (threestudio's mesh renderer uses the same)."""
    n = face_normals(verts, faces, unit=False)
    out = torch.zeros_like(verts).index_add(0, faces.long().reshape(-1), n.repeat_interleave(3, 0))
    return torch.nn.functional.normalize(out, dim=-1, eps=1e-20)


def normal_consistency(verts: Tensor, faces: Tensor) -> Tensor:
    """Mean of 1 − cos between the normals of faces that share an edge (0 for a plane)."""
    _, adjacent, _ = mesh_edges(faces)
    pairs = adjacent[(adjacent >= 0).all(1)]
    if len(pairs) == 0:
        return verts.sum() * 0
    n = face_normals(verts, faces)
    return (1 - (n[pairs[:, 0]] * n[pairs[:, 1]]).sum(-1)).mean()


def laplacian(verts: Tensor, faces: Tensor) -> Tensor:
    """Mean squared distance of each vertex from the mean of its neighbours (uniform Laplacian)."""
    edges, _, _ = mesh_edges(faces)
    if len(edges) == 0:
        return verts.sum() * 0
    i, j = edges[:, 0], edges[:, 1]
    total = torch.zeros_like(verts).index_add(0, i, verts[j]).index_add(0, j, verts[i])
    count = torch.zeros(len(verts), device=verts.device).index_add(0, i, torch.ones_like(i, dtype=verts.dtype))
    count = count.index_add(0, j, torch.ones_like(j, dtype=verts.dtype))
    used = count > 0
    return ((verts[used] - total[used] / count[used, None]) ** 2).sum(-1).mean()
