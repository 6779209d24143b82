"""What each part of a system needs and provides, checked when the system is built.

A training step runs geometry → renderer → guidance, plus loss terms on the renderer's output.
Each part's class declares `needs` (what it uses from the parts before it) and `provides`; the
system checks the combination before any diffusion model is loaded, so a mismatch (VSD guidance in
a system that never trains its LoRA, an orientation loss on a renderer without per-sample weights)
is one ConfigError naming the parts and a fix, not a TypeError at the first step.
"""
from __future__ import annotations

import logging

from text23d.errors import ConfigError
from text23d.systems import losses

log = logging.getLogger("text23d")

# Every capability, in words for messages.
WHAT = {
    "density": "a density field",
    "albedo": "an albedo (colour) field",
    "normals": "surface normals",
    "rgb": "rendered images",
    "text": "text embeddings of the prompt",
    "opacity": "per-pixel opacity",
    "sample_weights": "per-sample volume-rendering weights",
    "camera_pose": "each view's camera pose",
    "lora_training": "a training loop for the LoRA score model",
    "lora": "a LoRA score model of the renders (VSD)",
    "mesh": "a triangle mesh (a DMTet geometry)",
}
# How to get a missing capability, by the part that lacks it.
FIX = {
    ("system", "camera_pose"): "system=vsd (ProlificDreamer trains VSD's LoRA), or guidance=sds",
    ("system", "lora_training"): "system=vsd (ProlificDreamer trains VSD's LoRA), or guidance=sds",
    ("guidance", "lora"): "guidance=vsd (drop the guidance override), or system=dreamfusion for SDS",
}


def name(role: str, obj) -> str:
    """'guidance VSDGuidance': the role and the class of a part, for messages."""
    return f"{role} {obj.__name__ if isinstance(obj, type) else type(obj).__name__}"


def _refuse(user: str, need: set, giver: str, fix: str) -> None:
    wanted = " and ".join(WHAT.get(n, n) for n in sorted(need))
    raise ConfigError(f"{user} needs {wanted}, which {giver} does not provide. Fix: {fix}")


def renderer_outputs(geometry, renderer) -> set:
    """What the renderer delivers with this geometry: a volume renderer's normals are the
    geometry's, a rasteriser computes its own from the mesh."""
    out = set(renderer.provides)
    if renderer.normals_from_geometry and "normals" not in geometry.provides:
        out.discard("normals")
    return out


def check(system, geometry, renderer, guidance, loss_weights: dict, shading_needs_normals: bool,
          system_needs: frozenset | None = None) -> None:
    """Raise ConfigError unless every part gets what it needs. `loss_weights` maps a term name to
    its weight (a number or a ramp); terms whose weight is 0 throughout need nothing."""
    missing = set(renderer.needs) - set(geometry.provides)
    if missing:
        fix = ("renderer=rasterize for a mesh geometry" if "mesh" in geometry.provides else
               "geometry=dmtet for the rasteriser" if "mesh" in renderer.needs else
               "a geometry with a density field for volume rendering (geometry=grid, nerf or hashgrid)")
        _refuse(name("renderer", renderer), missing, name("geometry", geometry), fix)
    rendered = renderer_outputs(geometry, renderer)
    if shading_needs_normals and "normals" not in rendered:
        _refuse("lambertian/textureless shading (system.shading)", {"normals"}, name("renderer", renderer),
                "system.shading.ambient_only_steps >= trainer.max_steps (albedo only), or a geometry with normals")
    for term, weight in loss_weights.items():
        need = set(losses.NEEDS.get(term, ())) - rendered
        if need and not losses.always_zero(weight):
            why = renderer.ignores.get(term)
            if why:  # a term that means nothing for this renderer: said once, then left out
                log.warning("system.loss.lambda_%s is not used with %s: %s", term, name("renderer", renderer), why)
                continue
            _refuse(f"loss term system.loss.lambda_{term}", need, name("renderer", renderer),
                    f"system.loss.lambda_{term}=0, or a renderer that provides it (renderer=volume)")
    missing = set(guidance.needs) - set(system.provides)
    if missing:
        _refuse(name("guidance", guidance), missing, name("system", system),
                FIX.get(("system", sorted(missing)[0]), "a system that provides it"))
    missing = set(system.needs if system_needs is None else system_needs) - set(guidance.provides)
    if missing:
        _refuse(name("system", system), missing, name("guidance", guidance),
                FIX.get(("guidance", sorted(missing)[0]), "a guidance that provides it"))


def check_start(stage: str, geometry, previous: str, previous_geometry) -> None:
    """A stage that starts from the previous one (init: previous) must get what its geometry starts
    from: a mesh geometry takes the previous stage's density field, any other one a geometry of its
    own kind to copy."""
    same = type(geometry) is type(previous_geometry)  # a copy needs nothing more, but the same shapes
    if same:
        mine, theirs = ({k: tuple(v.shape) for k, v in g.state_dict().items()} for g in (geometry, previous_geometry))
        if mine != theirs:
            diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ConfigError(f"stage {stage}: {name('geometry', geometry)} (init: previous) needs a copy of its own "
                              f"size ({diff[0]}: {mine.get(diff[0])}), which stage {previous}'s "
                              f"{name('geometry', previous_geometry)} does not provide ({theirs.get(diff[0])}). Fix: "
                              f"the same geometry.resolution in both stages (system.stage.{stage}.geometry.resolution), "
                              f"or system.stage.{stage}.init=blob")
    need = set(geometry.needs_previous) if not same else set()
    missing = need - set(previous_geometry.provides)
    if missing or (not need and not same):
        wanted = " and ".join(WHAT.get(n, n) for n in sorted(missing)) or f"a {type(geometry).__name__} to copy"
        raise ConfigError(f"stage {stage}: {name('geometry', geometry)} (init: previous) needs {wanted} from the stage "
                          f"before, which stage {previous}'s {name('geometry', previous_geometry)} does not provide. "
                          f"Fix: a density geometry for stage {previous} (geometry=grid, nerf or hashgrid), or "
                          f"system.stage.{stage}.init=blob")
