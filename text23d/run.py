"""`run(cfg)`: seed, build, fit, export, summarise. The CLI is a thin shell around it; tests call it."""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from text23d import config as tconfig
from text23d.checkpoint import (AtomicCheckpointIO, PeriodicCheckpoint, find_checkpoint,
                                load_checkpoint_file, run_dir_of)
from text23d.errors import CheckpointError, ConfigError
from text23d.export.artifacts import export_artifacts
from text23d.fileio import write_text_atomic
from text23d.systems import init_from

log = logging.getLogger("text23d")


def run(cfg: DictConfig, overrides: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Train (or resume, or only export) as `cfg` says; returns the run summary (also on disk)."""
    if cfg.export.get("ckpt"):
        return export_only(cfg)
    ckpt_path, start_step = None, 0
    if cfg.get("resume"):
        cfg, ckpt_path, start_step = resume_config(cfg, overrides or [])
    tconfig.validate(cfg)
    if not cfg.get("output_dir"):
        raise ConfigError("output_dir is not set: pass output_dir=/some/folder (the CLI sets it for you)")
    cfg, source = init_from.prepare(cfg) if not ckpt_path else (cfg, None)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", tconfig.resolved_yaml(cfg))

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    system = build_system(cfg)
    init_from.apply(system, source)
    trainer = build_trainer(cfg, out_dir, callbacks or [], start_step, sum(system.stage_steps))
    start = time.time()
    with warnings.catch_warnings():
        # Our loader yields step indices only (cameras are drawn in the step, RNG restored from the
        # checkpoint), so resuming mid-"epoch" is exact; Lightning cannot know that and would warn.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
        trainer.fit(system, ckpt_path=str(ckpt_path) if ckpt_path else None)
    if trainer.interrupted:
        log.warning("training interrupted at step %d; resume with: text23d resume=%s",
                    trainer.global_step, out_dir)
    train_time = time.time() - start
    exported = export_artifacts(system, out_dir, trainer.global_step)
    system.end_stage(system.stage_index, outputs=exported["artifacts"])
    if getattr(system, "lora", None) is not None:
        exported["artifacts"]["lora"] = system.save_lora(out_dir / "ckpts" / "lora.safetensors")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    summary = {
        "prompt": cfg.prompt, "system": cfg.system.name, "steps": trainer.global_step,
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "wall_time_s": round(time.time() - start, 2), "train_time_s": round(train_time, 2),
        "final_loss": metrics.get("train/loss"), "metrics": {**metrics, **exported["metrics"]},
        "stages": system.stage_log,
        "artifacts": {**exported["artifacts"], "checkpoint": str(out_dir / "ckpts" / "last.ckpt"),
                      "config": str(out_dir / "config.yaml"),
                      "validation_images": sorted(str(p) for p in (out_dir / "save").glob("*-val.png")),
                      "logs": str(out_dir / "logs")},
        "output_dir": str(out_dir),
    }
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    log.info("done: %s", out_dir)
    return summary


def build_system(cfg: DictConfig):
    try:
        return get_class(cfg.system._target_)(cfg)
    except (InstantiationException, TypeError, OmegaConfBaseException) as e:
        raise ConfigError(f"cannot build system '{cfg.system.name}': {str(e).splitlines()[0]}. "
                          "Check the keys you overrode (text23d --cfg job shows the config).") from None


def build_trainer(cfg: DictConfig, out_dir: Path, callbacks: list, start_step: int, total_steps: int) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from text23d.progress import StepProgressBar

    ckpt = PeriodicCheckpoint(out_dir / "ckpts" / "last.ckpt", cfg.checkpoint.every_n_train_steps)
    bar = [StepProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    # A resumed run logs CSV into a new version folder: the CSV logger rewrites its file.
    loggers = [TensorBoardLogger(out_dir / "logs", name="tensorboard", version=""),
               CSVLogger(out_dir / "logs", name="csv", version=f"resumed-{start_step}" if start_step else "")]
    options = {**OmegaConf.to_container(cfg.trainer, resolve=True), "max_steps": total_steps}  # all stages
    return L.Trainer(**options, deterministic=cfg.deterministic,
                     default_root_dir=out_dir, logger=loggers, callbacks=[ckpt, *bar, *callbacks],
                     plugins=[AtomicCheckpointIO()], enable_checkpointing=False,
                     limit_val_batches=0, num_sanity_val_steps=0, max_epochs=-1,
                     use_distributed_sampler=False)  # every DDP rank runs every step


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path, int]:
    """The saved config of the run being resumed, plus any explicit command-line overrides
    (e.g. trainer.max_steps=20000 to extend it). Output goes to the original run folder."""
    ckpt = find_checkpoint(cfg.resume)
    data = load_checkpoint_file(ckpt)
    _check_version(ckpt, data)
    saved = OmegaConf.create(data["text23d"]["config"])
    OmegaConf.set_struct(saved, True)
    extra = [o for o in overrides if not o.lstrip("+").startswith(("resume=", "hydra.", "output_dir=", "export."))]
    for key, value, add in _parse_overrides(extra):
        if isinstance(OmegaConf.select(saved, key), DictConfig) and not isinstance(value, dict):
            raise ConfigError(f"{key}={value} chooses another config option, which a resumed run cannot "
                              f"take: its parts are already built. Fix: start a new run with {key}={value}, "
                              "or resume without it")
        try:
            OmegaConf.update(saved, key, value, merge=True, force_add=add)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot apply {key}={value} to the resumed run: {str(e).splitlines()[0]}") from None
    with_dir = OmegaConf.merge(saved, {"resume": str(ckpt), "output_dir": str(run_dir_of(ckpt))})
    return with_dir, ckpt, int(data.get("global_step", 0))


def _parse_overrides(overrides: list[str]) -> list[tuple[str, object, bool]]:
    """(key, value, force_add) per override, read with Hydra's own grammar: quoted text (a prompt)
    stays text, numbers become numbers, as they would in a new run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"cannot read the overrides {overrides}: {str(e).splitlines()[0]}") from None
    out = []
    for o in parsed:
        if o.is_delete() or o.is_sweep_override():
            raise ConfigError(f"{o.input_line}: a resumed run takes plain key=value overrides only")
        out.append((o.key_or_group, o.value(), o.is_add() or o.is_force_add()))
    return out


def _check_version(ckpt: Path, data: dict) -> None:
    if "stage_started" not in data["state_dict"]:
        raise CheckpointError(f"'{ckpt}' was written by a text23d before systems had stages; its weights do not "
                              "fit this version. Fix: re-run it, or export it with the version that made it")


def load_system(ckpt_or_dir, export_overrides: dict | None = None):
    """The trained system of a checkpoint (no diffusion model loaded), its step and run folder."""
    ckpt = find_checkpoint(ckpt_or_dir)
    data = load_checkpoint_file(ckpt)
    _check_version(ckpt, data)
    saved = OmegaConf.create(data["text23d"]["config"])
    OmegaConf.set_struct(saved, False)
    if export_overrides:
        saved.export = OmegaConf.merge(saved.export, export_overrides)
    saved.output_dir = str(run_dir_of(ckpt))
    tconfig.validate(saved)
    system = build_system(saved)
    skip = getattr(system, "export_skips_prefix", None)  # e.g. VSD's LoRA: needs the prior to exist
    state = {k: v for k, v in data["state_dict"].items() if not (skip and k.startswith(skip))}
    system.load_state_dict(state)
    return system, int(data.get("global_step", 0)), ckpt


def export_only(cfg: DictConfig) -> dict:
    """Re-export video and mesh from a checkpoint; no training, no diffusion model.
    Export settings come from this command, not from the run being exported."""
    overrides = {k: v for k, v in cfg.export.items() if k != "ckpt"}
    system, step, ckpt = load_system(cfg.export.ckpt, overrides)
    exported = export_artifacts(system, system.out_dir, step)
    summary = {"checkpoint": str(ckpt), "steps": step, **exported}
    write_text_atomic(system.out_dir / f"export-{step:06d}.json", json.dumps(summary, indent=2))
    return summary
