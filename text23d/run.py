"""`run(cfg)`: seed, build, fit, export, summarise. The CLI is a thin shell around it; tests call it."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from text23d import config as tconfig
from text23d import faults
from text23d.checkpoint import (AtomicCheckpointIO, PeriodicCheckpoint, find_checkpoint,
                                load_checkpoint_file, remove_leftovers, run_dir_of)
from text23d.errors import CheckpointError, ConfigError, Text23dError
from text23d.export.artifacts import export_artifacts
from text23d.fileio import check_writable, write_text_atomic
from text23d.perf import StepStats
from text23d.gallery import write_run_page
from text23d.systems import init_from

log = logging.getLogger("text23d")


def run(cfg: DictConfig, overrides: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Train (or resume, or only export) as `cfg` says; returns the run summary (also on disk)."""
    if cfg.export.get("ckpt"):
        return export_only(cfg, overrides)
    ckpt_path, start_step = None, 0
    if cfg.get("resume"):
        cfg, ckpt_path, start_step = resume_config(cfg, overrides or [])
        finished = finished_summary(cfg, start_step)
        if finished is not None:  # nothing to train: a no-op, nothing overwritten
            return finished
    tconfig.validate(cfg)
    if not cfg.get("output_dir"):
        raise ConfigError("output_dir is not set: pass output_dir=/some/folder (the CLI sets it for you)")
    cfg, source = init_from.prepare(cfg) if not ckpt_path else (cfg, None)
    out_dir = Path(cfg.output_dir)
    check_writable(out_dir, "output_dir")  # before any model is loaded
    if rank_zero_only.rank == 0:  # under DDP, rank 0 alone writes files (the others only train)
        if ckpt_path:
            for leftover in remove_leftovers(out_dir):
                log.info("removed %s, left by a process killed while writing", leftover)
        write_text_atomic(out_dir / "config.yaml", tconfig.resolved_yaml(cfg))
        faults.mark_job(out_dir)  # a submitit job requeued later finds its own folder (cli.reuse_allowed)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    system = build_system(cfg)
    init_from.apply(system, source)
    watch = faults.SignalWatch().install()  # SIGTERM, SIGINT, SIGUSR1/2: stop at the next step boundary
    guard = faults.callback(watch, save=lambda tr: tr.save_checkpoint(out_dir / "ckpts" / "last.ckpt", weights_only=False))
    stats = StepStats()  # perf/step_s, perf/peak_mem_gb in the logs
    trainer = build_trainer(cfg, out_dir, [guard, stats, *(callbacks or [])], start_step, sum(system.stage_steps))
    start = time.time()
    try:
        with warnings.catch_warnings():
            # Our loader yields step indices only (cameras are drawn in the step, RNG restored from the
            # checkpoint), so resuming mid-"epoch" is exact; Lightning cannot know that and would warn.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            trainer.fit(system, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except SIGTERMException:  # Lightning's own SIGTERM stop, when the signal came after our check
        trainer.save_checkpoint(out_dir / "ckpts" / "last.ckpt", weights_only=False)
        raise faults.Interrupted(watch.signum or 15, f"interrupted by SIGTERM at step {trainer.global_step}: "
                                 f"checkpoint saved; nothing was exported. Resume with: text23d resume={out_dir}") from None
    finally:
        watch.uninstall()
    train_time = time.time() - start
    if not trainer.is_global_zero:  # DDP: rank 0 exports and writes the summary
        return {"rank": trainer.global_rank, "steps": trainer.global_step, "output_dir": str(out_dir)}
    exported = export_artifacts(system, out_dir, trainer.global_step)
    system.end_stage(system.stage_index, outputs=exported["artifacts"])
    if getattr(system, "lora", None) is not None:
        exported["artifacts"]["lora"] = system.save_lora(out_dir / "ckpts" / "lora.safetensors")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    summary = {
        "prompt": cfg.prompt, "system": cfg.system.name, "steps": trainer.global_step,
        "world_size": trainer.world_size,  # DDP processes: each drew its own views every step
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
    write_run_page(out_dir)  # index.html: this run's video, views, metrics and files
    log.info("done: %s", out_dir)
    return summary


def build_system(cfg: DictConfig):
    try:
        return get_class(cfg.system._target_)(cfg)
    except (InstantiationException, TypeError, ImportError, OmegaConfBaseException) as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, Text23dError):
            cause = cause.__cause__
        if cause is not None:  # a part refused its settings (instantiate wraps it): its own line says why
            raise cause from None
        raise ConfigError(f"cannot build system '{cfg.system.name}': {str(e).splitlines()[0]}. "
                          "Check the keys you overrode (text23d --cfg job shows the config).") from None


def lightning_logs_once() -> None:
    """Lightning gives its loggers console handlers of their own when it is imported before logging
    is set up (text23d imports it before Hydra sets up the console and text23d.log), so each INFO
    line printed twice. Where the root logger has handlers, Lightning's go and its records
    propagate: they print once, in the run's format, and reach the log file."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True


def build_trainer(cfg: DictConfig, out_dir: Path, callbacks: list, start_step: int, total_steps: int) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    lightning_logs_once()

    from text23d.progress import StepProgressBar

    ckpt = PeriodicCheckpoint(out_dir / "ckpts" / "last.ckpt", cfg.checkpoint.every_n_train_steps)
    bar = [StepProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    # A resumed run logs CSV into a new version folder: the CSV logger rewrites its file.
    loggers = [TensorBoardLogger(out_dir / "logs", name="tensorboard", version=""),
               CSVLogger(out_dir / "logs", name="csv", version=f"resumed-{start_step}" if start_step else "")]
    options = {**OmegaConf.to_container(cfg.trainer, resolve=True), "max_steps": total_steps}  # all stages
    options["strategy"] = ddp_strategy(cfg)
    options["precision"] = trainer_precision(options)
    trainer = L.Trainer(**options, deterministic=cfg.deterministic,
                        default_root_dir=out_dir, logger=loggers, callbacks=[ckpt, *bar, *callbacks],
                        plugins=[AtomicCheckpointIO()], enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, max_epochs=-1,
                        use_distributed_sampler=False)  # every DDP rank runs every step
    _check_ddp_outside_sweeps(trainer, cfg.trainer)
    return trainer


def trainer_precision(options: dict) -> str:
    """`trainer.precision` as this machine runs it. 16-mixed (fp16 autocast with a GradScaler,
    threestudio's for DreamFusion and Magic3D, the default) needs CUDA: on a CPU Lightning would
    switch to bf16-mixed by itself, whose results differ from float32's in every step and which most
    CPUs run no faster, so a CPU run uses 32-true (tests and scripts run SD-shaped models on CPU)."""
    precision, accelerator = str(options.get("precision", "32-true")), options.get("accelerator", "auto")
    if precision not in ("16-mixed", "16"):
        return precision
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    gpu = CUDAAccelerator.is_available() or MPSAccelerator.is_available()
    if accelerator == "cpu" or (accelerator in ("auto", "gpu") and not gpu):
        log.info("trainer.precision=%s runs fp16 autocast on CUDA only; this run is on the CPU, so it uses 32-true "
                 "(Lightning would pick bf16-mixed, which changes the results and is rarely faster on a CPU)",
                 precision)
        return "32-true"
    return precision


def ddp_strategy(cfg: DictConfig) -> str:
    """`trainer.strategy` as the system needs it: DDP with `find_unused_parameters`. Each rank draws
    its own views and shading, so in a step some parameters get no gradient on one rank and do on
    another (a textureless render leaves the colour field out; a hash grid's analytic normals only
    on lit renders); a step trains one stage, so the other stages' parameters get none, nor does
    VSD's LoRA (it has its own optimizer and syncs its own gradients). Plain DDP would then wait in
    a collective the other rank never joins. (`auto` on several devices is Lightning's `ddp`.)"""
    strategy, devices = cfg.trainer.get("strategy", "auto"), cfg.trainer.get("devices", 1)
    several = (isinstance(devices, int) and devices > 1) or (isinstance(devices, (list, tuple)) and len(devices) > 1)
    if not (strategy == "ddp" or (strategy == "auto" and several)):
        return strategy
    return "ddp_find_unused_parameters_true"


def _check_ddp_outside_sweeps(trainer: L.Trainer, asked: DictConfig) -> None:
    """Lightning starts the other ranks of `ddp` by running the command line again: inside a Hydra
    sweep (-m) each would re-run the whole sweep into another folder (Lightning #11300)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    if (isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
            and not trainer.strategy.cluster_environment.creates_processes_externally
            and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        raise ConfigError(
            f"trainer.strategy={asked.get('strategy')} on trainer.devices={asked.get('devices')} cannot run in a "
            "sweep (-m): Lightning starts the other devices' processes by re-running the command, which would re-run "
            "the whole sweep. Fix: run each job on its own without -m (e.g. a shell loop over text23d prompt=...), "
            "or sweep with trainer.devices=1")


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path, int]:
    """The saved config of the run being resumed, plus any explicit command-line overrides
    (e.g. trainer.max_steps=20000 to extend it). Output goes to the original run folder."""
    ckpt = find_checkpoint(cfg.resume)
    data = load_checkpoint_file(ckpt)
    _check_version(ckpt, data)
    saved = OmegaConf.create(data["text23d"]["config"])
    OmegaConf.set_struct(saved, True)
    extra = [o for o in overrides if not o.lstrip("+").startswith(("resume=", "hydra.", "output_dir=", "export.",
                                                                  "resume_overrides_ok="))]
    for key, value, add in _parse_overrides(extra):
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

    try:
        tconfig.validate(cfg)
        module, _, name = str(cfg.system._target_).rpartition(".")
        if not hasattr(importlib.import_module(module), name):
            raise ImportError(f"{module} has no {name}")
    except (OmegaConfBaseException, ImportError, ValueError) as e:
        why = f"system._target_={cfg.system._target_}: {e}" if isinstance(e, (ImportError, ValueError)) else str(e).splitlines()[0]
        raise CheckpointError(
            f"'{ckpt}' was made by a text23d whose config this version cannot use ({why}). Fix: "
            f"resume or export it with the version that made it (its settings: {run_dir_of(ckpt) / 'config.yaml'}), "
            "or start a new run") from None


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
    return load_run(ckpt_or_dir, export_overrides)[:3]


def load_run(ckpt_or_dir, export_overrides: dict | None = None):
    """load_system's (system, step, checkpoint), and the export settings the run saved."""
    ckpt = find_checkpoint(ckpt_or_dir)
    data = load_checkpoint_file(ckpt)
    _check_version(ckpt, data)
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
        exported = export_artifacts(system, folder, step, save_dir=folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no half export; the run's files were never touched
        raise
    settings = OmegaConf.to_container(system.cfg.export, resolve=True)
    summary = {"checkpoint": str(ckpt), "steps": step, "folder": str(folder), "settings": settings,
               "changed": differ, **exported}
    write_text_atomic(folder / "export.json", json.dumps(summary, indent=2, default=str))
    log.info("exported into %s", folder)
    return summary
