"""`run(cfg)`: the story of a run, one phase after the other, each in one place.

    resolve    what to do: a new run (checked), or a resumed one (its own config), or nothing left
    build      the run folder, the seed, the system (every stage's parts) and the trainer
    fit        every stage, coarse to fine, stopping cleanly on a signal
    export     video, views and meshes of the trained result (export/artifacts.py)
    summarise  summary.json and the run's page

The config flows one way: `resolve` settles it, later phases only read it. The CLI is a thin shell
around `run`; tests and scripts call it. A saved run (resume, load, export again): saved.py.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from text23d import config as tconfig
from text23d import faults
from text23d.build import build_system, build_trainer, trainer_precision  # noqa: F401  (the API: run.build_system …)
from text23d.checkpoint import remove_leftovers
from text23d.errors import ConfigError
from text23d.export.artifacts import export_artifacts
from text23d.fileio import check_writable, write_text_atomic
from text23d.gallery import write_run_page
from text23d.perf import StepStats
from text23d.saved import export_only, finished_summary, load_run, load_system, resume_config  # noqa: F401
from text23d.systems import init_from

log = logging.getLogger("text23d")


@dataclass
class Plan:
    """What `resolve` settled: the config to run, its folder, and where training starts."""

    cfg: DictConfig
    out_dir: Path
    ckpt: Path | None = None  # resume from this checkpoint
    start_step: int = 0
    source: object = None  # init_from: the run whose result starts the later stages
    finished: dict | None = None  # a resumed run with nothing left to do: its summary
    started: float = field(default_factory=time.time)  # wall_time_s counts from here


def run(cfg: DictConfig, overrides: list[str] | None = None, callbacks: list | None = None,
        checked: bool = False) -> dict:
    """Train (or resume, or only export) as `cfg` says; returns the run summary (also on disk).
    `checked`: the caller has checked `cfg` against its schema already (the CLI's pre-flight)."""
    if cfg.export.get("ckpt"):
        return export_only(cfg, overrides)
    started = time.time()
    plan = resolve(cfg, overrides or [], checked)
    if plan.finished is not None:  # nothing to train: a no-op, nothing overwritten
        return plan.finished
    plan.started = started
    system, trainer, watch = build(plan, callbacks or [])
    fit(plan, system, trainer, watch)
    if not trainer.is_global_zero:  # DDP: rank 0 exports and writes the summary
        return {"rank": trainer.global_rank, "steps": trainer.global_step, "output_dir": str(plan.out_dir)}
    exported = export(plan, system, trainer.global_step)
    return summarise(plan, system, trainer, exported)


def resolve(cfg: DictConfig, overrides: list[str], checked: bool = False) -> Plan:
    """The config this run runs: a resumed run's own (with only how it runs changed, checked as
    it is read), or `cfg`, checked against its schema unless the caller did; the later stages'
    start when init_from names another run."""
    ckpt, start_step = None, 0
    if cfg.get("resume"):
        cfg, ckpt, start_step = resume_config(cfg, overrides)
        finished = finished_summary(cfg, start_step)
        if finished is not None:
            return Plan(cfg, Path(cfg.output_dir), ckpt, start_step, finished=finished)
    elif not checked:
        tconfig.validate(cfg)
    if not cfg.get("output_dir"):
        raise ConfigError("output_dir is not set: pass output_dir=/some/folder (the CLI sets it for you)")
    cfg, source = init_from.prepare(cfg) if not ckpt else (cfg, None)
    check_writable(Path(cfg.output_dir), "output_dir")  # before any model is loaded
    return Plan(cfg, Path(cfg.output_dir), ckpt, start_step, source)


def build(plan: Plan, callbacks: list):
    """The run folder's config.yaml, the seed, the system and the trainer (with the signal watch
    that stops at a step boundary and the checkpoint it then saves)."""
    cfg, out_dir = plan.cfg, plan.out_dir
    if rank_zero_only.rank == 0:  # under DDP, rank 0 alone writes files (the others only train)
        if plan.ckpt:
            for leftover in remove_leftovers(out_dir):
                log.info("removed %s, left by a process killed while writing", leftover)
        write_text_atomic(out_dir / "config.yaml", tconfig.resolved_yaml(cfg))
        faults.mark_job(out_dir)  # a submitit job requeued later finds its own folder (runfolder.reuse_allowed)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    system = build_system(cfg)
    init_from.apply(system, plan.source)
    watch = faults.SignalWatch().install()  # SIGTERM, SIGINT, SIGUSR1/2: stop at the next step boundary
    guard = faults.callback(watch, save=lambda tr: tr.save_checkpoint(out_dir / "ckpts" / "last.ckpt", weights_only=False))
    stats = StepStats()  # perf/step_s, perf/peak_mem_gb in the logs
    trainer = build_trainer(cfg, out_dir, [guard, stats, *callbacks], plan.start_step, sum(system.stage_steps))
    return system, trainer, watch


def fit(plan: Plan, system, trainer: L.Trainer, watch) -> None:
    """Every stage, from the checkpoint when resuming."""
    try:
        with warnings.catch_warnings():
            # Our loader yields step indices only (cameras are drawn in the step, RNG restored from the
            # checkpoint), so resuming mid-"epoch" is exact; Lightning cannot know that and would warn.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            trainer.fit(system, ckpt_path=str(plan.ckpt) if plan.ckpt else None)
    except SIGTERMException:  # Lightning's own SIGTERM stop, when the signal came after our check
        trainer.save_checkpoint(plan.out_dir / "ckpts" / "last.ckpt", weights_only=False)
        raise faults.Interrupted(watch.signum or 15, f"interrupted by SIGTERM at step {trainer.global_step}: "
                                 f"checkpoint saved; nothing was exported. Resume with: text23d resume={plan.out_dir}") from None
    finally:
        watch.uninstall()


def export(plan: Plan, system, step: int) -> dict:
    """The trained result as files, with the run's export settings; the last stage's record; VSD's LoRA."""
    exported = export_artifacts(system, plan.cfg.export, plan.out_dir, step)
    system.end_stage(system.stage_index, outputs=exported["artifacts"])
    if getattr(system, "lora", None) is not None:  # ProlificDreamer's
        exported["artifacts"]["lora"] = system.save_lora(plan.out_dir / "ckpts" / "lora.safetensors")
    return exported


def summarise(plan: Plan, system, trainer: L.Trainer, exported: dict) -> dict:
    """summary.json (what the run made, its metrics and files) and index.html, the run's page.
    train_time_s: the stages' training, across resumes (their sum); wall_time_s: this process, from
    its start to the summary (loading and export included)."""
    cfg, out_dir = plan.cfg, plan.out_dir
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    summary = {
        "prompt": cfg.prompt, "system": cfg.system.name, "steps": trainer.global_step,
        "world_size": trainer.world_size,  # DDP processes: each drew its own views every step
        "resumed_from": str(plan.ckpt) if plan.ckpt else None,
        "wall_time_s": round(time.time() - plan.started, 2),
        "train_time_s": round(sum(s.get("train_time_s", s.get("wall_time_s", 0.0)) for s in system.stage_log), 2),
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
