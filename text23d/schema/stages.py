"""A system's stages, each merged from the system's settings and its own changes, and checked.

`system.stages` names the stages to run, in order; `system.stage.<name>` holds what each changes
from the system-level settings: the keys of StageConfig (schema/run.py), nothing else. A stage
without a geometry or renderer of its own uses the top-level `geometry` and `renderer` groups.
`guidance`, `camera`, `loss`, `shading`, `optimizer` and `prompt_processor` are changes on top of
the system's (a `guidance` with another `_target_` is another kind, with its own settings only);
a stage's `optimizer.param_groups` replace the system's (they name the stage's own parameters).
No torch here: the CLI checks every stage before anything heavy loads.
"""
from __future__ import annotations

from importlib.resources import files

from omegaconf import DictConfig, OmegaConf

from text23d.errors import ConfigError
from text23d.schema.core import check_node, check_part
from text23d.schema.parts import PromptProcessorConfig
from text23d.schema.run import StageConfig, check_render_schedule

STAGE_KEYS = tuple(StageConfig.__dataclass_fields__)  # what a stage may set: the stage schema's fields
SYSTEM_DEFAULTS = ("width", "height", "batch_size", "optimizer", "loss", "shading", "background")
MERGED = ("guidance", "camera", "loss", "shading", "optimizer", "prompt_processor")  # a stage changes some keys
VIEW_THRESHOLDS = ("front_threshold", "back_threshold", "overhead_threshold")  # a stage may set its own


def default_stages(system: str) -> list[str]:
    """The stages a system runs by default, in order, as its YAML (conf/system/<name>.yaml) lists them."""
    path = files("text23d.conf") / "system" / f"{system}.yaml"
    if not system or not path.is_file():
        return []
    data = OmegaConf.load(str(path))
    return list(OmegaConf.select(data, "system.stages", default=None) or data.get("stages") or [])


def stage_configs(cfg: DictConfig) -> list[DictConfig]:
    """One resolved, checked config per stage to run: name, steps (None: from trainer.max_steps),
    geometry, renderer, guidance, camera, and the system-level keys with the stage's changes merged in."""
    s = cfg.system
    names = list(s.get("stages") or ["main"])
    library = s.get("stage") or {}
    unknown = [n for n in names if n not in library and n != "main"]
    if unknown or len(set(names)) != len(names):
        usual = default_stages(str(s.get("name", ""))) or [n for n in library if n != "main"] or ["main"]
        raise ConfigError(f"system.stages={names}: {'stages ' + str(unknown) + ' are not defined' if unknown else 'a stage is named twice'}"
                          f"; defined are {list(library)}. Fix: system.stages=[{','.join(usual)}] (the system's own, "
                          f"in order), or a part of it")
    out = []
    for k, name in enumerate(names):
        own = library.get(name) or OmegaConf.create({})
        where = f"system.stage.{name}" if name in library else "system"
        check_node(own, StageConfig, f"system.stage.{name}")
        bad = [key for key in (own.get("prompt_processor") or {}) if key not in VIEW_THRESHOLDS]
        if bad:
            raise ConfigError(f"system.stage.{name}.prompt_processor has keys {bad}: a stage sets only its view "
                              f"thresholds {list(VIEW_THRESHOLDS)}; the rest is the system's (system.prompt_processor)")
        merged = {key: s[key] for key in SYSTEM_DEFAULTS}
        views = s.get("prompt_processor") or {}
        merged.update({"name": name, "steps": None, "geometry": cfg.geometry, "renderer": cfg.renderer,
                       "guidance": cfg.guidance, "camera": cfg.camera, "init": "previous" if k else "blob",
                       "done": False, "freeze": [], "lora": "carry",  # done: made elsewhere (init_from), 0 steps here
                       "resolution_milestones": s.get("resolution_milestones") or [],
                       "prompt_processor": OmegaConf.create({key: views[key] for key in VIEW_THRESHOLDS if key in views})})
        for key, value in own.items():
            if key == "guidance" and value is not None and value.get("_target_") not in (None, merged[key]._target_):
                merged[key] = value  # another kind of guidance (SDS in a VSD system): its own settings only
            elif key in MERGED and value is not None:
                # changes on top of the system's (a stage may add loss terms the system lacks)
                base = OmegaConf.create(OmegaConf.to_container(merged[key], resolve=True))
                merged[key] = OmegaConf.merge(base, value)
                if key == "optimizer" and "param_groups" in value:  # they name this stage's parameters
                    merged[key].param_groups = value.param_groups
            else:
                merged[key] = value
        check_render_schedule(merged, where)
        check_node(merged["prompt_processor"], PromptProcessorConfig, f"{where}.prompt_processor")
        for part in ("geometry", "renderer", "guidance", "camera", "background"):
            if key_changed(own, part):
                check_part(merged[part], f"{where}.{part}")
        if k == 0 and merged["init"] == "previous":
            raise ConfigError(f"system.stage.{name}.init='previous': the first stage has no stage before it. "
                              f"Fix: system.stage.{name}.init=blob")
        out.append(OmegaConf.create(merged))
    return out


def key_changed(own, key: str) -> bool:
    """Whether a stage sets `key` itself (the top-level parts are checked once, in check_run)."""
    return key in own and own[key] is not None
