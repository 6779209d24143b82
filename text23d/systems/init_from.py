"""`init_from=<run dir or ckpt>`: refine an earlier run without copying checkpoint paths by hand.

The earlier run's final 3D representation (the stage its checkpoint was in) takes the place of
this system's stages up to that stage when it has one of that name (a Magic3D run stopped after
its coarse stage), else up to the first one that starts from a previous stage: those are marked
done (0 steps) and the last of them gets the earlier run's geometry and background config, then
its weights. `text23d system=magic3d init_from=outputs/dreamfusion/<run>` runs only
Magic3D's fine stage, starting from that DreamFusion run. A ProlificDreamer source's LoRA (and its
optimizer state) carries on into a system that trains one, as it would within a single run.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from text23d.checkpoint import find_checkpoint, load_checkpoint_file
from text23d.errors import CheckpointError, ConfigError
from text23d.systems.stages import stage_configs


def _source(path) -> tuple[DictConfig, dict, str, int]:
    """(config, checkpoint, stage name, stage index) of the checkpoint's last started stage."""
    ckpt = find_checkpoint(path)
    data = load_checkpoint_file(ckpt)
    if "stage_started" not in data["state_dict"]:
        raise CheckpointError(f"init_from={path}: '{ckpt}' was written by a text23d before stages existed. "
                              "Fix: start from a run made with this version")
    cfg = OmegaConf.create(data["text23d"]["config"])
    started = data["state_dict"]["stage_started"].nonzero()
    index = int(started.max()) if len(started) else 0
    return cfg, data, stage_configs(cfg)[index].name, index


def prepare(cfg: DictConfig) -> tuple[DictConfig, dict | None]:
    """The config with the stages the source replaces marked done, and what to load after the
    system is built ({"stage": index, "state": particle weights}), or (cfg, None) without init_from."""
    if not cfg.get("init_from"):
        return cfg, None
    source_cfg, data, source_stage, source_index = _source(cfg.init_from)
    state = data["state_dict"]
    stages = stage_configs(cfg)
    names = [st.name for st in stages]
    if source_stage in names:  # a run of this system: go on after the stage it reached
        target = names.index(source_stage) + 1
        if target == len(stages):
            raise ConfigError(f"init_from={cfg.init_from} already reached stage {source_stage}, the last of "
                              f"{names}. Fix: resume={cfg.init_from} trainer.max_steps=... to train it longer")
    else:
        target = next((k for k, st in enumerate(stages) if k and st.init == "previous"), None)
    if target is None:
        raise ConfigError(f"init_from={cfg.init_from}: system {cfg.system.name} has no stage that starts from a "
                          f"previous one ({[st.name for st in stages]}), so nothing can start from that run. "
                          "Fix: use resume= to continue it, or a system with stages (system=magic3d)")
    n = cfg.system.get("num_particles", 1)
    if source_cfg.system.get("num_particles", 1) != n:
        raise ConfigError(f"init_from={cfg.init_from} has {source_cfg.system.get('num_particles', 1)} particles, "
                          f"this run {n}. Fix: system.num_particles={source_cfg.system.get('num_particles', 1)}")
    src = stage_configs(source_cfg)[source_index]
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # a plain copy we may change
    previous = stages[target - 1].name
    for st in stages[:target]:
        OmegaConf.update(cfg, f"system.stage.{st.name}.done", True, force_add=True)
    OmegaConf.update(cfg, f"system.stage.{previous}.geometry", OmegaConf.to_container(src.geometry, resolve=True),
                     merge=False, force_add=True)
    OmegaConf.update(cfg, f"system.stage.{previous}.background",
                     OmegaConf.to_container(src.background, resolve=True), merge=False, force_add=True)
    prefix = f"stages.{source_index}.particles."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    lora = {k.removeprefix("lora_params."): v for k, v in state.items() if k.startswith("lora_params.")}
    return cfg, {"stage": target - 1, "state": weights, "from": f"{cfg.init_from} (stage {source_stage})",
                 "lora": lora, "lora_optimizer": data["text23d"].get("lora_optimizer") if lora else None}


def apply(system, loaded: dict | None) -> None:
    """Load the source's particles into the stage before the first one this run trains."""
    if loaded is None:
        return
    stage = system.stages[loaded["stage"]]
    # A renderer's skipping grid starts afresh (its size may differ: renderer.occupancy.resolution).
    state = {k: v for k, v in loaded["state"].items() if ".occupancy." not in k}
    missing, unexpected = stage.particles.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".occupancy." not in k]
    if missing or unexpected:
        raise ConfigError(f"init_from={loaded['from']}: its weights do not fit stage {stage.cfg.name} "
                          f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
                          f"{unexpected[:2]})")
    if "lora_training" in system.provides:  # loaded once the system has built its LoRA (setup)
        system.carry_lora(loaded["lora"], loaded["lora_optimizer"], loaded["from"])
    system.stage_started[: loaded["stage"] + 1] = True
    system.stage_log.append({"name": stage.cfg.name, "steps": 0, "from": loaded["from"]})
