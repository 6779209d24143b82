"""Stages at run time: a system is an ordered list of them (Magic3D: hash-grid NeRF, then a DMTet
mesh). Which stages run and what each changes is merged and checked in schema/stages.py; here each
stage's parts are built, its steps allocated, its render size read per step, and its start made
(`init: blob`, or `previous`: from the stage before; `freeze`; VSD's `lora: carry` or `reset`).
Step-dependent schedules count stage-local steps, and so do `resolution_milestones`: `width: [64, 512]`
with milestones `[5000]` renders 64² for steps 0-4,999 of the stage, 512² from step 5,000.
"""
from __future__ import annotations

import bisect
import copy
import logging

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from text23d.errors import ConfigError
from text23d.schema.stages import default_stages, stage_configs  # noqa: F401  (merged and checked there, without torch)

log = logging.getLogger("text23d")



def render_size(stage_cfg: DictConfig, step: int, native: int) -> tuple[int, int]:
    """(height, width) of the stage's renders at stage-local `step`: its size, or, for a list, the
    entry of the span of `resolution_milestones` the step is in (checked in stage_configs); null is
    the prior's own resolution `native`. Only the step decides, so a resumed run renders alike."""
    span = bisect.bisect_right(list(stage_cfg.get("resolution_milestones") or []), step)

    def at(size):
        return (size[span] if isinstance(size, (list, tuple, ListConfig)) else size) or native

    return at(stage_cfg.height), at(stage_cfg.width)


def group_of(name: str, groups) -> str | None:
    """The optimizer.param_groups prefix that sets parameter `name`'s options (as in geometry.sdf):
    the longest prefix that is the name or ends at one of its dots; None: the optimizer's own."""
    return max((g for g in groups if name == g or name.startswith(g + ".")), key=len, default=None)


def allocate_steps(cfg: DictConfig, stages: list[DictConfig]) -> list[int]:
    """Steps per stage. trainer.max_steps null: each stage's own `steps`. Otherwise it is the total,
    split in proportion to the stages' steps (a single stage takes it all), at least 1 each."""
    todo = [st for st in stages if not st.done]
    if len(todo) < len(stages):  # stages made by another run (init_from) take no steps here
        steps = iter(allocate_steps(cfg, todo))
        return [0 if st.done else next(steps) for st in stages]
    total = cfg.trainer.max_steps
    declared = [st.steps for st in stages]
    if total is None:
        bad = [(st.name, st.steps) for st in stages if not (isinstance(st.steps, int) and st.steps >= 1)]
        if bad:
            raise ConfigError(f"stage steps {bad}: with trainer.max_steps=null every stage needs steps ≥ 1. "
                              f"Fix: system.stage.{bad[0][0]}.steps=1000, or set trainer.max_steps")
        return list(declared)
    if not isinstance(total, int) or isinstance(total, bool) or total < len(stages):
        raise ConfigError(f"trainer.max_steps={total!r}: must be an integer ≥ {len(stages)} (one step per stage "
                          f"at least; stages: {[st.name for st in stages]}). Fix: e.g. trainer.max_steps=1000")
    if len(stages) == 1:
        return [total]
    weights = [w if isinstance(w, int) and w > 0 else 1 for w in declared]
    raw = [total * w / sum(weights) for w in weights]
    steps = [max(1, int(r)) for r in raw]
    while sum(steps) < total:  # largest remainder first
        steps[max(range(len(raw)), key=lambda i: raw[i] - steps[i])] += 1
    while sum(steps) > total:
        steps[max((i for i in range(len(steps)) if steps[i] > 1), key=lambda i: steps[i] - raw[i])] -= 1
    if steps != declared:
        log.info("trainer.max_steps=%d: stages %s take %s steps", total, [st.name for st in stages], steps)
    return steps


class Particle(nn.Module):
    """One 3D representation being optimised: a geometry and its background (and, with a volume
    renderer that skips empty space, its occupancy grid)."""

    def __init__(self, geometry: nn.Module, background: nn.Module, occupancy: nn.Module | None = None):
        super().__init__()
        self.geometry, self.background, self.occupancy = geometry, background, occupancy


def build_geometry(stage: DictConfig, previous: "Stage | None") -> nn.Module:
    """The stage's geometry; a mesh geometry without a colour field of its own gets one like the
    previous stage's (that geometry itself, or its colour field if it is a mesh too); the weights
    are copied over when the stage starts."""
    geometry = instantiate(stage.geometry)
    if geometry.needs_colour_field and previous is not None and stage.init == "previous":
        geometry.color = copy.deepcopy(previous.particles[0].geometry.colour_field())
    return geometry


class Stage(nn.Module):
    """The parts one stage trains: its particles and renderer (modules), and, as plain objects, its
    guidance (cheap: it checks its arguments here) and training-camera sampler."""

    def __init__(self, cfg: DictConfig, previous: "Stage | None", n_particles: int):
        super().__init__()
        self.cfg = cfg
        self.renderer = instantiate(cfg.renderer)
        self.particles = nn.ModuleList(
            Particle(build_geometry(cfg, previous), instantiate(cfg.background), self.renderer.make_occupancy())
            for _ in range(n_particles))
        self.freeze(list(cfg.get("freeze") or []))
        object.__setattr__(self, "guidance", instantiate(cfg.guidance))
        object.__setattr__(self, "camera_sampler", instantiate(cfg.camera))

    def freeze(self, prefixes: list[str]) -> None:
        """Parameters named by a prefix (as in geometry.sdf) keep their values for the whole stage:
        no gradient, not in the optimizer (ProlificDreamer's texture stage keeps the geometry)."""
        names = [n for n, _ in self.particles.named_parameters()]
        for prefix in prefixes:
            hit = [p for n, p in self.particles.named_parameters()
                   if n.split(".", 1)[1] == prefix or n.split(".", 1)[1].startswith(prefix + ".")]
            if not hit:
                raise ConfigError(f"system.stage.{self.cfg.name}.freeze: {prefix!r} matches no parameter; "
                                  f"they look like: {sorted({'.'.join(n.split('.')[1:3]) for n in names})[:8]}")
            for p in hit:
                p.requires_grad_(False)

    def optimizer(self) -> torch.optim.Optimizer:
        """The stage's optimizer over its particles. `param_groups` maps a parameter-name prefix
        (as in geometry.sdf, background) to its own settings; the longest matching prefix wins."""
        params = OmegaConf.to_container(self.cfg.optimizer, resolve=True)
        groups = params.pop("param_groups", None) or {}
        buckets: dict[str, list] = {prefix: [] for prefix in groups}
        rest = []
        for name, p in self.particles.named_parameters():
            if not p.requires_grad:  # frozen for this stage
                continue
            match = group_of(name.split(".", 1)[1], groups)  # the name without the particle index
            (buckets[match] if match is not None else rest).append(p)
        modules = {name.split(".", 1)[1] for name, _ in self.particles.named_modules() if "." in name}
        looks_like = sorted({n.split(".", 1)[1].rsplit(".", 1)[0] for n, _ in self.particles.named_parameters()})
        unused = [g for g, ps in buckets.items() if not ps and g not in modules]  # not a solid background either
        # A group for a part another kind of geometry has (ProlificDreamer's hash-grid MLPs, with
        # geometry=grid): its settings do not apply here, which is said; a typo of a part is refused.
        other_kind = [g for g in unused if "." in g and g.rsplit(".", 1)[0] in modules]
        if other_kind:
            log.warning("stage %s: optimizer.param_groups %s name parts its %s does not have (its parameters: %s); "
                        "those groups are unused, every parameter of that part takes the optimizer's own settings",
                        self.cfg.name, other_kind, type(self.particles[0].geometry).__name__, looks_like[:6])
        unused = [g for g in unused if g not in other_kind]
        if unused:
            raise ConfigError(f"system.stage.{self.cfg.name}.optimizer.param_groups {unused} match no parameter; "
                              f"they look like: {looks_like[:6]}")
        param_groups = [{"params": rest}] if rest else []
        param_groups += [{"params": ps, **groups[g]} for g, ps in buckets.items() if ps]
        return instantiate(params)(param_groups)


@torch.no_grad()
def start_from(stage: Stage, previous: Stage, cams, radius: float) -> dict:
    """Initialise `stage`'s particles from `previous`'s: a mesh geometry from the density field, at
    the level export would choose, with the colour field carried over; a geometry of the same kind
    by copying it. A background carries over when it is of the same kind (a learned one after a
    solid one starts afresh, as in threestudio's separate texture run)."""
    from text23d.export.threshold import auto_threshold

    info = {}
    for i, (new, old) in enumerate(zip(stage.particles, previous.particles)):
        if type(new.geometry) is type(old.geometry):  # the same kind (a mesh after a mesh): a copy
            new.geometry.load_state_dict(copy.deepcopy(old.geometry.state_dict()))
        elif "density" in new.geometry.needs_previous:
            threshold, iou = auto_threshold(old.geometry, cams, radius)
            info[f"particle{i}"] = {"threshold": threshold, "silhouette_iou": iou,
                                    **new.geometry.init_from_density(old.geometry.density, threshold,
                                                                     stage=f"stage {stage.cfg.name}")}
            new.geometry.color.load_state_dict(old.geometry.state_dict())
        else:
            raise ConfigError(f"stage {stage.cfg.name} cannot start from stage {previous.cfg.name}: "
                              f"{type(new.geometry).__name__} from {type(old.geometry).__name__}. Fix: "
                              f"system.stage.{stage.cfg.name}.init=blob, or a geometry of the same kind")
        old_bg = old.background.state_dict()
        if type(new.background) is type(old.background) and old_bg.keys() == new.background.state_dict().keys():
            new.background.load_state_dict(old_bg)  # not after a solid one (ProlificDreamer's geometry stage)
    return info
