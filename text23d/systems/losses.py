"""Regularisers, written once and shared by every system. Weights are `lambda_<name>` in
`system.loss`; each is a number or a linear ramp [start_step, start_value, end_value, end_step]."""
from __future__ import annotations

from torch import Tensor

from text23d.errors import ConfigError

# What each regulariser needs from the renderer (checked in systems/parts.py).
NEEDS = {"orient": ("sample_weights", "normals"), "sparsity": ("opacity",), "opaque": ("opacity",),
         "normal_consistency": ("mesh",), "laplacian": ("mesh",)}


def scheduled(value, step: int) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    try:
        start_step, start_value, end_value, end_step = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"loss weight {value!r}: use a number or [start_step, start_value, "
                          "end_value, end_step], e.g. system.loss.lambda_orient=[0,10,1000,5000]") from None
    if end_step <= start_step:
        return end_value if step >= end_step else start_value
    frac = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return start_value + frac * (end_value - start_value)


def always_zero(value) -> bool:
    """A weight that is 0 at every step: 0, or a ramp from 0 to 0."""
    if isinstance(value, (int, float)):
        return float(value) == 0.0
    try:
        return float(value[1]) == 0.0 and float(value[2]) == 0.0
    except (TypeError, ValueError, IndexError):
        return False


def regularisers(out: dict, weights: dict | None = None) -> dict[str, Tensor]:
    """Every regulariser the renderer output `out` allows, unweighted (the system weights them);
    the mesh terms only where `weights` gives them a non-zero weight (they cost a pass over edges)."""
    from text23d.ops import laplacian, normal_consistency

    terms = {"sparsity": sparsity(out["opacity"]), "opaque": opaque(out["opacity"])}
    if "normals" in out and "weights" in out:
        terms["orient"] = orientation(out["weights"], out["normals"], out["dirs"])
    if "mesh" in out:
        for name, fn in (("normal_consistency", normal_consistency), ("laplacian", laplacian)):
            if (weights or {}).get(name, 0.0) != 0.0:
                terms[name] = fn(*out["mesh"])
    return terms


def orientation(weights: Tensor, normals: Tensor, dirs: Tensor) -> Tensor:
    """DreamFusion eq. (7): penalise normals that face away from the camera, weighted by the
    (detached) rendering weights. weights (R, n), normals (R, n, 3), dirs (R, 3)."""
    facing_away = (normals * dirs[:, None]).sum(-1).clamp_min(0.0)
    return (weights.detach() * facing_away**2).sum(1).mean()


def sparsity(opacity: Tensor) -> Tensor:
    """Push empty space to stay empty (a smooth L1 of the accumulated opacity)."""
    return (opacity**2 + 0.01).sqrt().mean()


def opaque(opacity: Tensor) -> Tensor:
    """Binary entropy of the opacity: pixels should be fully in or fully out, not haze."""
    o = opacity.clamp(1e-4, 1 - 1e-4)
    return -(o * o.log() + (1 - o) * (1 - o).log()).mean()
