"""A saved run: resume it (its own config, with only how it runs changed), know when it has
finished, load its trained system, and export it again into a new folder."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from text23d import config as tconfig
from text23d.build import build_system
from text23d.checkpoint import find_checkpoint, load_checkpoint_file, run_dir_of
from text23d.errors import CheckpointError, ConfigError
from text23d.export.artifacts import export_artifacts
from text23d.fileio import write_text_atomic

log = logging.getLogger("text23d")


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path, int]:
    """The saved config of the run being resumed, plus any explicit command-line overrides
    (e.g. trainer.max_steps=20000 to extend it). Output goes to the original run folder."""
    ckpt = find_checkpoint(cfg.resume).resolve()  # absolute: output_dir and resumed_from stay valid from any folder
    data = load_checkpoint_file(ckpt)
    check_version(ckpt, data)
    saved = OmegaConf.create(data["text23d"]["config"])
    OmegaConf.set_struct(saved, True)
    extra = [o for o in overrides if not o.lstrip("+").startswith(("resume=", "hydra.", "output_dir=", "export.",
                                                                  "resume_overrides_ok="))]
    for key, value, add in parse_overrides(extra):
        if isinstance(OmegaConf.select(saved, key), DictConfig) and not isinstance(value, dict):
            raise ConfigError(f"{key}={value} chooses another config option, which a resumed run cannot "
                              f"take: its parts are already built. Fix: start a new run with {key}={value}, "
                              "or resume without it")
        if not key.startswith(HOW_IT_RUNS) and OmegaConf.select(saved, key, default=None) != value:
            if not cfg.get("resume_overrides_ok"):
                raise ConfigError(
                    f"{key}={value}: the run being resumed has {key}={OmegaConf.select(saved, key, default=None)}, and "
                    "a resumed run goes on making what it started; only how it runs may change (trainer.*, "
                    "checkpoint.*, validation.*, export.*, guard.*, output_root, prior.dtype). Fix: a new run with it, or add "
                    "resume_overrides_ok=true to change it in this run")
            log.warning("resume: %s=%s replaces the run's %s (resume_overrides_ok=true)", key, value,
                        OmegaConf.select(saved, key, default=None))
        try:
            OmegaConf.update(saved, key, value, merge=True, force_add=add)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot apply {key}={value} to the resumed run: {str(e).splitlines()[0]}") from None
    with_dir = OmegaConf.merge(saved, {"resume": str(ckpt), "output_dir": str(run_dir_of(ckpt))})
    check_saved_config(ckpt, with_dir)  # first: a config this version cannot use is said as such
    check_same_run(ckpt, saved)
    return with_dir, ckpt, int(data.get("global_step", 0))


# What a resumed run may change: how it runs and where it writes, not what it makes.
HOW_IT_RUNS = ("trainer.", "checkpoint.", "validation.", "export.", "guard.", "faults.", "output_root", "prior.dtype")


def check_same_run(ckpt: Path, saved: DictConfig) -> None:
    """The checkpoint belongs to the folder it sits in: the folder's config.yaml (written when the run
    started) names the same system and stages. A checkpoint copied into another run's folder would
    otherwise turn that run into another system on resume."""
    own = run_dir_of(ckpt) / "config.yaml"
    if not own.is_file():
        return
    try:
        folder = OmegaConf.load(own)
        theirs = (str(OmegaConf.select(folder, "system._target_")), list(OmegaConf.select(folder, "system.stages") or []))
    except Exception:  # noqa: BLE001 (unreadable: nothing to compare with)
        return
    mine = (str(OmegaConf.select(saved, "system._target_")), list(OmegaConf.select(saved, "system.stages") or []))
    if mine != theirs:
        raise CheckpointError(
            f"'{ckpt}' holds a {mine[0].rpartition('.')[2]} run (stages {mine[1]}), but its folder's config.yaml "
            f"is a {theirs[0].rpartition('.')[2]} run's (stages {theirs[1]}): the checkpoint was copied from another "
            f"run. Fix: resume the run it came from, or move it into a folder of its own")


def check_saved_config(ckpt: Path, cfg: DictConfig) -> None:
    """tconfig.validate for a config read from a checkpoint. One this version cannot use (a key it
    needs is missing, a class it names is gone: another version made it) is told in one line."""
    import importlib

    from text23d.schema import missing_keys

    def unusable(why: str) -> CheckpointError:
        return CheckpointError(
            f"'{ckpt}' was made by a text23d whose config this version cannot use ({why}). Fix: "
            f"resume or export it with the version that made it (its settings: {run_dir_of(ckpt) / 'config.yaml'}), "
            "or start a new run")

    missing = missing_keys(cfg)
    if missing:
        raise unusable(f"Missing key {missing[0]}")
    try:
        tconfig.validate(cfg)
        module, _, name = str(cfg.system._target_).rpartition(".")
        if not hasattr(importlib.import_module(module), name):
            raise ImportError(f"{module} has no {name}")
    except (ImportError, ValueError) as e:
        raise unusable(f"system._target_={cfg.system._target_}: {e}") from None
    except OmegaConfBaseException as e:
        raise unusable(str(e).splitlines()[0]) from None


def finished_summary(cfg: DictConfig, step: int) -> dict | None:
    """The summary of a resumed run that has nothing left to do (it reached its steps and wrote
    summary.json for them): resuming it is a no-op that says so. None when there is work left."""
    from text23d.systems.stages import allocate_steps, stage_configs

    total = sum(allocate_steps(cfg, stage_configs(cfg)))
    out_dir = Path(cfg.output_dir)
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None  # stopped before its export: resuming finishes that
    if step < total or not isinstance(summary, dict) or summary.get("steps") != step:
        return None
    log.info("%s already finished at step %d (trainer.max_steps=%d): nothing to do, nothing overwritten "
             "(results: %s). To train further: text23d resume=%s trainer.max_steps=%d",
             out_dir, step, total, out_dir / "summary.json", out_dir, max(2 * step, step + 1))
    return summary


def parse_overrides(overrides: list[str]) -> list[tuple[str, object, bool]]:
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


def check_version(ckpt: Path, data: dict) -> None:
    if "stage_started" not in data["state_dict"]:
        raise CheckpointError(f"'{ckpt}' was written by a text23d before systems had stages; its weights do not "
                              "fit this version. Fix: re-run it, or export it with the version that made it")


def load_system(ckpt_or_dir, export_overrides: dict | None = None):
    """The trained system of a checkpoint (no diffusion model loaded), its step and run folder."""
    return load_run(ckpt_or_dir, export_overrides)[:3]


def load_run(ckpt_or_dir, export_overrides: dict | None = None):
    """load_system's (system, step, checkpoint), and the export settings the run saved."""
    ckpt = find_checkpoint(ckpt_or_dir).resolve()
    data = load_checkpoint_file(ckpt)
    check_version(ckpt, data)
    saved = OmegaConf.create(data["text23d"]["config"])
    OmegaConf.set_struct(saved, False)
    saved_export = OmegaConf.to_container(saved.export, resolve=True)
    if export_overrides:
        saved.export = OmegaConf.merge(saved.export, export_overrides)
    saved.output_dir = str(run_dir_of(ckpt))
    check_saved_config(ckpt, saved)
    system = build_system(saved)
    skip = getattr(system, "export_skips_prefix", None)  # e.g. VSD's LoRA: needs the prior to exist
    state = {k: v for k, v in data["state_dict"].items() if not (skip and k.startswith(skip))}
    system.load_state_dict(state)
    return system, int(data.get("global_step", 0)), ckpt, saved_export


def export_changes(cfg: DictConfig, overrides: list[str] | None) -> dict:
    """The export settings this command changes: the `export.*` keys typed on the command line
    (`overrides`, the CLI's), or, from Python without them, the keys whose value differs from a
    plain composition's."""
    if overrides is not None:
        keys = {o.lstrip("+").partition("=")[0].removeprefix("export.") for o in overrides
                if o.lstrip("+").startswith("export.")}
    else:
        plain = tconfig.compose([]).export
        keys = {k for k in cfg.export if cfg.export.get(k) != plain.get(k)}
    return {k: cfg.export.get(k) for k in sorted(keys - {"ckpt"})}


def new_export_folder(run_dir: Path) -> Path:
    """<run>/exports/<n>: the next number; a re-export never writes over the run's own files."""
    root = Path(run_dir) / "exports"
    taken = [int(p.name) for p in root.glob("*") if p.name.isdigit()] if root.is_dir() else []
    folder = root / str(max(taken, default=0) + 1)
    folder.mkdir(parents=True)
    return folder


def export_only(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Re-export video and mesh from a checkpoint; no training, no diffusion model. The run's own
    export settings, with only what this command changes, into a new folder <run>/exports/<n>/
    (the run's files stay as they are; a failed export leaves no folder)."""
    tconfig.check_export(cfg)  # before the checkpoint loads
    changes = export_changes(cfg, overrides)
    system, step, ckpt, saved = load_run(cfg.export.ckpt, changes)
    differ = {k: v for k, v in changes.items() if saved.get(k) != v}
    log.info("export from %s: the run's own export settings%s", ckpt, "" if not differ else ", changed here: " +
             ", ".join(f"export.{k}={v} (the run's: {saved.get(k)})" for k, v in differ.items()))
    folder = new_export_folder(system.out_dir)
    try:
        exported = export_artifacts(system, system.cfg.export, folder, step, save_dir=folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no half export; the run's files were never touched
        raise
    settings = OmegaConf.to_container(system.cfg.export, resolve=True)
    summary = {"checkpoint": str(ckpt), "steps": step, "folder": str(folder), "settings": settings,
               "changed": differ, **exported}
    write_text_atomic(folder / "export.json", json.dumps(summary, indent=2, default=str))
    log.info("exported into %s", folder)
    return summary
